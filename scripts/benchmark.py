"""Measure seg's speed side by side with plain PyTorch loops, in one process.

    python scripts/benchmark.py                       # unet, deeplabv3plus, fcn at 256x512, batch 4
    python scripts/benchmark.py --models unet --size 512 1024 --batch 2 --json bench.json
    python scripts/benchmark.py --default-run         # also time `python train.py` end to end
    python scripts/benchmark.py --models unet --scaling 2   # also 1 process vs 2 under torchrun
    python scripts/benchmark.py --only data           # the data pipeline alone (about a minute)
    python scripts/benchmark.py --models unet --skip-data   # one model, no data section

For each model: (a) seg's training step as the Trainer runs it (precision and channels_last as
`auto` picks them), (b) a plain fp32 loop (model, loss, backward, SGD step: what torchvision's
reference script or Lightning's defaults do), (c) the same plain loop with seg's settings, so
that (a)/(c) is the Trainer's own overhead; (d) end to end: the real DataLoader (train.py's
data=cityscapes dataset and transform, crop --size, workers = cores) over Cityscapes-sized PNGs
feeding the same Trainer, without and with data.cache_dir, and data_bound = step-only img/s /
(d), the step-only figure timed in blocks beside (d) (see ``bench_e2e``); FLOPs per image,
achieved GFLOP/s, peak memory; the machine's fp32/bf16 GEMM ceilings; the data pipeline
(Cityscapes-sized PNGs, random scale/crop/flip, see ``bench_data``) per core, without and with
the decoded-sample cache, against seg's before issue 11 and torchvision.transforms.v2;
evaluation throughput. Medians of --reps timed repetitions after --warmup untimed ones.
--scaling N: seg's training step in one process against N processes under torchrun (DDP), see
``bench_scaling``.
"""

import argparse
import contextlib
import copy
import itertools
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from seg.data.base import read_image, read_mask  # noqa: E402
from seg.data.cityscapes import Cityscapes  # noqa: E402
from seg.data.loader import train_loader  # noqa: E402
from seg.data.synthetic import SyntheticScenes  # noqa: E402
from seg.data.transforms import train_transform  # noqa: E402
from seg.device import usable_cpus  # noqa: E402
from seg.engine.prefetch import DeviceBatches  # noqa: E402
from seg.engine.recorder import Recorder  # noqa: E402
from seg.inference import Normalize, Predictor  # noqa: E402
from seg.optim import build_optimizer  # noqa: E402
from seg.schedulers import poly  # noqa: E402
from seg.tasks.semantic import evaluate  # noqa: E402

NUM_CLASSES = 19  # Cityscapes-sized heads
CITYSCAPES_SIZE = (1024, 2048)  # (height, width) of the PNGs the data figures read


def median_seconds(step, reps: int, warmup: int, sync) -> float:
    return interleaved_medians({"step": step}, reps, warmup, sync)["step"]


