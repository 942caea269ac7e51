"""The CUDA paths, run where a GPU is present (``pytest -m gpu``); skipped on CPU-only machines:
each precision trained and resumed (the precision a resumed run really used is asserted),
compile really compiling, deterministic mode resuming bit for bit, a checkpoint saved with
more GPUs visible, DDP over a one-process NCCL group. ``scripts/gpu_check.sh`` runs them on a
lent GPU machine and prints the versions."""

import itertools
import logging
import socket

import pytest
import torch
import torch.distributed as torch_dist
from omegaconf import OmegaConf
from torch import nn

from seg.checkpoint import load_checkpoint, save_checkpoint
from seg.engine.prefetch import DeviceBatches
from seg.engine.trainer import averaged_model
from seg.metrics import ConfusionMatrix, per_image_counts
from seg.restore import model_from
from tests.conftest import run_evaluation, run_training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = ("trainer.device=cuda", "data.num_workers=1")


def last(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_tiny_run_on_cuda_resumes_in_its_precision_and_loads_on_the_cpu(tmp_path, precision):
    run_dir = tmp_path / "run"
    settings = (*CUDA, f"trainer.precision={precision}")
    run_training(run_dir, *settings, "trainer.max_iters=2", "scheduler.max_iters=4")
    # The same command, resumed: run_training's own trainer.precision=fp32 must not win over
    # the run's precision (it did once, so the fp16 run resumed without its grad scaler).
    run_training(tmp_path / "x", *settings, "scheduler.max_iters=4", "resume=auto",
                 "trainer.max_iters=4")  # fmt: skip
    state = last(run_dir)
    assert state["iteration"] == 4
    assert state["precision"] == precision  # what the resumed run really computed in
    assert all(value.device.type == "cpu" for value in state["model"].values())
    assert bool(state["scaler"]) == (precision == "fp16")
    model = model_from(state, OmegaConf.create(state["config"]))  # a plain CPU model
    assert all(value.device.type == "cpu" for value in model.state_dict().values())
    result = run_evaluation(f"checkpoint={run_dir / 'checkpoints/last.pt'}", "trainer.device=cpu",
                            "trainer.precision=fp32", f"report_dir={tmp_path / 'r'}")  # fmt: skip
    assert 0 <= result["mIoU"] <= 1


def test_fp16_resumed_from_a_bf16_checkpoint_starts_a_fresh_grad_scaler(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_training(run_dir, *CUDA, "trainer.precision=bf16", "trainer.max_iters=2")
    run_training(run_dir, *CUDA, f"resume={run_dir / 'checkpoints/last.pt'}",
                 "trainer.precision=fp16", "trainer.max_iters=4")  # fmt: skip
    assert "the grad scaler starts afresh" in caplog.text
    state = last(run_dir)
    assert state["precision"] == "fp16" and state["scaler"]["scale"] > 0


def test_compile_really_compiles_the_training_step(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # inductor sets it once used
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_training(tmp_path / "run", *CUDA, "trainer.precision=bf16", "trainer.compile=true",
                 "trainer.max_iters=3")  # fmt: skip
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert "compiled the training step in" in caplog.text
    assert "torch.compile failed" not in caplog.text
    # the kernels cached under the output root, for a requeued run to find
    assert any((tmp_path / "compile_cache").iterdir())


def test_deterministic_unet_resumes_bit_for_bit_on_cuda(tmp_path):
    # U-Net (nearest upsampling) with the deterministic cross-entropy: every op has a
    # deterministic CUDA kernel (tests/unit/test_determinism.py lists the exact models).
    settings = (*CUDA, "trainer.precision=fp32", "trainer.deterministic=true",
                "trainer.compile=false", "scheduler.max_iters=4")  # fmt: skip
    run_training(tmp_path / "straight", *settings, "trainer.max_iters=4")
    stopped = tmp_path / "stopped"
    run_training(stopped, *settings, "trainer.max_iters=2")
    run_training(stopped, *settings, f"resume={stopped / 'checkpoints/last.pt'}",
                 "trainer.max_iters=4")  # fmt: skip
    straight, resumed = last(tmp_path / "straight")["model"], last(stopped)["model"]
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


def test_deterministic_mode_warns_for_models_without_deterministic_kernels(tmp_path):
    with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
        run_training(tmp_path / "run", *CUDA, "model=fpn", "trainer.deterministic=true",
                     "trainer.max_iters=2")  # fmt: skip


def test_a_checkpoint_saved_with_more_gpus_visible_resumes(tmp_path):
    run_dir = tmp_path / "run"
    run_training(run_dir, *CUDA, "trainer.max_iters=2")
    state = last(run_dir)
    # Format 1, as an 8-GPU torchrun run saved it: every visible GPU's generator.
    state["rng"]["cuda"] = [state["rng"]["cuda"]] * 8
    state["world_size"] = 8
    del state["format_version"]
    save_checkpoint(state, run_dir / "checkpoints" / "last.pt")
    run_training(run_dir, *CUDA, f"resume={run_dir / 'checkpoints/last.pt'}",
                 "trainer.max_iters=4")  # fmt: skip
    assert last(run_dir)["iteration"] == 4


def test_ddp_over_a_one_process_nccl_group(tmp_path):
    from tests.unit.test_trainer import batches, make_trainer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.cuda.set_device(0)
    torch_dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                  world_size=1, device_id=torch.device("cuda", 0))  # fmt: skip
    try:
        trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), device="cuda", precision="bf16")
        assert isinstance(trainer.ddp_model, nn.parallel.DistributedDataParallel)
        stream = batches()
        assert all(trainer.train_step(stream).applied for _ in range(3))
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_second_gpu_becomes_the_current_device(tmp_path):
    run_training(tmp_path / "run", "trainer.device=cuda:1", "trainer.max_iters=1")
    assert torch.cuda.current_device() == 1  # no context and pin thread left on GPU 0


