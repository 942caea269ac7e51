"""Measure seg's speed side by side with plain PyTorch loops, in one process.

    python scripts/benchmark.py                       # unet, deeplabv3plus, fcn at 256x512, batch 4
    python scripts/benchmark.py --models unet --size 512 1024 --batch 2 --json bench.json
    python scripts/benchmark.py --default-run         # also time `python train.py` end to end
    python scripts/benchmark.py --models unet --scaling 2   # also 1 process vs 2 under torchrun

For each model: (a) seg's training step as the Trainer runs it (precision and channels_last as
`auto` picks them), (b) a plain fp32 loop (model, loss, backward, SGD step: what torchvision's
reference script or Lightning's defaults do), (c) the same plain loop with seg's settings, so
that (a)/(c) is the Trainer's own overhead; FLOPs per image, achieved GFLOP/s, peak memory; the
machine's fp32/bf16 GEMM ceilings; the data pipeline (Cityscapes-sized PNGs, random
scale/crop/flip/normalize) against torchvision.transforms.v2; evaluation throughput. Medians of
--reps timed repetitions after --warmup untimed ones. --scaling N: seg's training step in one
process against N processes under torchrun (DDP), see ``bench_scaling``.
"""

import argparse
import copy
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from seg.data.cityscapes import Cityscapes  # noqa: E402
from seg.data.loader import train_loader  # noqa: E402
from seg.data.synthetic import SyntheticScenes  # noqa: E402
from seg.data.transforms import train_transform  # noqa: E402
from seg.engine.evaluation import evaluate  # noqa: E402
from seg.engine.recorder import Recorder  # noqa: E402
from seg.inference import Predictor  # noqa: E402
from seg.schedulers import poly  # noqa: E402

NUM_CLASSES = 19  # Cityscapes-sized heads


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


def gemm_ceiling(dtype: torch.dtype, device: torch.device, sync, n: int = 2048) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, reps=5, warmup=2, sync=sync)
    return 2 * n**3 / seconds / 1e9


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


def train_config(name: str, device):
    """train.py's config for model ``name`` with Cityscapes-sized heads and SGD."""
    return compose_train(f"model={name}", f"data.num_classes={NUM_CLASSES}", "data=cityscapes",
                         "optimizer=sgd", f"trainer.device={device}")  # fmt: skip


def make_trainer(cfg, model: torch.nn.Module, sync_bn: bool | str = "auto"):
    """seg's Trainer as train.py builds it from ``cfg``, writing nothing."""
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    recorder = Recorder(
        tempfile.mkdtemp(),
        [str(i) for i in range(NUM_CLASSES)],
        [[0, 0, 0]] * NUM_CLASSES,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        write=False,
    )
    return instantiate(
        cfg.trainer, model=model, loss_fn=instantiate(cfg.loss), optimizer=optimizer,
        scheduler=poly(optimizer, max_iters=10_000), recorder=recorder, ignore_index=255,
        sync_bn=sync_bn,
    )  # fmt: skip


def bench_model(name: str, args, device, sync) -> dict:
    cfg = train_config(name, device)
    torch.manual_seed(0)
    template = instantiate(cfg.model)
    height, width = args.size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, height, width, generator=generator)
    masks = torch.randint(0, NUM_CLASSES, (args.batch, height, width), generator=generator)
    flops_per_image = 3 * forward_flops(template, images)
    result = {"flops_per_image": flops_per_image}

    # (a) seg's Trainer step, with the settings precision=auto / channels_last=auto choose
    trainer = make_trainer(cfg, copy.deepcopy(template))
    batches = iter(lambda: (images, masks), None)  # the same batch forever, already in memory
    steps = {"seg": lambda: trainer.train_step(batches)}
    result |= {"precision": trainer.precision, "channels_last": trainer.channels_last}

    # (b) plain fp32, contiguous; (c) plain with seg's precision and layout. Both use the same
    # optimizer (SGD, momentum, weight decay) as (a), so that (a)/(c) is the Trainer's own cost.
    dtype = (
        None
        if trainer.precision == "fp32"
        else {"bf16": torch.bfloat16, "fp16": torch.float16}[trainer.precision]
    )
    variants = {
        "plain_fp32": (None, torch.contiguous_format),
        "plain_same_settings": (dtype, trainer.memory_format),
    }
    for key, (autocast_dtype, memory_format) in variants.items():
        model = copy.deepcopy(template).to(device, memory_format=memory_format)
        optimizer = instantiate(cfg.optimizer)(params=model.parameters())
        x = images.to(device, memory_format=memory_format)
        y = masks.to(device)
        steps[key] = lambda m=model, o=optimizer, d=autocast_dtype, x=x, y=y: plain_step(
            m, o, x, y, d
        )
    timings = interleaved_medians(steps, args.reps, args.warmup, sync, device)
    for key in steps:
        result[f"{key}_img_s"] = args.batch / timings[key]
        result[f"{key}_peak_mib"] = timings[f"{key}_peak_mib"]
    result["speedup_vs_plain_fp32"] = result["seg_img_s"] / result["plain_fp32_img_s"]
    result["trainer_overhead"] = result["plain_same_settings_img_s"] / result["seg_img_s"] - 1
    result["achieved_gflops"] = flops_per_image * result["seg_img_s"] / 1e9

    if args.compile:
        result["compile"] = bench_compile(
            copy.deepcopy(template), images, masks, trainer, args, sync
        )

    # evaluation: whole-image inference + metric accumulation, as validation runs it
    predictor = Predictor(trainer.model, trainer.device, trainer.precision, trainer.channels_last)
    eval_batches = [(images, masks)] * args.eval_batches
    evaluate(predictor, _Batches(eval_batches[:1]), NUM_CLASSES, 255)  # warm-up
    start = time.perf_counter()
    evaluate(predictor, _Batches(eval_batches), NUM_CLASSES, 255)
    sync()
    result["eval_img_s"] = args.batch * args.eval_batches / (time.perf_counter() - start)
    return result


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
    goes away without DDP's gradient all-reduce, and without SyncBatchNorm.
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
        + f"  efficiency {100 * result['efficiency']:.0f}% (ideal {result['ideal_img_s']:.2f} "
        "img/s)" + "".join(shares),
        flush=True,
    )


