"""The data order shared by ranks (they together replay the single-process stream), the
resume position across world sizes, and batches fetched one ahead onto the device."""

import itertools

import pytest
import torch

from seg.data.loader import DeviceBatches
from seg.data.sampler import InfiniteSampler
from seg.train import data_position


def take(sampler: InfiniteSampler, count: int) -> list[tuple[int, int, int]]:
    return list(itertools.islice(iter(sampler), count))


@pytest.mark.parametrize(("world_size", "start"), [(2, 0), (2, 5), (3, 4)])
def test_ranks_interleave_into_the_single_process_stream(world_size, start):
    single = take(InfiniteSampler(7, seed=3, start=start), 10 * world_size)
    ranks = [
        take(InfiniteSampler(7, seed=3, start=start, rank=r, world_size=world_size), 10)
        for r in range(world_size)
    ]
    assert [item for step in zip(*ranks, strict=True) for item in step] == single


def test_every_sample_of_an_epoch_goes_to_exactly_one_rank():
    num_samples, world_size = 9, 2
    seen = []
    for rank in range(world_size):
        for index, _, position in take(
            InfiniteSampler(num_samples, seed=1, rank=rank, world_size=world_size), 10
        ):
            if position < num_samples:  # epoch 0
                seen.append(index)
    assert sorted(seen) == list(range(num_samples))


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2"):
        InfiniteSampler(5, rank=2, world_size=2)


def test_a_resume_with_another_world_size_continues_at_the_same_global_sample(caplog):
    checkpoint = {"iteration": 5, "samples_seen": 40, "world_size": 2}  # 2 processes x 4
    assert data_position(checkpoint, samples_per_iteration=4) == 40
    assert "trained by 2 process(es) with a global batch of 8" in caplog.text
    caplog.clear()
    # checkpoints from before samples_seen: one process, the same batch throughout
    assert data_position({"iteration": 5}, samples_per_iteration=4) == 20
    assert not caplog.text


def test_device_batches_run_one_ahead_and_raise_an_error_in_its_turn():
    fetched = []

    def source():
        for index in range(3):
            fetched.append(index)
            if index == 2:
                raise ValueError("bad file in batch 2")
            yield torch.full((1,), index), torch.zeros(1)

    batches = DeviceBatches(source(), torch.device("cpu"))
    assert next(batches)[0].item() == 0
    assert fetched == [0, 1]  # batch 1 is on its way while batch 0 is in use
    assert next(batches)[0].item() == 1
    assert fetched == [0, 1, 2]  # batch 2 failed ahead of time...
    with pytest.raises(ValueError, match="bad file in batch 2"):
        next(batches)  # ...and fails the step it belongs to
