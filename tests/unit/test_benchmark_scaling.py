"""benchmark.py --scaling: the worker under torchrun (2 gloo processes) and the figures' definitions."""

import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from tests.conftest import REPO, load_script

benchmark = load_script("benchmark")

TINY = Namespace(size=[64, 64], batch=2, reps=1, warmup=1)


def test_two_gloo_processes_time_the_ddp_step_with_and_without_its_collectives():
    result = benchmark.run_worker("unet", TINY, torch.device("cpu"), nproc_per_node=2, threads=1)
    assert (result["world_size"], result["backend"], result["threads"]) == (2, "gloo", 1)
    # sync_bn=auto swaps in SyncBatchNorm; the step is also timed without each collective
    assert set(result["seconds"]) == {"seg", "no_grad_allreduce", "no_sync_bn"}
    assert all(seconds > 0 for seconds in result["seconds"].values())


def test_efficiency_is_against_the_same_cores_on_the_cpu_and_n_gpus_on_gpus(monkeypatch):
    def fake_worker(name, args, device, nproc_per_node, threads):
        seconds = {"seg": 1.0} if nproc_per_node is None else {"seg": 1.6, "no_grad_allreduce": 1.2}
        return {"world_size": nproc_per_node or 1, "backend": "gloo", "threads": threads,
                "precision": "fp32", "channels_last": True, "seconds": seconds}  # fmt: skip

    monkeypatch.setattr(benchmark, "run_worker", fake_worker)
    args = Namespace(scaling=2, batch=4, size=[64, 64], reps=1, warmup=1)
    cpu = benchmark.bench_scaling("unet", args, torch.device("cpu"), threads=8)
    assert (cpu["single_threads"], cpu["ddp_threads_per_process"]) == (8, 4)
    assert cpu["single_img_s"] == 4.0
    assert cpu["ddp_img_s"] == pytest.approx(5.0)  # 2 x 4 images in 1.6 s
    assert cpu["efficiency"] == pytest.approx(5.0 / 4.0)  # same 8 threads: ideal = 1 process's
    assert cpu["grad_allreduce_share"] == pytest.approx(0.25)
    assert cpu["sync_bn_share"] is None and cpu["ddp_no_sync_bn_img_s"] is None
    gpu = benchmark.bench_scaling("unet", args, torch.device("cuda"), threads=8)
    assert gpu["efficiency"] == pytest.approx(5.0 / 8.0)  # a GPU each: ideal = 2 x 1 GPU's


def test_scaling_that_cannot_split_the_threads_evenly_is_refused_before_any_work():
    command = [sys.executable, "scripts/benchmark.py", "--scaling", "3", "--device", "cpu"]
    environment = dict(os.environ, OMP_NUM_THREADS="2")
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "--scaling 3 does not split 2 threads evenly; use one of [1, 2]" in result.stderr
