"""The checkpoint: its keys, its format version and the upgrade of older files, its writing
(atomic) and loading (safe), and the random-generator states it carries.

A checkpoint is a plain dict of tensors and primitives that loads with
``torch.load(weights_only=True)``. Every key is declared in ``Checkpoint`` below and written by
``training_state`` (the Trainer's part) and ``run_state`` (what rebuilds the model); every file
is read through ``load_checkpoint``, which upgrades older formats to the current one.
"""

import logging
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# torch.compile and DistributedDataParallel wrap the model and prefix its keys.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# The layout of ``Checkpoint``; ``upgrade`` brings older files to it.
# 1 (no key): ``rng`` one dict, whose ``cuda`` held every visible GPU's generator (a list);
#    ``best_miou``; the config has no ``task`` (semantic segmentation was the only one).
# 2: ``rng["cuda"]`` is the training device's generator, or None.
# 3: ``rng`` is a list, one entry per rank; ``best_metric`` and ``metric``; ``task`` config.
FORMAT_VERSION = 3
# ``kind`` of a checkpoint written with trainer.best_checkpoint=weights: the weights and what
# rebuilds the model, without optimizer, schedule, random state or data position.
WEIGHTS_ONLY = "weights"
FULL = "full"


class Checkpoint(TypedDict, total=False):
    """Every key a checkpoint holds (format ``FORMAT_VERSION``)."""

    format_version: int
    kind: str  # FULL (resumes a run) or WEIGHTS_ONLY
    # What rebuilds the model and describes the run (``run_state``).
    config: str  # the resolved training config, as YAML text
    overrides: list[str]  # the training command line's overrides
    class_names: list[str]
    palette: list[list[int]]
    # The training state (``training_state``); a WEIGHTS_ONLY checkpoint has the first five.
    model: dict[str, torch.Tensor]  # unwrapped: no ``module.``/``_orig_mod.`` prefixes
    iteration: int  # completed optimizer steps
    world_size: int  # processes that trained it
    precision: str  # as resolved: fp32, fp16 or bf16
    best_metric: float  # the best validation score so far (the task's primary metric)
    metric: str  # that metric's name (mIoU, mask_AP)
    optimizer: dict
    scheduler: dict
    scaler: dict  # empty unless fp16
    samples_seen: int  # training samples consumed by all ranks: the data order's position
    skipped_steps: int
    pending_validation: bool  # a validation is owed: the resumed run runs it first
    validations_without_improvement: int
    rng: list[dict]  # ``rng_state`` of each rank, in rank order
    ema: dict[str, torch.Tensor]  # with trainer.ema_decay: the averaged weights
    ema_updates: int


def training_state(**state: Any) -> dict:
    """The Trainer's part of a checkpoint: ``Checkpoint``'s training keys, checked by name."""
    unknown = set(state) - set(Checkpoint.__annotations__)
    if unknown:
        raise KeyError(f"not checkpoint keys: {sorted(unknown)} (declare them in Checkpoint)")
    return {"format_version": FORMAT_VERSION, "kind": FULL} | state


def run_state(
    config: str, overrides: list[str], class_names: list[str], palette: list[list[int]]
) -> dict:
    """What rebuilds the model and names its classes, added to every checkpoint of a run."""
    return {"config": config, "overrides": list(overrides), "class_names": list(class_names),
            "palette": [list(color) for color in palette]}  # fmt: skip


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


