"""The training loop: fit / train_step / validate / state_dict / load_state_dict, top to bottom."""

import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from seg.engine.checkpoint import save_checkpoint, unwrapped_state_dict
from seg.metrics import ConfusionMatrix, format_table, named
from seg.visualize import comparison

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
AMP_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={device} but CUDA is not available; use auto or cpu")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> the fastest safe choice: bf16 where the hardware has it, else fp16 with a
    grad scaler on CUDA, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r}; options: {list(PRECISIONS)}")
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
    else:
        # oneDNN runs bf16 convolutions and GEMMs about 2x faster than fp32 on AVX-512 CPUs.
        bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if precision == "auto":
        return "bf16" if bf16 else "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("trainer.precision=fp16 needs CUDA; on the CPU use bf16 or fp32")
    if precision == "bf16" and not bf16:
        raise ValueError(f"trainer.precision=bf16 is not supported on {device}; use fp32")
    return precision


def resolve_channels_last(channels_last: bool | str, device: torch.device) -> bool:
    """``auto`` -> channels_last everywhere: oneDNN (CPU) and cuDNN tensor cores both prefer it."""
    if channels_last == "auto":
        return True
    if not isinstance(channels_last, bool):
        raise ValueError(f"trainer.channels_last={channels_last!r}; options: auto, true, false")
    return channels_last


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    ignore_index: int,
    device: torch.device,
    precision: str,
    channels_last: bool,
    num_examples: int = 0,
) -> tuple[dict, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Whole-image inference over ``loader``: metrics from one confusion matrix, and the first
    ``num_examples`` (image, mask, prediction) triples on the CPU for pictures."""
    was_training = model.training
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    confusion = ConfusionMatrix(num_classes, ignore_index, device)
    examples = []
    for images, masks in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True)
        with torch.autocast(device.type, AMP_DTYPES[precision], enabled=precision != "fp32"):
            logits = model(images)
        predictions = logits.argmax(1)
        confusion.update(predictions, masks)
        if len(examples) < num_examples:
            take = num_examples - len(examples)
            examples += zip(
                images[:take].cpu(), masks[:take].cpu(), predictions[:take].cpu(), strict=True
            )
    model.train(was_training)
    return confusion.compute(), examples


def rng_state() -> dict:
    """Every random generator's state as tensors and primitives (``weights_only``-loadable)."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "numpy_pos": numpy_state["state"]["pos"],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    key = state["numpy_key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, state["numpy_pos"]))
    random.setstate(state["python"])


class Trainer:
    """Iteration-based training with mixed precision, validation, TensorBoard and checkpoints.

    One iteration is one optimizer step over ``grad_accum_steps`` batches. Validation runs every
    ``val_every`` iterations and at the end; ``checkpoints/last.pt`` is written every
    ``ckpt_every`` iterations and at the end, ``checkpoints/best.pt`` whenever val mIoU improves.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        run_dir: str | Path,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        ignore_index: int,
        mean: Sequence[float],
        std: Sequence[float],
        config_yaml: str = "",
        overrides: Sequence[str] = (),
        device: str = "auto",
        precision: str = "auto",
        channels_last: bool | str = "auto",
        max_iters: int = 1000,
        grad_accum_steps: int = 1,
        clip_grad_norm: float | None = None,
        val_every: int = 250,
        ckpt_every: int = 250,
        log_every: int = 20,
        num_val_images: int = 4,
    ):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = resolve_channels_last(channels_last, self.device)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        # .to() swaps parameter data in place, so the optimizer's references stay valid.
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.aux_weight = getattr(model, "aux_weight", 0.0)
        self.loss_fn = loss_fn.to(self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        # A no-op unless fp16: bf16 has fp32's exponent range and needs no loss scaling.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop sizes: pick the fastest kernels
        self.run_dir = Path(run_dir)
        self.class_names = list(class_names)
        self.palette = [list(color) for color in palette]
        self.ignore_index = ignore_index
        self.mean, self.std = list(mean), list(std)
        self.config_yaml = config_yaml
        self.overrides = list(overrides)
        self.max_iters = max_iters
        self.grad_accum_steps = grad_accum_steps
        self.clip_grad_norm = clip_grad_norm
        self.val_every = val_every
        self.ckpt_every = ckpt_every
        self.log_every = log_every
        self.num_val_images = num_val_images
        self.iteration = 0
        self.best_miou = -math.inf

    def fit(self, train_loader: DataLoader, val_loader: DataLoader) -> dict:
        """Train from ``self.iteration`` to ``max_iters``; returns the last validation metrics."""
        # On resume, drop events the crashed run logged after its last checkpoint.
        purge_step = self.iteration + 1 if self.iteration else None
        writer = SummaryWriter(self.run_dir / "tb", purge_step=purge_step)
        log.info(
            "Training on %s, precision %s%s, iterations %d -> %d, run dir %s",
            self.device, self.precision, ", channels_last" if self.channels_last else "",
            self.iteration, self.max_iters, self.run_dir,
        )  # fmt: skip
        batches = iter(train_loader)
        batch_size = train_loader.batch_size * self.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device)  # summed on the device: no sync per step
        steps_since_log, clock = 0, time.perf_counter()
        metrics = {}
        self.model.train()
        with (
            logging_redirect_tqdm(),
            tqdm(total=self.max_iters, initial=self.iteration, disable=None, unit="it") as bar,
        ):
            while self.iteration < self.max_iters:
                loss_sum += self.train_step(batches)
                self.iteration += 1
                steps_since_log += 1
                bar.update()
                last = self.iteration == self.max_iters

                if self.iteration % self.log_every == 0 or last:
                    loss = (loss_sum / steps_since_log).item()  # the only sync between logs
                    lr = self.scheduler.get_last_lr()[0]
                    images_per_s = steps_since_log * batch_size / (time.perf_counter() - clock)
                    writer.add_scalar("train/loss", loss, self.iteration)
                    writer.add_scalar("train/lr", lr, self.iteration)
                    writer.add_scalar("train/img_per_s", images_per_s, self.iteration)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
                    loss_sum.zero_()
                    steps_since_log, clock = 0, time.perf_counter()

                if self.iteration % self.val_every == 0 or last:
                    metrics = self.validate(val_loader, writer)
                    if metrics["mIoU"] > self.best_miou:  # False for NaN: never "best"
                        self.best_miou = metrics["mIoU"]
                        save_checkpoint(self.state_dict(), self.run_dir / "checkpoints/best.pt")
                    clock = time.perf_counter()  # img/s counts training time only

                if self.iteration % self.ckpt_every == 0 or last:
                    save_checkpoint(self.state_dict(), self.run_dir / "checkpoints/last.pt")
        writer.close()
        log.info("Done: best val mIoU %.4f, checkpoints in %s", self.best_miou, self.run_dir)
        return metrics

    def train_step(self, batches: Iterator) -> torch.Tensor:
        """One optimizer step over ``grad_accum_steps`` batches; returns the mean loss (on device)."""
        total = torch.zeros((), device=self.device)
        for _ in range(self.grad_accum_steps):
            images, masks = next(batches)
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            masks = masks.to(self.device, non_blocking=True)
            with torch.autocast(
                self.device.type, AMP_DTYPES[self.precision], enabled=self.precision != "fp32"
            ):
                logits, aux_logits = self.model(images, with_aux=True)
            # Outside autocast: the losses reduce in float32.
            loss = self.loss_fn(logits, masks)
            if aux_logits is not None:
                loss = loss + self.aux_weight * self.loss_fn(aux_logits, masks)
            self.scaler.scale(loss / self.grad_accum_steps).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)  # so clipping sees true gradients under fp16
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total / self.grad_accum_steps

    def validate(self, loader: DataLoader, writer: SummaryWriter) -> dict:
        """Evaluate on ``loader``, then log scalars, the class table, pictures and metrics.jsonl."""
        metrics, examples = evaluate(
            self.model,
            loader,
            len(self.class_names),
            self.ignore_index,
            self.device,
            self.precision,
            self.channels_last,
            self.num_val_images,
        )
        for key in ("mIoU", "mDice", "aAcc", "mAcc"):
            writer.add_scalar(f"val/{key}", metrics[key], self.iteration)
        for name, iou, dice in zip(self.class_names, metrics["IoU"], metrics["Dice"], strict=True):
            writer.add_scalar(f"val/IoU/{name}", iou, self.iteration)
            writer.add_scalar(f"val/Dice/{name}", dice, self.iteration)
        for i, (image, mask, prediction) in enumerate(examples):
            picture = comparison(image, mask, prediction, self.palette, self.mean, self.std)
            writer.add_image(f"val/example_{i}", picture, self.iteration)
        writer.flush()
        log.info(
            "Validation at iteration %d:\n%s",
            self.iteration,
            format_table(metrics, self.class_names),
        )
        with open(self.run_dir / "metrics.jsonl", "a") as file:
            record = {"iteration": self.iteration, **named(metrics, self.class_names)}
            file.write(json.dumps(record) + "\n")
        return metrics

    def state_dict(self) -> dict:
        """Everything needed to resume training and to rebuild the model on its own."""
        return {
            "model": unwrapped_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "rng": rng_state(),
            "class_names": self.class_names,
            "palette": self.palette,
            "config": self.config_yaml,
            "overrides": self.overrides,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["iteration"]
        self.best_miou = state["best_miou"]
        set_rng_state(state["rng"])
