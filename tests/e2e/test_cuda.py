"""The CUDA paths (fp16 with a grad scaler, bf16, pinned memory, non-blocking copies), run
where a GPU is present; skipped on CPU-only machines."""

import pytest
import torch

from seg.engine.checkpoint import load_checkpoint
from seg.models import smp_model
from tests.conftest import run_evaluation, run_training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_tiny_run_on_cuda_resumes_and_loads_on_the_cpu(tmp_path, precision):
    run_dir = tmp_path / "run"
    settings = ("trainer.device=cuda", f"trainer.precision={precision}", "data.num_workers=1")
    run_training(run_dir, *settings, "trainer.max_iters=2", "scheduler.max_iters=4")
    # The same command, resumed: run_training's own trainer.precision=fp32 must not win over
    # the run's precision (it did here, so the fp16 run resumed without its grad scaler).
    run_training(tmp_path / "x", *settings, "scheduler.max_iters=4", "resume=auto",
                 "trainer.max_iters=4")  # fmt: skip
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["iteration"] == 4
    assert all(value.device.type == "cpu" for value in state["model"].values())
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0  # the grad scaler's state travels with the run
    model = smp_model("Unet", 6)
    model.load_state_dict(state["model"])  # a CUDA checkpoint loads into a plain CPU model
    result = run_evaluation(f"checkpoint={run_dir / 'checkpoints/last.pt'}", "trainer.device=cpu",
                            "trainer.precision=fp32", f"report_dir={tmp_path / 'r'}")  # fmt: skip
    assert 0 <= result["mIoU"] <= 1
