"""Where a run computes: precision on GPUs that only emulate bf16, the compile preflight, each
rank's GPU under torchrun and SLURM, the device of a resumed run."""

import os

import pytest
import torch
from omegaconf import OmegaConf

from seg import device as device_module
from seg.device import compile_cache, resolve_compile, resolve_precision
from seg.engine import dist
from seg.train import same_device

CUDA = torch.device("cuda")


@pytest.fixture
def emulating_gpu(monkeypatch):
    """A GPU like a V100 or T4: bf16 only through emulation."""
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")


def test_auto_picks_fp16_with_a_scaler_where_bf16_is_only_emulated(emulating_gpu):
    assert resolve_precision("auto", CUDA) == "fp16"


def test_an_explicit_bf16_on_such_a_gpu_names_the_precisions_that_work(emulating_gpu):
    with pytest.raises(ValueError, match=r"Tesla V100 has no native bf16.*fp16 or fp32"):
        resolve_precision("bf16", CUDA)


def test_a_bf16_checkpoint_evaluated_on_such_a_gpu_runs_in_fp32_and_says_so(emulating_gpu, caplog):
    assert resolve_precision("bf16", CUDA, inference=True) == "fp32"
    assert "trainer.precision=fp16 or fp32" in caplog.text


def test_compile_auto_is_off_with_one_line_where_triton_has_no_c_compiler(monkeypatch, caplog):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(device_module.shutil, "which", lambda name: None)
    assert resolve_compile("auto", CUDA) is False
    assert caplog.text.count("no C compiler found") == 1
    assert resolve_compile(True, CUDA) is True  # asked for explicitly: tried, with its fallback
    monkeypatch.setattr(device_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert resolve_compile("auto", CUDA) is True


@pytest.mark.parametrize(
    ("environment", "visible", "expected"),
    [
        ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, 4, 1),
        # srun --gpus-per-task=1: each task sees its own GPU as GPU 0
        ({"LOCAL_RANK": "3"}, 1, 0),
        ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 1, "2 process"),
        ({"LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "1"}, 2, "sees 2 GPU"),
    ],
)
def test_each_rank_gets_a_gpu_it_can_see(monkeypatch, environment, visible, expected):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)  # set by torchrun, not by hand
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if isinstance(expected, int):
        assert dist.rank_device() == torch.device("cuda", expected)
    else:
        with pytest.raises(ValueError, match=expected):
            dist.rank_device()


def test_several_slurm_tasks_without_torchrun_are_refused(monkeypatch):
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"one of 4 SLURM tasks started without torchrun.*srun"):
        dist.init(torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "4")  # the workers of `srun torchrun ...`
    dist.refuse_plain_srun()


def test_a_resumed_run_on_another_kind_of_device_than_its_group_is_refused(monkeypatch):
    monkeypatch.setattr(dist, "launched_by_torchrun", lambda: True)
    cfg = OmegaConf.create({"trainer": {"device": "cpu"}})
    with pytest.raises(ValueError, match=r"trainer.device=cpu \(the checkpoint's run\)"):
        same_device(cfg, CUDA)
    assert same_device(cfg, torch.device("cpu")) == torch.device("cpu")


def test_without_torchrun_a_resumed_run_takes_its_resumed_config_device():
    cfg = OmegaConf.create({"trainer": {"device": "cpu"}})
    assert same_device(cfg, CUDA) == torch.device("cpu")  # no process group to agree with


def test_compile_caches_under_the_output_root_unless_the_user_chose_a_place(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with compile_cache(tmp_path / "compile_cache"):
        # where inductor (and Triton, below it) reads its cache: found again after a restart
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile_cache")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # a sweep's next job sets its own
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/scratch/mine")
    with compile_cache(tmp_path / "compile_cache"):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/scratch/mine"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/scratch/mine"