def pinned_batches():
    """The trainer tests' batches, pinned as the DataLoader pins them for a GPU."""
    from tests.unit.test_trainer import batches

    for images, masks in batches():
        yield images.pin_memory(), masks.pin_memory()


def test_a_fused_adamw_step_makes_no_blocking_sync_and_decides_one_step_late(tmp_path):
    # What fit does per step: the batch ahead copied on the side stream (an event per batch),
    # the step, its decision queued, the previous step's decision read (its event waited for;
    # set_sync_debug_mode does not see event waits, a profiler trace does: gpu_check.sh).
    from tests.unit.test_trainer import PoisonedLoss, make_trainer

    trainer = make_trainer(tmp_path, PoisonedLoss(poisoned_calls={4}), optimizer="fused_adamw",
                           device="cuda", compile=False)  # fmt: skip
    stream = DeviceBatches(pinned_batches(), trainer.device)
    steps = []
    for number in range(1, 7):
        if number == 3:  # after the warm-up (optimizer state, allocator)
            torch.cuda.set_sync_debug_mode("error")
        try:
            step = trainer.train_step(stream)
            trainer.guard.unread.append(step)
            trainer.guard.read(keep=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        steps.append(trainer.guard.skipped_steps)
        assert step.host_decision.is_pinned() and step.copied is not None
    assert steps == [0, 0, 0, 0, 1, 1]  # step 4's non-finite loss, counted while step 5 ran


def test_device_batches_arrive_whole_on_the_gpu():
    from tests.unit.test_trainer import batches

    expected = list(itertools.islice(batches(), 4))
    stream = DeviceBatches(pinned_batches(), torch.device("cuda"))
    for images, masks in expected:
        got = next(stream)
        torch.cuda.current_stream().synchronize()
        assert got[0].is_cuda and torch.equal(got[0].cpu(), images)
        assert torch.equal(got[1].cpu(), masks)


def test_the_confusion_matrix_counts_on_the_gpu_without_a_sync():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 19, (2, 64, 128), generator=generator).cuda()
    targets[:, :8] = 255
    predictions = torch.randint(0, 19, (2, 64, 128), generator=generator).cuda()
    matrix = ConfusionMatrix(19, 255, "cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        matrix.update(predictions, targets)
        counts = per_image_counts(predictions, targets, 19, 255)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = ConfusionMatrix(19, 255)
    reference.update(predictions.cpu(), targets.cpu())
    assert torch.equal(matrix.matrix.cpu(), reference.matrix)
    assert torch.equal(counts.sum(0).cpu(), per_image_counts(
        predictions.cpu(), targets.cpu(), 19, 255).sum(0))  # fmt: skip


def test_the_average_on_the_gpu_equals_torchs_without_a_sync():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).cuda()
    ours = averaged_model(model, 0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for number in range(4):
        model.train()(torch.randn(2, 3, 6, 6, device="cuda"))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        if number:  # AveragedModel copies its CPU count to the GPU at each update
            torch.cuda.set_sync_debug_mode("error")
        try:
            ours.update_parameters(model)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        theirs.update_parameters(model)
    for (key, value), expected in zip(ours.module.state_dict().items(),
                                      theirs.module.state_dict().values(), strict=True):  # fmt: skip
        if value.is_floating_point():
            assert torch.equal(value, expected), key
