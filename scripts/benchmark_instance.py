"""Mask R-CNN's training step in seg against torchvision's detection reference loop, in one process.

    python scripts/benchmark_instance.py                        # task=instance's defaults
    python scripts/benchmark_instance.py --size 256 --batch 2 --reps 20 --json bench.json
    python scripts/benchmark_instance.py --model maskrcnn_r50   # torchvision's full sizes

Three steps on the same model (copies of one initialisation), the same optimizer settings and
the same batch (task=instance's synthetic scenes, augmented once and kept in memory), timed in
interleaved rounds (``benchmark.interleaved_medians``):
(a) ``seg``: seg's Trainer step as train.py builds it (precision and channels_last as ``auto``
    picks them), from the uint8 batch: targets built and pixels normalized on the device;
(b) ``reference_fp32``: our copy of the body of ``train_one_epoch`` in torchvision's
    references/detection/engine.py: float images and ready targets moved to the device, losses
    summed, the summed loss read back (``.item()``) and checked finite, zero_grad, backward,
    optimizer step; in fp32, contiguous;
(c) ``reference_same_settings``: (b) with seg's precision (autocast, a GradScaler for fp16 as
    the reference script's ``--amp`` does) and memory format.
(d) ``reference_seg_inputs``: (c) fed as seg's step is fed: the uint8 batch, with the task's
    ``prepare`` (targets built and pixels normalized on the device) inside the timed step.
(d)/(a) - 1 is the Trainer's own overhead; (c)/(d) - 1 what preparing the inputs in the step
costs (work the reference script's DataLoader workers do); (a)/(b) what seg's settings buy
over the plain loop.
"""

import argparse
import copy
import itertools
import json
import math
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from scripts.benchmark import (  # noqa: E402
    compose_train,
    cpu_name,
    interleaved_medians,
    make_trainer,
)
from seg.optim import build_optimizer  # noqa: E402
from seg.tasks.instance import training_target  # noqa: E402


def reference_step(model, optimizer, images, targets, device, autocast_dtype, scaler) -> float:
    """One iteration of torchvision's references/detection ``train_one_epoch`` (without its
    logging, warm-up schedule and the all-reduce of the loss dict, a no-op in one process)."""
    images = [image.to(device) for image in images]
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
    with torch.autocast(device.type, autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):  # fmt: skip
        loss_dict = model(images, targets)
        losses = sum(loss for loss in loss_dict.values())
    loss_value = losses.item()  # the reference loop logs it and stops on a non-finite loss
    if not math.isfinite(loss_value):
        raise RuntimeError(f"Loss is {loss_value}, stopping training")
    optimizer.zero_grad()
    if scaler is not None:
        scaler.scale(losses).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        losses.backward()
        optimizer.step()
    return loss_value


def fixed_batch(cfg, batch_size: int) -> tuple:
    """``batch_size`` augmented training samples of ``cfg.data``, collated as the task does."""
    dataset = instantiate(cfg.data.dataset, split=cfg.data.train_split,
                          transform=instantiate(cfg.data.train_transform))  # fmt: skip
    task = instantiate(cfg.task)
    return task, task.collate([dataset[(index, 0, 0, 0)] for index in range(batch_size)])


def bench(args, device: torch.device) -> dict:
    overrides = [f"model={args.model}", f"data.batch_size={args.batch}",
                 f"trainer.device={device}", f"optimizer={args.optimizer}"]  # fmt: skip
    if args.size is not None:
        overrides += [f"data.dataset.image_size={args.size}",
                      f"data.train_transform.crop_size=[{args.size},{args.size}]"]  # fmt: skip
    cfg = compose_train("task=instance", *overrides)
    task, batch = fixed_batch(cfg, args.batch)
    torch.manual_seed(0)
    template = instantiate(cfg.model)

    trainer = make_trainer(cfg, copy.deepcopy(template), class_names=cfg.data.class_names)
    batches = itertools.repeat(batch)
    steps = {"seg": lambda: trainer.train_step(batches)}
    # The reference loop's inputs: float images normalized on the CPU (its data loader's
    # work) and targets built beforehand, as its dataset returns them.
    images, ids, tables = batch
    targets = [training_target(i, t) for i, t in zip(ids, tables, strict=True)]
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[trainer.precision]
    variants = {"reference_fp32": (None, torch.contiguous_format),
                "reference_same_settings": (dtype, trainer.memory_format)}  # fmt: skip
    for key, (autocast_dtype, memory_format) in variants.items():
        model = copy.deepcopy(template).to(device, memory_format=memory_format).train()
        optimizer = build_optimizer(cfg.optimizer, model)
        scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
        x = task.normalize_each(images, torch.device("cpu"), memory_format)
        steps[key] = lambda m=model, o=optimizer, d=autocast_dtype, s=scaler, x=x: reference_step(
            m, o, x, targets, device, d, s
        )
    # (d) the loop of (c) fed as seg's step is fed: the uint8 batch, targets built and pixels
    # normalized on the device (task.prepare) inside the timed step
    model = copy.deepcopy(template).to(device, memory_format=trainer.memory_format).train()
    optimizer = build_optimizer(cfg.optimizer, model)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    steps["reference_seg_inputs"] = lambda: reference_step(
        model, optimizer, *task.prepare(batch, device, trainer.memory_format), device, dtype, scaler
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    timings = interleaved_medians(steps, args.reps, args.warmup, sync, device)
    result = {"precision": trainer.precision, "channels_last": trainer.channels_last}
    for key in steps:
        result[f"{key}_img_s"] = args.batch / timings[key]
        result[f"{key}_peak_mib"] = timings[f"{key}_peak_mib"]
    result["speedup_vs_reference_fp32"] = result["seg_img_s"] / result["reference_fp32_img_s"]
    result["trainer_overhead"] = result["reference_seg_inputs_img_s"] / result["seg_img_s"] - 1
    result["input_preparation_cost"] = (
        result["reference_same_settings_img_s"] / result["reference_seg_inputs_img_s"] - 1
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="maskrcnn", help="a configs/model/maskrcnn* name")
    parser.add_argument("--size", type=int, help="square scenes and crops (default: the data's)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--optimizer", default="sgd", help="as the reference script: SGD")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    device = torch.device(args.device)
    machine = {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
               "threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}  # fmt: skip
    args_json = {key: str(value) for key, value in vars(args).items()}
    result = {"machine": machine, "args": args_json, "result": bench(args, device)}
    figures = result["result"]
    print(f"{args.model}, batch {args.batch}, {figures['precision']}, "
          f"channels_last={figures['channels_last']} on {result['machine']['device']} "
          f"({result['machine']['cpu']}, {result['machine']['threads']} threads)")  # fmt: skip
    for key in ("seg", "reference_fp32", "reference_same_settings", "reference_seg_inputs"):
        print(f"  {key:<24} {figures[f'{key}_img_s']:8.2f} img/s  "
              f"peak {figures[f'{key}_peak_mib']:8.0f} MiB")  # fmt: skip
    print(f"  seg vs the reference loop in fp32: x{figures['speedup_vs_reference_fp32']:.3f}; "
          f"the Trainer's overhead vs the loop with seg's settings and inputs: "
          f"{100 * figures['trainer_overhead']:+.1f}%; preparing the inputs in the step "
          f"(targets, normalization) costs {100 * figures['input_preparation_cost']:+.1f}%")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
