"""The data order shared by ranks (they together replay the single-process stream), the
resume position across world sizes, batches fetched one ahead onto the device, and the
conversion of BatchNorm layers to their synchronised versions."""

import itertools

import pytest
import torch
from timm.layers import SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from seg.data.sampler import InfiniteSampler
from seg.engine import dist
from seg.engine.prefetch import DeviceBatches
from seg.models import smp_model
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


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sync_bn_conversion_keeps_what_timm_norm_act_layers_compute(device):
    # timm's BatchNormAct2d is BatchNorm + drop path + activation: torch's own conversion
    # would replace it by a plain SyncBatchNorm and drop ~50 of EfficientNet's nonlinearities.
    model = smp_model("Unet", 3, encoder_name="tu-efficientnet_b0").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        parameters = list(model.parameters())
        converted = dist.convert_sync_batchnorm(model, torch.device(device))
        assert torch.equal(converted(images), expected)  # eval mode: the same function
    kinds = {type(m) for m in converted.modules() if isinstance(m, _BatchNorm)}
    synced = (SyncBatchNormAct, nn.SyncBatchNorm) if device == "cuda" else (
        dist.CPUSyncBatchNormAct, dist.CPUSyncBatchNorm)  # fmt: skip
    assert kinds == set(synced)
    # the same parameter objects: an optimizer built before keeps them
    assert all(a is b for a, b in zip(converted.parameters(), parameters, strict=True))


def test_sync_bn_refuses_a_batchnorm_it_does_not_know_by_name():
    class ScaledBatchNorm(nn.BatchNorm2d):
        def forward(self, input):
            return 2 * super().forward(input)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(ScaledBatchNorm(4)))
    with pytest.raises(ValueError, match=r"1\.0 is a .*ScaledBatchNorm.*trainer.sync_bn=false"):
        dist.convert_sync_batchnorm(model, torch.device("cpu"))
