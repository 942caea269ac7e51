"""Random-generator states as checkpoints hold them: tensors and primitives that load with
``torch.load(weights_only=True)``.

Only this process's own generators are captured: the CPU's and, on a GPU, the one of the
device it trains on (not every visible GPU's: a run saved on 8 GPUs must resume on 1).
"""

import random

import numpy as np
import torch


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