def interleaved_medians(steps: dict, reps: int, warmup: int, sync, device: str = "cpu") -> dict:
    """Median seconds of each of ``steps`` over ``reps`` rounds that visit every step in turn,
    so that a slow spell of a shared machine hits all of them alike. In each round a step runs
    once untimed, then once timed: the other steps' oneDNN/cuDNN primitives have pushed its
    own out of the primitive cache, and rebuilding them is warm-up, not speed. The ``warmup``
    steps run one variant at a time and record its peak memory on ``device`` in MiB under
    ``<name>_peak_mib``."""
    result = {}
    for name, step in steps.items():
        with PeakMemory(torch.device(device)) as peak:
            for _ in range(warmup):
                step()
            sync()
        result[f"{name}_peak_mib"] = peak.mib
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            if len(steps) > 1:
                step()
                sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return result | {name: statistics.median(seconds) for name, seconds in times.items()}


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or the process's peak RSS on Linux."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif Path("/proc/self/clear_refs").exists():
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            status = Path("/proc/self/status").read_text()
            self.mib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def gemm_ceiling(
    dtype: torch.dtype, device: torch.device, sync, sizes=(1024, 2048, 4096), repeats: int = 5
) -> float:
    """The machine's GEMM speed in GFLOP/s: the best over square sizes and repeats. One size's
    median underestimates it where that size falls badly on the cores or tiles (a Zen 4 read
    207 GFLOP/s in bf16 at 2048 while a U-Net step achieved 291)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):  # warm-up: kernel choice, caches
            a @ b
        sync()
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def ceiling_share(achieved_gflops: float, ceiling_gflops: float) -> dict:
    """The share of the GEMM ceiling a step achieves, at most 1: above it, the probe
    underestimated the ceiling (``probe_underestimated``), not the step beat the hardware."""
    share = achieved_gflops / ceiling_gflops
    return {"ceiling_share": min(share, 1.0), "probe_underestimated": share > 1}


def overheads(img_s: dict) -> dict:
    """The Trainer's overhead against the plain loop with its settings, like with like:
    ``trainer_overhead`` eager against eager (``seg_eager`` where the Trainer compiles, else
    ``seg``), and where it compiles ``trainer_overhead_compiled``, compiled against compiled."""
    eager = img_s.get("seg_eager", img_s["seg"])
    result = {"trainer_overhead": img_s["plain_same_settings"] / eager - 1}
    if "plain_same_settings_compiled" in img_s:
        result["trainer_overhead_compiled"] = (
            img_s["plain_same_settings_compiled"] / img_s["seg"] - 1
        )
    return result


def busy_share(intervals: list[tuple[float, float]]) -> dict:
    """How busy the device was over ``intervals`` (start, end) of its kernels, in any order:
    the share of the span from the first start to the last end covered by some kernel, and the
    longest gap between kernels (same units as the intervals)."""
    busy, longest_gap, reach = 0.0, 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            longest_gap = max(longest_gap, start - reach) if reach is not None else 0.0
            busy += end - start
            reach = end
        elif end > reach:
            busy += end - reach
            reach = end
    span = reach - min(start for start, _ in intervals) if intervals else 0.0
    return {"busy_share": busy / span if span else 0.0, "longest_gap": longest_gap}


def profile_fit_steps(trainer, batches, steps: int, trace: Path) -> dict:
    """``steps`` training steps as ``Trainer.fit`` runs them (the batch ahead copied on a side
    stream, each step's decision read one step late) under torch's profiler: the trace (open
    it in Perfetto) and the GPU's busy share and longest idle gap (ms) between kernels."""
    from torch.profiler import ProfilerActivity, profile

    stream = DeviceBatches(batches, trainer.device)
    for _ in range(3):  # warm-up: the guard's queue full, allocator and autotuning settled
        trainer.guard.unread.append(trainer.train_step(stream))
        trainer.guard.read(keep=1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            trainer.guard.unread.append(trainer.train_step(stream))
            trainer.guard.read(keep=1)
        torch.cuda.synchronize()
    trainer.guard.read(keep=0)
    profiler.export_chrome_trace(str(trace))
    kernels = [(event.time_range.start, event.time_range.end) for event in profiler.events()
               if event.device_type == torch.autograd.DeviceType.CUDA]  # fmt: skip
    shares = busy_share(kernels)  # microseconds
    return {"gpu_busy_share": shares["busy_share"], "longest_gap_ms": shares["longest_gap"] / 1e3,
            "trace": str(trace)}  # fmt: skip


def compose_train(*overrides: str):
    with initialize_config_module(config_module="seg.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def forward_flops(model: torch.nn.Module, images: torch.Tensor) -> float:
    """FLOPs of one forward pass per image. Training is counted as 3x forward: the flop
    counter overcounts the backward of grouped/depthwise convolutions (PERF_NOTES)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images[:1])
    model.train()
    return counter.get_total_flops()


def plain_step(model, optimizer, images, masks, autocast_dtype):
    """What a plain PyTorch loop does: forward, cross-entropy (plus 0.5 x the auxiliary head's,
    as torchvision's reference script does for FCN/DeepLabV3), backward, optimizer step."""
    with torch.autocast(
        images.device.type, autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        logits, aux = model(images, with_aux=True)
    loss = F.cross_entropy(logits.float(), masks, ignore_index=255)
    if aux is not None:
        loss = loss + 0.5 * F.cross_entropy(aux.float(), masks, ignore_index=255)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_config(name: str, device, *overrides: str):
    """train.py's config for model ``name`` with Cityscapes-sized heads and SGD."""
    return compose_train(f"model={name}", f"data.num_classes={NUM_CLASSES}", "data=cityscapes",
                         "optimizer=sgd", f"trainer.device={device}", *overrides)  # fmt: skip


def make_trainer(cfg, model: torch.nn.Module, sync_bn: bool | str = "auto", class_names=None):
    """seg's Trainer as train.py builds it from ``cfg``, writing nothing; ``class_names``
    default to the Cityscapes-sized heads' 19."""
    names = list(class_names or [str(i) for i in range(NUM_CLASSES)])
    optimizer = build_optimizer(cfg.optimizer, model)
    recorder = Recorder(tempfile.mkdtemp(), names, [[0, 0, 0]] * len(names), write=False)
    return instantiate(
        cfg.trainer, model=model, task=instantiate(cfg.task), optimizer=optimizer,
        scheduler=poly(optimizer, max_iters=10_000), recorder=recorder, sync_bn=sync_bn,
    )  # fmt: skip


def random_batch(batch: int, height: int, width: int, seed: int):
    """(images, masks) as seg's datasets give them: uint8 RGB (N, 3, H, W), uint8 (N, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, height, width), generator=generator,
                           dtype=torch.uint8)  # fmt: skip
    masks = torch.randint(0, NUM_CLASSES, (batch, height, width), generator=generator,
                          dtype=torch.uint8)  # fmt: skip
    return images, masks


def bench_model(name: str, args, device, sync, ceilings: dict) -> dict:
    cfg = train_config(name, device)
    torch.manual_seed(0)
    template = instantiate(cfg.model)
    images, masks = random_batch(args.batch, *args.size, seed=0)
    # The plain loops get float32 inputs, normalized beforehand as torchvision's reference
    # pipeline does on the CPU; seg's step normalizes the uint8 batch on its device.
    inputs = Normalize(cfg.data.mean, cfg.data.std, torch.device("cpu"))(images)
    flops_per_image = 3 * forward_flops(template, inputs)
    result = {"flops_per_image": flops_per_image}

    # (a) seg's Trainer step, with the settings precision=auto / channels_last=auto /
    # compile=auto choose (compile is on on CUDA)
    trainer = make_trainer(cfg, copy.deepcopy(template))
    batches = itertools.repeat((images, masks))  # the same batch forever, already in memory
    steps = {"seg": lambda: trainer.train_step(batches)}
    compiled = trainer.compiled is not None
    result |= {"precision": trainer.precision, "channels_last": trainer.channels_last,
               "compiled": compiled}  # fmt: skip
    if compiled:  # the eager Trainer too, for the eager plain loops to compare with
        eager_cfg = train_config(name, device, "trainer.compile=false")
        eager_trainer = make_trainer(eager_cfg, copy.deepcopy(template))
        steps["seg_eager"] = lambda: eager_trainer.train_step(batches)

    # (b) plain fp32, contiguous; (c) plain with seg's precision and layout, compiled too where
    # seg's step is. All use the same optimizer (SGD, momentum, weight decay) as (a), so that
    # (a)/(c) is the Trainer's own cost.
    dtype = (
        None
        if trainer.precision == "fp32"
        else {"bf16": torch.bfloat16, "fp16": torch.float16}[trainer.precision]
    )
    variants = {
        "plain_fp32": (None, torch.contiguous_format, False),
        "plain_same_settings": (dtype, trainer.memory_format, False),
    }
    if compiled:
        variants["plain_same_settings_compiled"] = (dtype, trainer.memory_format, True)
    for key, (autocast_dtype, memory_format, compile_it) in variants.items():
        model = copy.deepcopy(template).to(device, memory_format=memory_format)
        optimizer = build_optimizer(cfg.optimizer, model)
        forward = torch.compile(model) if compile_it else model
        x = inputs.to(device, memory_format=memory_format)
        y = masks.to(device).long()
        steps[key] = lambda m=forward, o=optimizer, d=autocast_dtype, x=x, y=y: plain_step(
            m, o, x, y, d
        )
    timings = interleaved_medians(steps, args.reps, args.warmup, sync, device)
    for key in steps:
        result[f"{key}_img_s"] = args.batch / timings[key]
        result[f"{key}_peak_mib"] = timings[f"{key}_peak_mib"]
    result["speedup_vs_plain_fp32"] = result["seg_img_s"] / result["plain_fp32_img_s"]
    result |= overheads({key: result[f"{key}_img_s"] for key in steps})
    result["achieved_gflops"] = flops_per_image * result["seg_img_s"] / 1e9
    # fp16 against the bf16 probe: the same tensor-core and AVX-512 rates where both exist
    ceiling = ceilings[f"{'fp32' if dtype is None else 'bf16'}_gemm_gflops"]
    result |= ceiling_share(result["achieved_gflops"], ceiling)

    # (d) end to end: the real input path feeding the same Trainer, without and with the cache
    result |= bench_e2e(cfg, trainer, batches, args, device, sync)

    if args.compile:
        result["compile"] = bench_compile(
            copy.deepcopy(template), inputs, masks.long(), trainer, args, sync
        )

    if args.trace is not None and device.type == "cuda":
        pinned = itertools.repeat((images.pin_memory(), masks.pin_memory()))
        result["profile"] = profile_fit_steps(trainer, pinned, 10, args.trace / f"{name}.json")
        print(f"{name}: GPU busy {100 * result['profile']['gpu_busy_share']:.1f}% of 10 steps, "
              f"longest gap {result['profile']['longest_gap_ms']:.2f} ms", flush=True)  # fmt: skip

    # evaluation: whole-image inference + metric accumulation, as validation runs it
    predictor = Predictor(trainer.model, trainer.device, trainer.task.mean, trainer.task.std,
                          trainer.precision, trainer.channels_last)  # fmt: skip
    eval_batches = [(images, masks)] * args.eval_batches
    evaluate(predictor, _Batches(eval_batches[:1]), NUM_CLASSES, 255)  # warm-up
    start = time.perf_counter()
    evaluate(predictor, _Batches(eval_batches), NUM_CLASSES, 255)
    sync()
    result["eval_img_s"] = args.batch * args.eval_batches / (time.perf_counter() - start)
    return result


def loader_workers() -> int:
    """DataLoader workers for the end-to-end figure: one per core this process may use."""
    return usable_cpus()


def bench_e2e(cfg, trainer, batches, args, device, sync) -> dict:
    """seg's Trainer fed as ``fit`` feeds it, beside the step alone: img/s and data_bound.

    The input path: train.py's dataset and training transform of ``cfg`` (data=cityscapes, crop
    --size) over ``args.data_images`` Cityscapes-sized PNG pairs, ``train_loader`` with workers =
    cores, pinned memory on a GPU, ``DeviceBatches`` one batch ahead, batch --batch; without a
    cache (``e2e``) and with data.cache_dir (``e2e_cached``, warm: every sample is cached before,
    its cold first pass left out). The step alone (``step``) trains on figure (a)'s in-memory
    ``batches`` with no loader alive, as figure (a) does; all with (a)'s ``trainer``.

    The blocks run step, e2e, cached, cached, e2e, step, so that a linear drift of a shared
    machine's speed cancels; each figure is the mean of its two blocks and data_bound is
    step / e2e. An end-to-end block starts a loader, trains ``args.warmup`` + workers untimed
    steps (worker start-up, the first batch of each worker), then times max(2 x --reps,
    4 x workers) steps from first to last, waits for data included (a median would hide them)."""
    workers = loader_workers()
    transform = instantiate(cfg.data.train_transform, crop_size=list(args.size))
    datasets = {
        name: instantiate(cfg.data.dataset, root=str(cityscapes_tree(args)), split="train",
                          transform=transform, cache_dir=cache_dir)
        for name, cache_dir in (("e2e", None), ("e2e_cached", str(args.work_dir / "cache")))
    }  # fmt: skip
    fill_cache(datasets["e2e_cached"])

    def block(name: str) -> float:
        if name == "step":
            source, untimed, timed = batches, args.warmup, args.reps
        else:
            pin = device.type == "cuda"
            loader = train_loader(datasets[name], args.batch, workers, seed=0, pin_memory=pin)
            source = DeviceBatches(iter(loader), trainer.device)
            untimed, timed = args.warmup + workers, max(2 * args.reps, 4 * workers)
        for _ in range(untimed):
            trainer.train_step(source)
        sync()
        start = time.perf_counter()
        for _ in range(timed):
            trainer.train_step(source)
        sync()
        return timed * args.batch / (time.perf_counter() - start)  # the loader ends with it

    rates = {"step": [], "e2e": [], "e2e_cached": []}
    for name in ("step", "e2e", "e2e_cached", "e2e_cached", "e2e", "step"):
        rates[name].append(block(name))
    result = {f"{name}_img_s": statistics.mean(values) for name, values in rates.items()}
    result["e2e_step_only_img_s"] = result.pop("step_img_s")
    for suffix in ("", "_cached"):
        result[f"data_bound{suffix}"] = result["e2e_step_only_img_s"] / result[f"e2e{suffix}_img_s"]
    return result | {"e2e_workers": workers}


class _Batches(list):
    """A list of batches that ``evaluate`` can name samples of."""

    @property
    def dataset(self):
        return range(sum(len(images) for images, _ in self))


def bench_compile(model, images, masks, trainer, args, sync) -> dict:
    """torch.compile on seg's settings: compile time and steady-state speed."""
    model = model.to(trainer.device, memory_format=trainer.memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    compiled = torch.compile(model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trainer.precision)
    x = images.to(trainer.device, memory_format=trainer.memory_format)
    masks = masks.to(trainer.device)
    start = time.perf_counter()
    plain_step(compiled, optimizer, x, masks, dtype)
    sync()
    compile_seconds = time.perf_counter() - start
    seconds = median_seconds(
        lambda: plain_step(compiled, optimizer, x, masks, dtype), args.reps, args.warmup, sync
    )
    return {"compile_seconds": compile_seconds, "img_s": args.batch / seconds}


def bench_scaling(name: str, args, device: torch.device, threads: int) -> dict:
    """img/s of seg's training step in one process (as ``python train.py``) against
    ``args.scaling`` processes under torchrun (DDP: gloo on the CPU, NCCL on GPUs): the same
    model, batch per process and size. A launch's figure is the median of ``args.reps`` steps,
    each timed to the slowest rank; each run's figure is the median over its launches.

    On the CPU the processes split the one process's ``threads`` evenly, so the ideal N-process
    throughput is the 1-process one and efficiency = img/s(N) / img/s(1). On GPUs each process
    drives a GPU of its own: the ideal is N x img/s(1). ``--scaling 1`` shows DDP's own cost
    (on a GPU: NCCL initialised, world size 1). Shares: the part of the N-process step that
    goes away without DDP's gradient all-reduce, and without SyncBatchNorm; and the N-process
    img/s with ``trainer.sync_bn=false``, the option that trades it for per-process statistics.
    """
    processes = args.scaling
    runs = {"single": (None, threads), "ddp": (processes, threads // processes)}
    launches = {"single": [], "ddp": []}
    # 1, N, N, 1: each launch times its steps back to back, so the order of the launches is
    # what puts them side by side; a linear drift of the machine's speed cancels.
    for run in ("single", "ddp", "ddp", "single"):
        launches[run].append(run_worker(name, args, device, *runs[run]))

    def step_s(run: str, variant: str = "seg") -> float:
        return statistics.median(launch["seconds"][variant] for launch in launches[run])

    single, ddp = launches["single"][0], launches["ddp"][0]
    result = {
        "processes": processes, "backend": ddp["backend"], "batch_per_process": args.batch,
        "precision": ddp["precision"], "channels_last": ddp["channels_last"],
        "single_threads": single["threads"], "ddp_threads_per_process": ddp["threads"],
        "single_step_s": step_s("single"), "ddp_step_s": step_s("ddp"),
        "single_img_s": args.batch / step_s("single"),
        "ddp_img_s": processes * args.batch / step_s("ddp"),
        "step_s_per_launch": {run: [launch["seconds"]["seg"] for launch in launches[run]]
                              for run in launches},
    }  # fmt: skip
    result["ideal_img_s"] = result["single_img_s"] * (processes if device.type == "cuda" else 1)
    result["efficiency"] = result["ddp_img_s"] / result["ideal_img_s"]
    for variant, key in (("no_grad_allreduce", "grad_allreduce_share"),
                         ("no_sync_bn", "sync_bn_share")):  # fmt: skip
        measured = variant in ddp["seconds"]
        result[key] = 1 - step_s("ddp", variant) / step_s("ddp") if measured else None
    result["ddp_no_sync_bn_img_s"] = (
        processes * args.batch / step_s("ddp", "no_sync_bn") if "no_sync_bn" in ddp["seconds"]
        else None
    )  # fmt: skip
    return result


def run_worker(name: str, args, device: torch.device, nproc_per_node: int | None,
               threads: int) -> dict:  # fmt: skip
    """One launch of scripts/scaling_worker.py (its JSON) with ``threads`` threads per process:
    alone (``nproc_per_node=None``) or under torchrun."""
    launcher = [sys.executable]
    if nproc_per_node is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={nproc_per_node}"]  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "result.json"
        command = [
            *launcher, str(REPO / "scripts" / "scaling_worker.py"), "--model", name,
            "--size", *map(str, args.size), "--batch", str(args.batch), "--reps", str(args.reps),
            "--warmup", str(args.warmup), "--device", str(device), "--out", str(out),
        ]  # fmt: skip
        # OMP_NUM_THREADS, not torch.set_num_threads: how a user splits the cores for torchrun.
        environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
        done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(
                f"{shlex.join(command)} failed with exit code {done.returncode}:\n"
                + (done.stdout + done.stderr)[-4000:]
            )
        return json.loads(out.read_text())


def print_scaling(name: str, result: dict) -> None:
    n = result["processes"]
    layout = ", channels_last" if result["channels_last"] else ""
    rows = [
        ("processes x threads", "img/s", "step s"),
        (f"1 x {result['single_threads']}", f"{result['single_img_s']:.2f}",
         f"{result['single_step_s']:.3f}"),
        (f"{n} x {result['ddp_threads_per_process']} ({result['backend']}, DDP)",
         f"{result['ddp_img_s']:.2f}", f"{result['ddp_step_s']:.3f}"),
    ]  # fmt: skip
    if result["ddp_no_sync_bn_img_s"] is not None:
        rows.append(("  same, sync_bn=false", f"{result['ddp_no_sync_bn_img_s']:.2f}",
                     f"{n * result['batch_per_process'] / result['ddp_no_sync_bn_img_s']:.3f}"))  # fmt: skip
    no_sync_bn = (
        f", sync_bn=false {100 * result['ddp_no_sync_bn_img_s'] / result['ideal_img_s']:.0f}%"
        if result["ddp_no_sync_bn_img_s"] is not None
        else ""
    )
    shares = [
        f", {label} {100 * result[key]:.0f}% of the {n}-process step"
        for key, label in (("grad_allreduce_share", "gradient all-reduce"),
                           ("sync_bn_share", "SyncBatchNorm"))
        if result[key] is not None
    ]  # fmt: skip
    print(
        f"scaling {name} ({result['precision']}{layout}, batch {result['batch_per_process']} "
        "per process):\n"
        + "".join(f"  {a:<24}{b:>8}{c:>9}\n" for a, b, c in rows)
        + f"  efficiency {100 * result['efficiency']:.0f}%{no_sync_bn} (ideal "
        f"{result['ideal_img_s']:.2f} img/s)" + "".join(shares),
        flush=True,
    )
    # Launches of one run that disagree mean another program took cores during one of them.
    for run, seconds in result["step_s_per_launch"].items():
        if max(seconds) > 1.15 * min(seconds):
            print(f"  warning: the {run} launches took {', '.join(f'{s:.3f}' for s in seconds)} "
                  "s per step: the machine was busy during one of them; rerun", flush=True)  # fmt: skip


class TorchvisionPipeline(Dataset):
    """The same augmentation with torchvision.io + transforms.v2 on tensors (masks as Mask), to
    seg's contract: uint8 images and masks, normalized on the device (issue 11). It maps no
    label ids and checks no labels: less work than seg's pipeline does."""

    def __init__(self, samples, crop, scale_range):
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.samples = samples
        self.tv_tensors = tv_tensors
        self.transform = v2.Compose([
            v2.RandomResize(int(CITYSCAPES_SIZE[0] * scale_range[0]),
                            int(CITYSCAPES_SIZE[0] * scale_range[1])),  # the short side
            v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}),
            v2.RandomHorizontalFlip(),
        ])  # fmt: skip

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        from torchvision.io import decode_png, read_file

        image_path, label_path = self.samples[index]
        image = self.tv_tensors.Image(decode_png(read_file(str(image_path))))
        mask = self.tv_tensors.Mask(decode_png(read_file(str(label_path)))[0])
        image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def previous_train_transform(crop, ignore_index: int, scale_range) -> A.Compose:
    """seg's training transform before issue 11, kept here to measure against: scale the whole
    image, pad, crop, flip, then normalize to float32 on the CPU."""
    low, high = scale_range
    return A.Compose([
        A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0),
        A.PadIfNeeded(min_height=crop[0], min_width=crop[1], position="top_left",
                      border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index),
        A.RandomCrop(height=crop[0], width=crop[1]),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.0),
        A.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ToTensorV2(),
    ])  # fmt: skip


class PreviousCityscapes(Cityscapes):
    """Cityscapes as seg prepared it before issue 11: labels mapped by indexing, the previous
    transform, float32 (3, H, W) images and int64 masks."""

    def prepare(self, index, seed):
        image, mask = self.load(index)
        mask = self.label_map[mask]
        self.check_labels(mask, index)
        self.transform.set_random_state(np.random.default_rng(seed), random.Random(hash(seed)))
        out = self.transform(image=image, mask=mask)
        return out["image"], torch.as_tensor(np.asarray(out["mask"]), dtype=torch.int64)


def cityscapes_tree(args) -> Path:
    """The PNG tree that the data and end-to-end figures read (``args.data_images`` pairs of
    ``CITYSCAPES_SIZE``), written under ``args.work_dir`` on first use."""
    root = args.work_dir / "cityscapes"
    if not root.exists():
        write_cityscapes_tree(root, args.data_images)
    return root


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch and OpenCV on one thread each: a core's worth, what a DataLoader worker gets."""
    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)


def fill_cache(dataset) -> None:
    """Read every sample of ``dataset`` once (with data.cache_dir: decoded and written, the cold
    first pass), on one thread."""
    with one_thread():
        for index in range(len(dataset)):
            dataset[(index, 0, index)]


def cold_pass(cached, uncached) -> dict:
    """The cache's first pass against no cache, on one thread: sample by sample in turn, each
    sample of ``cached`` (decoded, mapped, checked, written to data.cache_dir, transformed) right
    after the same sample of ``uncached`` (the same but the write); samples per second (medians)."""
    seconds = {"uncached": [], "cold": []}
    with one_thread():
        for index in range(len(cached)):
            for name, dataset in (("uncached", uncached), ("cold", cached)):
                start = time.perf_counter()
                dataset[(index, 0, index)]
                seconds[name].append(time.perf_counter() - start)
    return {name: 1 / statistics.median(values) for name, values in seconds.items()}


def write_cityscapes_tree(root: Path, count: int) -> None:
    """``count`` image/labelIds pairs of ``CITYSCAPES_SIZE`` in the official layout, upscaled
    synthetic scenes (smooth regions compress like photos do, unlike noise)."""
    scenes = SyntheticScenes("train", image_size=256, num_classes=6)
    ids = np.array([7, 8, 11, 21, 23, 26], np.uint8)  # road, sidewalk, building, ... car
    for i in range(count):
        image, mask = scenes.load(i)
        height, width = CITYSCAPES_SIZE
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        labels = cv2.resize(ids[mask], (width, height), interpolation=cv2.INTER_NEAREST)
        name = f"bench_{i:06d}_000019"
        for folder, suffix, array in (
            ("leftImg8bit", "leftImg8bit", image),
            ("gtFine", "gtFine_labelIds", labels),
        ):
            path = root / folder / "train" / "bench" / f"{name}_{suffix}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


def data_loader(dataset, workers: int, batch_size: int = 2) -> DataLoader:
    if isinstance(dataset, Cityscapes):  # seg's: the endless, seeded training order
        return train_loader(dataset, batch_size, workers, seed=0)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=True,
                      sampler=torch.utils.data.RandomSampler(dataset, num_samples=10**9),
                      persistent_workers=workers > 0)  # fmt: skip


def loader_img_s(dataset, workers: int, batches: int, batch_size: int) -> float:
    iterator = iter(data_loader(dataset, workers, batch_size))
    next(iterator)  # start-up (workers, first decode) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def pipeline_img_s_per_core(pipelines: dict, rounds: int, batches: int) -> dict:
    """Samples per second of each pipeline in this process (DataLoader, 0 workers, batches of
    2, collation included) on one thread of torch and OpenCV: a core's worth, which is what a
    DataLoader worker gets. Each round times ``batches`` batches of every pipeline in turn, so
    that a slow spell of a shared machine hits all of them alike; the figure is the median
    over rounds, after one untimed batch each."""
    with one_thread():
        iterators = {name: iter(data_loader(dataset, 0)) for name, dataset in pipelines.items()}
        for iterator in iterators.values():
            next(iterator)
        seconds = {name: [] for name in pipelines}
        for _ in range(rounds):
            for name, iterator in iterators.items():
                start = time.perf_counter()
                for _ in range(batches):
                    next(iterator)
                seconds[name].append(time.perf_counter() - start)
    return {name: 2 * batches / statistics.median(seconds[name]) for name in pipelines}


def decode_ms(samples, reps: int = 5) -> dict:
    """Milliseconds to decode one image and one label file of ``samples`` (median, one thread):
    the part of a sample's time that no transform can save."""
    times = {"image": [], "mask": []}
    with one_thread():
        for _ in range(reps):
            for image_path, mask_path in samples:
                for kind, read, path in (("image", read_image, image_path),
                                         ("mask", read_mask, mask_path)):  # fmt: skip
                    start = time.perf_counter()
                    read(path)
                    times[kind].append(1000 * (time.perf_counter() - start))
    return {kind: statistics.median(values) for kind, values in times.items()}


def bench_data(args) -> dict:
    """Cityscapes-sized training samples (2048x1024 PNG + labelIds, scale 0.5-2, crop 512x1024,
    flip): seg's pipeline, the same with data.cache_dir (warm: its cold first pass, timed alone,
    is left out of the per-core figure), seg's pipeline before issue 11 and
    torchvision.transforms.v2, per core and with 2 DataLoader workers."""
    crop, scale_range = (CITYSCAPES_SIZE[0] // 2, CITYSCAPES_SIZE[1] // 2), (0.5, 2.0)
    root, cache_dir = cityscapes_tree(args), args.work_dir / "cache-data"
    seg_set = Cityscapes(str(root), "train", transform=train_transform(crop, 255, scale_range))
    cached = Cityscapes(str(root), "train", transform=train_transform(crop, 255, scale_range),
                        cache_dir=str(cache_dir))  # fmt: skip
    cold = cold_pass(cached, seg_set)  # fills the cache
    before = PreviousCityscapes(str(root), "train",
                                transform=previous_train_transform(crop, 255, scale_range))  # fmt: skip
    tv_set = TorchvisionPipeline(seg_set.samples, crop, scale_range)
    result = {  # DataLoader with 2 worker processes, default threads
        f"{name}_img_s_2_workers": loader_img_s(dataset, 2, args.data_batches, 2)
        for name, dataset in (("seg", seg_set), ("seg_cached", cached), ("torchvision_v2", tv_set))
    }
    per_core = pipeline_img_s_per_core(
        {"seg": seg_set, "seg_cached": cached, "seg_before_issue_11": before,
         "torchvision_v2": tv_set},
        args.data_rounds, batches=3,
    )  # fmt: skip
    cache_bytes = sum(path.stat().st_size for path in cache_dir.rglob("*.npy"))
    # The same two seg pipelines on samples decoded beforehand: the work this issue changed
    # (label mapping, augmentation, conversion, collation), without the decode.
    decoded = [seg_set.load(i) for i in range(min(4, len(seg_set)))]
    for dataset in (seg_set, before):
        dataset.samples = dataset.samples[: len(decoded)]
        dataset.load = decoded.__getitem__  # an instance attribute: replaces the method
    after_decode = pipeline_img_s_per_core(
        {"seg": seg_set, "seg_before_issue_11": before}, args.data_rounds, batches=3
    )
    return result | {
        "pipeline_img_s_per_core": per_core,
        "speedup_vs_before": per_core["seg"] / per_core["seg_before_issue_11"],
        "speedup_vs_torchvision_v2": per_core["seg"] / per_core["torchvision_v2"],
        "cache_speedup": per_core["seg_cached"] / per_core["seg"],
        "cache_speedup_vs_before": per_core["seg_cached"] / per_core["seg_before_issue_11"],
        "cache_speedup_vs_torchvision_v2": per_core["seg_cached"] / per_core["torchvision_v2"],
        # the first pass (decode, map, check, write, transform), and no cache beside it
        "cache_cold_img_s_per_core": cold["cold"],
        "cache_cold_slowdown": cold["uncached"] / cold["cold"],
        "cache_mb_per_sample": cache_bytes / len(cached) / 1e6,
        "decode_ms_per_core": decode_ms(tv_set.samples[:4]),
        "after_decode_ms_per_core": {name: 1000 / v for name, v in after_decode.items()},
    }


def print_data(result: dict) -> None:
    per_core, decode = result["pipeline_img_s_per_core"], result["decode_ms_per_core"]
    after_decode = result["after_decode_ms_per_core"]
    print(
        "data pipeline, img/s per core: "
        + ", ".join(f"{name} {value:.1f}" for name, value in per_core.items())
        + f" (x{result['speedup_vs_before']:.2f} vs before issue 11, "
        f"x{result['speedup_vs_torchvision_v2']:.2f} vs torchvision v2; cached x"
        f"{result['cache_speedup']:.2f} vs seg, x{result['cache_speedup_vs_before']:.2f} vs before, "
        f"x{result['cache_speedup_vs_torchvision_v2']:.2f} vs torchvision v2; its cold first pass "
        f"{result['cache_cold_img_s_per_core']:.1f}, x{result['cache_cold_slowdown']:.2f} the time "
        f"of no cache, {result['cache_mb_per_sample']:.1f} MB of disk per sample); per sample: decode "
        f"{decode['image']:.1f} ms image + {decode['mask']:.1f} ms labels, then seg "
        f"{after_decode['seg']:.1f} ms (before issue 11: {after_decode['seg_before_issue_11']:.1f}"
        f" ms); 2 workers: seg {result['seg_img_s_2_workers']:.1f}, cached "
        f"{result['seg_cached_img_s_2_workers']:.1f}, torchvision v2 "
        f"{result['torchvision_v2_img_s_2_workers']:.1f} img/s",
        flush=True,
    )


def default_run() -> dict:
    """`python train.py` end to end: wall time and the share outside training/validation steps."""
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        subprocess.run([sys.executable, "train.py", f"hydra.run.dir={directory}"], cwd=REPO, check=True,
                       capture_output=True)  # fmt: skip
        wall = time.perf_counter() - start
        text = (Path(directory) / "train.log").read_text()
    match = re.search(r"Time: ([\d.]+) s training steps, ([\d.]+) s validation", text)
    train_s, val_s = float(match.group(1)), float(match.group(2))
    miou = float(re.findall(r"best val mIoU ([\d.]+)", text)[-1])
    return {"wall_s": wall, "train_steps_s": train_s, "validation_s": val_s,
            "outside_share": 1 - (train_s + val_s) / wall, "best_val_mIoU": miou}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["unet", "deeplabv3plus", "fcn"])
    parser.add_argument("--size", nargs=2, type=int, default=[256, 512], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eval-batches", type=int, default=5)
    parser.add_argument("--data-images", type=int, default=12)
    parser.add_argument("--data-batches", type=int, default=10, help="with 2 workers")
    parser.add_argument("--data-rounds", type=int, default=10, help="per core: 6 samples each")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--trace", type=Path, metavar="DIR",
                        help="CUDA: profile 10 Trainer steps, write <model>.json traces here")  # fmt: skip
    parser.add_argument("--only", choices=["data"], help="run this section alone")
    parser.add_argument("--default-run", action="store_true", help="time `python train.py` too")
    parser.add_argument("--scaling", type=int, metavar="N",
                        help="also time 1 process vs N under torchrun (CPU: threads split evenly)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args()
    if args.only == "data":
        args.models, args.skip_data, args.scaling = [], False, None
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if args.scaling is not None:  # refused before the minutes of the other sections
        if args.scaling < 1:
            parser.error(f"--scaling {args.scaling}: give a number of processes, 1 or more")
        if device.type == "cuda" and args.scaling > torch.cuda.device_count():
            parser.error(f"--scaling {args.scaling} needs one GPU per process; this machine "
                         f"has {torch.cuda.device_count()}")  # fmt: skip
        if device.type == "cpu" and threads % args.scaling:
            divisors = [n for n in range(1, threads + 1) if threads % n == 0]
            parser.error(f"--scaling {args.scaling} does not split {threads} threads evenly; "
                         f"use one of {divisors}, or set OMP_NUM_THREADS")  # fmt: skip
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    report = {
        "machine": {
            "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
        },
        "settings": {"size": args.size, "batch": args.batch, "reps": args.reps, "warmup": args.warmup},
    }  # fmt: skip
    if args.models:
        report["ceilings"] = {
            "fp32_gemm_gflops": gemm_ceiling(torch.float32, device, sync),
            "bf16_gemm_gflops": gemm_ceiling(torch.bfloat16, device, sync),
        }
        print(f"GEMM ceilings: fp32 {report['ceilings']['fp32_gemm_gflops']:.0f}, "
              f"bf16 {report['ceilings']['bf16_gemm_gflops']:.0f} GFLOP/s", flush=True)  # fmt: skip
    # The Cityscapes-sized PNGs and the caches that the data and end-to-end figures read
    args.work_dir = Path(tempfile.mkdtemp(prefix="seg-benchmark-"))
    if args.trace is not None:
        args.trace.mkdir(parents=True, exist_ok=True)
    try:
        report["train"] = {}
        for name in args.models:
            result = bench_model(name, args, device, sync, report["ceilings"])
            report["train"][name] = result
            report.setdefault("eval", {})[name] = {"img_s": result.pop("eval_img_s")}
            print(
                f"{name:>14}: seg {result['seg_img_s']:.2f} img/s ({result['precision']}"
                f"{', channels_last' if result['channels_last'] else ''}), plain fp32 "
                f"{result['plain_fp32_img_s']:.2f}, plain same settings {result['plain_same_settings_img_s']:.2f}"
                f" -> x{result['speedup_vs_plain_fp32']:.2f}, overhead {100 * result['trainer_overhead']:+.1f}% "
                "(eager vs eager)"
                + (
                    f", compiled {result['seg_img_s']:.2f} img/s vs plain compiled "
                    f"{result['plain_same_settings_compiled_img_s']:.2f}, overhead "
                    f"{100 * result['trainer_overhead_compiled']:+.1f}%"
                    if result["compiled"]
                    else ""
                )
                + f", {result['achieved_gflops']:.0f} GFLOP/s ({100 * result['ceiling_share']:.0f}% of "
                "the GEMM ceiling"
                + (
                    ", capped: the probe underestimated it"
                    if result["probe_underestimated"]
                    else ""
                )
                + f"), peak {result['seg_peak_mib']:.0f} MiB; "
                f"end to end ({result['e2e_workers']} workers) {result['e2e_img_s']:.2f} img/s, "
                f"cached {result['e2e_cached_img_s']:.2f}, step alone beside them "
                f"{result['e2e_step_only_img_s']:.2f}: data_bound {result['data_bound']:.2f}, cached "
                f"{result['data_bound_cached']:.2f}; "
                f"eval {report['eval'][name]['img_s']:.2f} img/s",
                flush=True,
            )
        if args.scaling is not None:
            report["scaling"] = {}
            for name in args.models:
                report["scaling"][name] = bench_scaling(name, args, device, threads)
                print_scaling(name, report["scaling"][name])
        if not args.skip_data:
            report["data"] = bench_data(args)
            print_data(report["data"])
        if args.default_run:
            report["default_run"] = default_run()
            print(
                "default run: "
                + ", ".join(f"{k} {v:.3f}" for k, v in report["default_run"].items()),
                flush=True,
            )
    finally:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
