"""DataLoaders for training (endless, resumable) and validation (one ordered pass)."""

import cv2
from torch.utils.data import DataLoader, Dataset, Subset

from seg.data.sampler import InfiniteSampler


def _worker_init(worker_id: int) -> None:
    # Workers run in parallel already; OpenCV's own thread pool would only oversubscribe the CPU.
    cv2.setNumThreads(1)


def train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    start_sample: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Endless batches; ``start_sample`` is the number of samples a resumed run already used."""
    if len(dataset) == 0:
        raise ValueError("the training split is empty")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InfiniteSampler(len(dataset), seed=seed, start=start_sample),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init,
    )


def val_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    max_samples: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """The first ``max_samples`` samples (all when None), in order."""
    if max_samples is not None and max_samples < len(dataset):
        dataset = Subset(dataset, range(max_samples))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init,
    )