class KeepWriteError:
    """A file for ``torch.save`` that keeps the OSError of a failed write: torch's zip writer
    reports it as a RuntimeError ("unexpected pos ...") that has lost the errno (disk full)."""

    def __init__(self, file):
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)  # flush, tell, ...: whatever torch.save asks of a file


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` atomically: the previous file stays valid until the new one
    is complete on disk (temp file in the same directory, fsync, ``os.replace``)."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            writer = KeepWriteError(file)
            try:
                torch.save(state, writer)
            except RuntimeError as error:
                if writer.error is None:
                    raise  # not a failed write: a bug that needs its own traceback
                raise writer.error from error
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        # Make the rename itself durable: a power cut cannot bring the old file back.
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        previous = f"the previous {path.name} is intact" if path.exists() else "nothing was saved"
        raise OSError(
            error.errno,
            f"cannot write checkpoint {path} ({error.strerror or error}); {previous}. "
            "Free disk space or fix the directory's permissions, then resume with resume=auto",
        ) from error
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU with ``weights_only=True`` (no code can run on load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    exported = exported_model(path)  # torch.load would warn, then fail with a misleading error
    if exported is not None:
        raise ValueError(
            f"{path} is not a checkpoint: checkpoint= and resume= expect a checkpoint written "
            f"by train.py, e.g. <run>/checkpoints/best.pt; this file is {exported}"
        )
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
    return upgrade(state)


def upgrade(state: dict) -> dict:
    """``state`` in the current ``FORMAT_VERSION``'s layout, whatever version wrote it."""
    version = state.get("format_version", 1)
    if version < 2 and isinstance(state.get("rng"), dict):
        # Every visible GPU's generator was saved: keep the one of the device rank 0 trained
        # on (cuda:0 under torchrun; trainer.device's index in one process).
        generators = state["rng"].get("cuda") or []
        index = 0
        if state.get("world_size", 1) == 1 and "config" in state:
            device = str(OmegaConf.select(OmegaConf.create(state["config"]), "trainer.device"))
            if device.startswith("cuda"):
                index = torch.device(device).index or 0
        state["rng"]["cuda"] = generators[index] if index < len(generators) else None
    if version < 3:
        if isinstance(state.get("rng"), dict):
            state["rng"] = [state["rng"]]  # rank 0's: the ranks of semantic runs drew alike
        if "best_miou" in state:
            state["best_metric"], state["metric"] = state.pop("best_miou"), "mIoU"
        if "config" in state:
            state["config"] = with_semantic_task(state["config"])
    state.setdefault("kind", FULL)
    state["format_version"] = FORMAT_VERSION
    return state


def with_semantic_task(config_yaml: str) -> str:
    """A config of format 1 or 2 with the ``task`` section its run had: semantic segmentation,
    the only task then, on the config's own data settings (configs/task/semantic.yaml)."""
    config = OmegaConf.create(config_yaml)
    if "task" in config:
        return config_yaml
    data = config.get("data", {})
    config.task = {
        "_target_": "seg.tasks.semantic.SemanticTask",
        "num_classes": data.get("num_classes"),
        "ignore_index": data.get("ignore_index"),
        "class_names": data.get("class_names"),
        "palette": data.get("palette"),
        "mean": data.get("mean"),
        "std": data.get("std"),
    }
    return OmegaConf.to_yaml(config)


def validated_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's run validated: the average with ``trainer.ema_decay`` (and
    a checkpoint without one, e.g. EMA newly switched on, its model's)."""
    return checkpoint.get("ema", checkpoint["model"])


def exported_model(path: Path) -> str | None:
    """What an exported model file is, and how to run it; None for anything else."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return None
        # torch.jit.save writes <name>/code/ (the model's TorchScript) and <name>/constants.pkl.
        if any("/code/" in name or name.endswith("/constants.pkl") for name in names):
            return "a TorchScript model (an export): load it with torch.jit.load"
        return None
    # An ONNX model is a protobuf message (no zip, no pickle): its name is the surest sign.
    if path.suffix == ".onnx":
        return "an exported ONNX model: run it with onnxruntime"
    return None


def newest_loadable_checkpoint(root: Path, resumable: bool = True) -> tuple[Path, dict] | None:
    """The ``checkpoints/*.pt`` under ``root`` with the latest iteration (then the most recently
    written) that loads, with its state; with ``resumable`` only one that can continue a run
    (not a weights-only ``best.pt``).

    The iteration inside each file decides, not its time, which a copy (``cp -r``) or ``touch``
    changes. Unreadable later ones are reported and skipped, so a damaged file never blocks a
    resume.
    """
    candidates = {path: recorded_iteration(path) for path in root.glob("**/checkpoints/*.pt")}
    # Unreadable files (-1) first: their full load fails and says why, so the skip is reported.
    order = sorted(candidates, key=lambda p: (candidates[p] < 0, candidates[p], p.stat().st_mtime),
                   reverse=True)  # fmt: skip
    for path in order:
        try:
            state = load_checkpoint(path)
        except ValueError as error:
            log.warning("Skipping checkpoint %s: %s", path, error)
            continue
        if resumable and not can_resume(state):
            log.warning("Skipping checkpoint %s: it holds the weights alone "
                        "(trainer.best_checkpoint=weights) and cannot continue a run", path)  # fmt: skip
            continue
        earlier = order[order.index(path) + 1 :]
        newer = [p.name for p in earlier if p.stat().st_mtime > path.stat().st_mtime]
        if newer:
            log.warning("Taking %s (iteration %d) over %s, written later but at earlier "
                        "iterations (file times changed by a copy?)",
                        path, candidates[path], ", ".join(newer))  # fmt: skip
        return path, state
    return None


def recorded_iteration(path: Path) -> int:
    """The iteration ``path`` holds, read without loading its tensors (mapped, not read); -1
    when it cannot be read (its full load then says why)."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError):
        return -1
    return state.get("iteration", -1) if isinstance(state, dict) else -1


def can_resume(state: dict) -> bool:
    """Whether a checkpoint holds all that continues its run (not a weights-only one)."""
    return state.get("kind") != WEIGHTS_ONLY


def refuse_weights_only(state: dict, path: str | Path) -> None:
    """``resume=<path>`` of a weights-only checkpoint: say why not, and what to do instead."""
    if not can_resume(state):
        raise ValueError(
            f"resume={path}: this checkpoint holds the weights alone (written with "
            "trainer.best_checkpoint=weights): no optimizer, schedule, random state or data "
            "position to continue from. Resume from the run's checkpoints/last.pt, or start a "
            f"new run from these weights with init_from={path}"
        )


# Config keys that decide the shape of the weights: a checkpoint only fits the same values.
IDENTITY_KEYS = (
    "data.num_classes",
    "model._target_",
    "model.arch",
    "model.encoder_name",
    "model.encoder_depth",
)


# What the model's input bands mean, as training settles them (seg/train.py settle_pixels), with
# the value of checkpoints written before the keys existed (RGB photos): a resumed run on
# reordered bands or another scale would train on inputs that mean something else.
PIXEL_KEYS = {"data.in_channels": 3, "data.bands": None, "data.scale": 255}


def check_compatible(
    checkpoint: dict,
    config: DictConfig,
    path: str | Path,
    keys: dict[str, Any] | tuple[str, ...] = IDENTITY_KEYS,
) -> None:
    """Refuse a config whose model cannot hold the checkpoint's weights (``keys``: those of
    ``IDENTITY_KEYS``, or ``PIXEL_KEYS`` with their defaults), naming both values."""
    stored = OmegaConf.create(checkpoint["config"])
    defaults = keys if isinstance(keys, dict) else dict.fromkeys(keys)
    differences = []
    for key, default in defaults.items():
        before = OmegaConf.select(stored, key, default=default)
        now = OmegaConf.select(config, key, default=default)
        if before != now:
            differences.append(f"{key}={before} in the checkpoint but {key}={now} in the config")
    if differences:
        raise ValueError(
            f"checkpoint {path} does not fit this config: {'; '.join(differences)}. Drop the "
            "overrides that change these, or start a new run instead of resuming."
        )


def rank_rng_state(states: list[dict], rank: int, world_size: int) -> tuple[dict, bool]:
    """The random state rank ``rank`` of ``world_size`` continues from, and whether it is its
    own: a checkpoint of as many ranks has one per rank; otherwise every rank takes rank 0's
    (exact for semantic runs, whose ranks draw alike; not for instance runs, whose samplers
    draw data-dependent counts)."""
    if len(states) == world_size:
        return states[rank], True
    return states[0], False


def rng_state(device: torch.device) -> dict:
    """This process's random-generator states; ``cuda`` is ``device``'s generator (None on the
    CPU)."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "numpy_pos": numpy_state["state"]["pos"],
        "python": random.getstate(),
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore ``rng_state``'s states; a CUDA state goes to ``device``'s generator (a checkpoint
    from the CPU, resumed on a GPU, leaves that generator as seeded)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    key = state["numpy_key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, state["numpy_pos"]))
    random.setstate(state["python"])
