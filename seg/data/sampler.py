"""An endless, resumable sample order: a pure function of (seed, position)."""

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class InfiniteSampler(Sampler[tuple[int, int, int]]):
    """Yields ``(index, seed, position)`` forever, one epoch after another.

    Epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``, so the order
    depends only on the seed and the global sample position; ``start`` skips the samples a
    resumed run has already consumed. ``seed`` and ``position`` travel with the index so that
    a sample's augmentation is seeded by its position too, whatever the number of workers.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, start: int = 0):
        if num_samples <= 0:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.start = start

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch, offset = divmod(self.start, self.num_samples)
        position = self.start
        while True:
            for index in self.epoch_order(epoch)[offset:]:
                yield index, self.seed, position
                position += 1
            epoch, offset = epoch + 1, 0