class TorchvisionPipeline(Dataset):
    """The same augmentation with torchvision.io + transforms.v2 on tensors (masks as Mask)."""

    def __init__(self, samples, crop, scale_range):
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.samples = samples
        self.tv_tensors = tv_tensors
        self.transform = v2.Compose([
            v2.RandomResize(int(1024 * scale_range[0]), int(1024 * scale_range[1])),
            v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])  # fmt: skip

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        from torchvision.io import decode_png, read_file

        image_path, label_path = self.samples[index]
        image = self.tv_tensors.Image(decode_png(read_file(str(image_path))))
        mask = self.tv_tensors.Mask(decode_png(read_file(str(label_path)))[0])
        image, mask = self.transform(image, mask)
        return image, mask.long()


def write_cityscapes_tree(root: Path, count: int) -> None:
    """``count`` 2048x1024 image/labelIds pairs in the official layout, upscaled synthetic scenes
    (smooth regions compress like photos do, unlike noise)."""
    scenes = SyntheticScenes("train", image_size=256, num_classes=6)
    ids = np.array([7, 8, 11, 21, 23, 26], np.uint8)  # road, sidewalk, building, ... car
    for i in range(count):
        image, mask = scenes.load(i)
        image = cv2.resize(image, (2048, 1024), interpolation=cv2.INTER_LINEAR)
        labels = cv2.resize(ids[mask], (2048, 1024), interpolation=cv2.INTER_NEAREST)
        name = f"bench_{i:06d}_000019"
        for folder, suffix, array in (
            ("leftImg8bit", "leftImg8bit", image),
            ("gtFine", "gtFine_labelIds", labels),
        ):
            path = root / folder / "train" / "bench" / f"{name}_{suffix}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


def loader_img_s(dataset, workers: int, batches: int, batch_size: int) -> float:
    if isinstance(dataset, Cityscapes):
        data_loader = train_loader(dataset, batch_size, workers, seed=0)
    else:
        data_loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                 persistent_workers=workers > 0, drop_last=True)  # fmt: skip
    iterator = iter(data_loader)
    next(iterator)  # start-up (workers, first decode) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        try:
            next(iterator)
        except StopIteration:
            iterator = iter(data_loader)
            next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def bench_data(args) -> dict:
    crop, scale_range = (512, 1024), (0.5, 2.0)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        write_cityscapes_tree(root, args.data_images)
        seg_set = Cityscapes(str(root), "train", transform=train_transform(crop, 255, scale_range))
        tv_set = TorchvisionPipeline(seg_set.samples, crop, scale_range)
        result = {}
        for workers in (0, 2):
            result[f"seg_img_s_{workers}_workers"] = loader_img_s(
                seg_set, workers, args.data_batches, 2
            )
            result[f"torchvision_v2_img_s_{workers}_workers"] = loader_img_s(
                tv_set, workers, args.data_batches, 2
            )
    return result


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
    parser.add_argument("--data-batches", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--default-run", action="store_true", help="time `python train.py` too")
    parser.add_argument("--scaling", type=int, metavar="N",
                        help="also time 1 process vs N under torchrun (CPU: threads split evenly)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args()
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
            "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": threads,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
        },
        "settings": {"size": args.size, "batch": args.batch, "reps": args.reps, "warmup": args.warmup},
    }  # fmt: skip
    report["ceilings"] = {
        "fp32_gemm_gflops": gemm_ceiling(torch.float32, device, sync),
        "bf16_gemm_gflops": gemm_ceiling(torch.bfloat16, device, sync),
    }
    print(f"GEMM ceilings: fp32 {report['ceilings']['fp32_gemm_gflops']:.0f}, "
          f"bf16 {report['ceilings']['bf16_gemm_gflops']:.0f} GFLOP/s", flush=True)  # fmt: skip
    report["train"] = {}
    for name in args.models:
        result = bench_model(name, args, device, sync)
        report["train"][name] = result
        report.setdefault("eval", {})[name] = {"img_s": result.pop("eval_img_s")}
        print(
            f"{name:>14}: seg {result['seg_img_s']:.2f} img/s ({result['precision']}"
            f"{', channels_last' if result['channels_last'] else ''}), plain fp32 "
            f"{result['plain_fp32_img_s']:.2f}, plain same settings {result['plain_same_settings_img_s']:.2f}"
            f" -> x{result['speedup_vs_plain_fp32']:.2f}, overhead {100 * result['trainer_overhead']:+.1f}%, "
            f"{result['achieved_gflops']:.0f} GFLOP/s, peak {result['seg_peak_mib']:.0f} MiB; "
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
        print(
            "data pipeline (img/s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in report["data"].items()),
            flush=True,
        )
    if args.default_run:
        report["default_run"] = default_run()
        print(
            "default run: " + ", ".join(f"{k} {v:.3f}" for k, v in report["default_run"].items()),
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
