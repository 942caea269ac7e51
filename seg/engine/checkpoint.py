"""Checkpoints: plain dicts of tensors and primitives, written atomically, loaded safely."""

import os
import pickle
from pathlib import Path

import torch

# torch.compile and DistributedDataParallel wrap the model and prefix its keys.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def unwrapped_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with wrapper prefixes removed, so it loads into a plain model."""
    return {strip_prefixes(key): value for key, value in model.state_dict().items()}


def strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key.removeprefix(prefix), True
    return key


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` atomically: the previous file stays valid until the new one
    is complete on disk (temp file in the same directory, fsync, ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU with ``weights_only=True`` (no code can run on load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint {path} holds objects other than tensors and primitives and is refused "
            f"(loading it could run code): {str(error).splitlines()[0]}"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"checkpoint {path} is corrupted or truncated ({error})") from error
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a seg checkpoint (no 'model' entry)")
    state["model"] = {strip_prefixes(key): value for key, value in state["model"].items()}
    return state


def find_latest_checkpoint(root: Path) -> Path | None:
    """The most recently written ``checkpoints/last.pt`` under ``root``, or None."""
    candidates = sorted(root.glob("**/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None
