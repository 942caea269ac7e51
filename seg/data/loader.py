"""DataLoaders for training (endless, resumable) and validation (one ordered pass)."""

import random
import signal
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from seg.data.sampler import InfiniteSampler


def _worker_init(worker_id: int) -> None:
    # (OpenCV runs single-threaded: seg.data.base sets it before any worker forks.)
    # Ctrl-C reaches the whole process group: the training process decides when to stop, and
    # its workers keep serving batches until it has saved its checkpoint. (SIGTERM stays
    # default: it is how the DataLoader and multiprocessing end workers at exit.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Any global-RNG use in a worker follows torch's per-worker seed (base seed + worker id).
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    start_sample: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """Endless batches; ``start_sample`` is the number of samples (all ranks together) that a
    resumed run already used; ``rank`` of ``world_size`` processes (torchrun) takes its share;
    ``collate_fn``: the task's (None: torch's default)."""
    if len(dataset) == 0:
        raise ValueError("the training split is empty")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        # Each rank takes every world_size-th sample of the one global order.
        sampler=InfiniteSampler(
            len(dataset), seed, start=start_sample, rank=rank, world_size=world_size
        ),
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init,
        # Worker seeds come from this generator, not from the global RNG state.
        generator=torch.Generator().manual_seed(seed + start_sample + rank),
    )


def val_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    max_samples: int | None = None,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """The first ``max_samples`` samples (all when None), in order; under torchrun rank
    ``rank``'s share of them (every ``world_size``-th, no padding: each sample is evaluated
    once), which the task's evaluator puts back together."""
    limit = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    indices = range(limit)[rank::world_size]
    if len(indices) < len(dataset):
        dataset = Subset(dataset, indices)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init,
    )
