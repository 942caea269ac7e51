"""DataLoaders for training (endless, resumable) and validation (one ordered pass)."""

import random
import signal
from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from seg.data.sampler import InfiniteSampler
from seg.engine import dist


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
) -> DataLoader:
    """Endless batches; ``start_sample`` is the number of samples (all ranks together) that a
    resumed run already used."""
    if len(dataset) == 0:
        raise ValueError("the training split is empty")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        # Each rank takes every world_size-th sample of the one global order.
        sampler=InfiniteSampler(
            len(dataset), seed, start=start_sample, rank=dist.rank(), world_size=dist.world_size()
        ),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init,
        # Worker seeds come from this generator, not from the global RNG state.
        generator=torch.Generator().manual_seed(seed + start_sample + dist.rank()),
    )


def val_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    max_samples: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """The first ``max_samples`` samples (all when None), in order; under torchrun this
    rank's share of them (every ``world_size``-th, no padding: each sample is evaluated
    once), which ``seg.engine.evaluation.evaluate`` puts back together."""
    limit = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    indices = dist.shard(range(limit))
    if len(indices) < len(dataset):
        dataset = Subset(dataset, indices)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init,
    )


class DeviceBatches:
    """The batches of ``batches`` (uint8 images, masks) on ``device``, one batch ahead: while
    the model computes on batch k, batch k+1 is already being copied, on a side CUDA stream
    from pinned memory. On the CPU the same lines run without a stream (the copy is a no-op).

    An error fetching the batch ahead is raised when that batch is asked for, not earlier, so
    a failing batch still fails the step it belongs to.
    """

    def __init__(self, batches: Iterator, device: torch.device):
        self.batches = batches
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead: tuple[torch.Tensor, ...] | Exception | None = None

    def __iter__(self) -> "DeviceBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        batch = self.ahead if self.ahead is not None else self.fetch()
        self.ahead = self.fetch()  # the next copy starts before this step computes
        if isinstance(batch, Exception):
            raise batch
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)  # the copy must be done before the step reads it
            for tensor in batch:
                tensor.record_stream(current)  # its memory is in use on this stream now
        return batch

    def fetch(self) -> tuple[torch.Tensor, ...] | Exception:
        try:
            batch = next(self.batches)
        except Exception as error:  # StopIteration included: raised in its turn
            return error
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            return tuple(tensor.to(self.device, non_blocking=True) for tensor in batch)
