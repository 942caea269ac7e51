"""An endless, resumable sample order: a pure function of (seed, position), shared by ranks."""

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class InfiniteSampler(Sampler[tuple[int, int, int]]):
    """Yields ``(index, seed, position)`` forever, one epoch after another.

    Epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``, so the order
    depends only on the seed and the global sample position; ``start`` skips the samples a
    resumed run has already consumed. ``seed`` and ``position`` travel with the index so that
    a sample's augmentation is seeded by its position too, whatever the number of workers.

    Under torch.distributed, rank ``r`` of ``world_size`` takes the global positions
    ``start + r``, ``start + r + world_size``, ...: together the ranks' k-th batches are the
    single-process stream's k-th global batch, every sample of an epoch goes to exactly one
    rank, and a resumed run continues at the same global position.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        shuffle: bool = True,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_samples <= 0:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.start = start
        self.rank = rank
        self.world_size = world_size

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        position = self.start + self.rank
        epoch, order = None, []
        while True:
            current, offset = divmod(position, self.num_samples)
            if current != epoch:  # one permutation per epoch, drawn when the stream enters it
                epoch, order = current, self.epoch_order(current)
            yield order[offset], self.seed, position
            position += self.world_size
