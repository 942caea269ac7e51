"""The training loop: fit / train_step / validate / state_dict / load_state_dict, top to bottom."""

import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from seg.data.loader import DeviceBatches
from seg.engine import dist
from seg.engine.checkpoint import WEIGHTS_ONLY, unwrapped_state_dict, validated_weights
from seg.engine.device import (
    AMP_DTYPES,
    CompiledForward,
    configure_determinism,
    resolve_channels_last,
    resolve_compile,
    resolve_device,
    resolve_precision,
)
from seg.engine.evaluation import Evaluation, evaluate
from seg.engine.recorder import Recorder
from seg.engine.rng import rng_state, set_rng_state
from seg.inference import Normalize, Predictor

log = logging.getLogger(__name__)
# The schedule follows the iteration, applied or skipped: when a process's first step is skipped
# (an fp16 overflow, a non-finite loss), torch warns that the scheduler stepped before the
# optimizer. Filtered once here: catch_warnings() around each step would reset Python's
# once-per-location memory and repeat every other warning at every step.
warnings.filterwarnings(
    "ignore", r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`", UserWarning
)


def resolve_sync_bn(sync_bn: bool | str, model: nn.Module) -> bool:
    """``auto`` -> on when several processes train a model with BatchNorm: each rank's batch
    alone is too small for good statistics (mmsegmentation #179: PSPNet 69.1 vs 79.8 mIoU)."""
    if sync_bn == "auto":
        return dist.world_size() > 1 and dist.has_batchnorm(model)
    if not isinstance(sync_bn, bool):
        raise ValueError(f"trainer.sync_bn={sync_bn!r}; options: auto, true, false")
    return sync_bn and dist.world_size() > 1


def averaged_model(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (BatchNorm statistics
    included), or None when ``decay`` is null. Its step counter stays on the CPU, so the
    per-step update costs no device sync."""
    if decay is None:
        return None
    if not 0 < decay < 1:
        raise ValueError(f"trainer.ema_decay={decay!r}; give a number between 0 and 1 "
                         "(e.g. 0.999), or null for no averaging")  # fmt: skip
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def loss_input(logits: torch.Tensor) -> torch.Tensor:
    """The logits in float32 and the contiguous layout, in one copy: the losses' log_softmax
    would copy channels_last logits a second time (about 4% of a U-Net step on the CPU)."""
    return logits.to(torch.float32, memory_format=torch.contiguous_format)


class StopTraining(Exception):
    """Training stopped early on purpose; ``exit_code`` is what the command exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# trainer.best_checkpoint: best.pt resumes like last.pt, holds the validated weights alone (a
# quarter of an AdamW checkpoint), or is not written.
BEST_CHECKPOINTS = ("full", "weights", "none")

# Exit codes of train.py (README "Reliability"): 128 + signal number after SIGINT/SIGTERM
# (130, 143), and this one when the non-finite guard gives up.
EXIT_NONFINITE = 3

OOM_HELP = (
    "out of memory. Lower data.batch_size (with trainer.grad_accum_steps to keep the effective "
    "batch), lower data.train_transform.crop_size, or use trainer.precision=bf16/fp16"
)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip a step on the device: fused Adam and AdamW leave weights
    and state untouched where ``found_inf`` is 1, so no host sync decides the step. Fused SGD
    takes ``found_inf`` too, but a skipped first step leaves its momentum uninitialized (torch
    2.14, seen here; LibreYOLO #771 on CUDA): it decides on the host like every other optimizer."""
    # The groups, not the defaults: a loaded state dict brings its groups' own ``fused``.
    fused = all(group.get("fused") for group in optimizer.param_groups)
    return fused and isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)


class StepResult(NamedTuple):
    loss: torch.Tensor  # mean loss of the step's batches, on the device
    # On the device, the same on every rank: [non-finite loss, non-finite gradients, the number
    # of a stop signal that reached any rank (0: none)]. The host reads it one step late.
    decision: torch.Tensor
    applied: torch.Tensor  # whether the optimizer stepped (nothing non-finite), on the device
    iteration: int


class Trainer:
    """Iteration-based training with mixed precision, on one process or under torchrun (DDP).

    One iteration is one optimizer step over ``grad_accum_steps`` batches per process. Validation
    runs every ``val_every`` iterations and at the end; ``checkpoints/last.pt`` is written every
    ``ckpt_every`` iterations and at the end, ``checkpoints/best.pt`` whenever val mIoU improves;
    ``recorder`` writes them, and everything else the run shows (on rank 0 only).
    SIGINT/SIGTERM reaching any rank finish the next step on every rank, write ``last.pt``
    and raise ``StopTraining``; a validation they skip or cut short is owed in ``last.pt`` and
    runs first on resume. A second signal stops at once, but never inside a checkpoint's write.
    An error while computing a step's gradients (data, forward, backward, out of memory) writes
    ``last.pt`` at the last completed iteration, then propagates.
    A step with a non-finite loss or gradient on any rank is skipped on all; ``nonfinite_patience``
    such steps in a row stop training with ``last.pt`` untouched.
    With ``ema_decay``, validation and ``best.pt`` use an exponential moving average of the
    weights. With ``early_stop_patience``, training ends after that many validations in a row
    without a better val mIoU; the count is checkpointed, so a resumed run keeps it.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        recorder: Recorder,
        ignore_index: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "auto",
        precision: str = "auto",
        channels_last: bool | str = "auto",
        deterministic: bool = False,
        compile: bool | str = "auto",
        sync_bn: bool | str = "auto",
        max_iters: int = 1000,
        grad_accum_steps: int = 1,
        clip_grad_norm: float | None = None,
        nonfinite_patience: int = 5,
        val_every: int = 250,
        ckpt_every: int = 250,
        log_every: int = 20,
        num_val_images: int = 4,
        ema_decay: float | None = None,
        early_stop_patience: int | None = None,
        best_checkpoint: str = "full",
        keep_checkpoints: int = 0,
    ):
        # Under torchrun each rank trains on its own device (cuda:LOCAL_RANK).
        self.device = dist.init(resolve_device(device))
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = resolve_channels_last(channels_last, self.device)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if resolve_sync_bn(sync_bn, model):
            # Same parameter objects in the new modules: the optimizer's references stay valid.
            model = dist.convert_sync_batchnorm(model, self.device)
        # .to() swaps parameter data in place, so the optimizer's references stay valid.
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.aux_weight = getattr(model, "aux_weight", 0.0)
        # Training steps go through DDP (gradients averaged over ranks) and, with ``compile``,
        # the compiled model; validation, checkpoints and the fallback use the plain one
        # (compilation is lazy: failures show at the first step).
        self.compiled = (
            CompiledForward(self.model) if resolve_compile(compile, self.device) else None
        )
        self.ddp_model = dist.wrap(self.compiled or self.model, self.device)
        self.loss_fn = loss_fn.to(self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.recorder = recorder
        # A no-op unless fp16: bf16 has fp32's exponent range and needs no loss scaling.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        configure_determinism(deterministic, self.device)
        self.ignore_index = ignore_index
        self.mean, self.std = list(mean), list(std)
        self.normalize = Normalize(self.mean, self.std, self.device, self.memory_format)
        self.max_iters = max_iters
        self.grad_accum_steps = grad_accum_steps
        self.clip_grad_norm = clip_grad_norm
        self.nonfinite_patience = nonfinite_patience
        self.val_every = val_every
        self.ckpt_every = ckpt_every
        self.log_every = log_every
        self.num_val_images = num_val_images
        # Averages the plain model's weights after each applied step (not DDP's or compile's
        # wrapper: the same tensors, without their prefixes).
        self.ema = averaged_model(self.model, ema_decay)
        self.early_stop_patience = early_stop_patience
        if best_checkpoint not in BEST_CHECKPOINTS:
            raise ValueError(
                f"trainer.best_checkpoint={best_checkpoint!r}; options: {list(BEST_CHECKPOINTS)}"
            )
        self.best_checkpoint = best_checkpoint
        self.keep_checkpoints = keep_checkpoints
        self.validations_without_improvement = 0
        self.iteration = 0
        self.samples_seen = 0  # training samples consumed by all ranks: the data order's position
        self.best_miou = -math.inf
        self.skipped_steps = 0
        self.nonfinite_streak = 0
        # True from the moment a validation is due until it completes: a checkpoint saved in
        # between (a stop signal) makes the resumed run validate before training on.
        self.pending_validation = False
        self.stop_signal: int | None = None  # a signal that reached this process
        self.agreed_stop: int | None = None  # the signal on which all ranks stop, once read
        # Steps whose decisions the host has not read yet (the newest one, between log lines).
        self.unread_steps: list[StepResult] = []
        self.saving = False  # a checkpoint is being written: a second signal waits for it
        self.deferred_signal: int | None = None

    def fit(self, train_loader: DataLoader, val_loader: DataLoader) -> dict:
        """Train from ``self.iteration`` to ``max_iters``; returns the last validation metrics."""
        images_per_step = train_loader.batch_size * self.grad_accum_steps * dist.world_size()
        log.info(
            "Training on %s, precision %s%s, iterations %d -> %d, run dir %s",
            self.device, self.precision, ", channels_last" if self.channels_last else "",
            self.iteration, self.max_iters, self.recorder.run_dir,
        )  # fmt: skip
        batches = DeviceBatches(iter(train_loader), self.device)  # one batch ahead
        metrics = {}
        self.model.train()
        with (
            self.recorder.session(self.iteration, self.max_iters, images_per_step, self.device),
            self.stop_on_signals(),
        ):
            if self.pending_validation:  # the checkpoint's run stopped before it was done
                metrics = self.validate_and_keep_best(val_loader) or metrics
                if self.agreed_stop is not None:
                    self.stop_after_signal()
                self.save("last")  # record it done: a later resume does not repeat it
            while self.iteration < self.max_iters and not self.patience_spent():
                with self.recorder.timed("training steps"):
                    step = self.fit_step(batches)
                self.iteration += 1
                self.samples_seen += images_per_step
                self.recorder.step(step.loss, step.applied)
                self.unread_steps.append(step)
                last = self.iteration == self.max_iters
                due = [self.iteration % every == 0 or last
                       for every in (self.log_every, self.val_every, self.ckpt_every)]  # fmt: skip
                # The previous step's decision, read while this one runs on the device; this
                # one's too where logs, validation or a checkpoint need the counts now.
                self.read_decisions(keep=0 if any(due) else 1)

                if due[0]:
                    lr = self.scheduler.get_last_lr()[0]
                    self.recorder.training(self.iteration, self.max_iters, lr, self.skipped_steps)

                if due[1]:
                    self.pending_validation = True
                    metrics = self.validate_and_keep_best(val_loader) or metrics
                    self.recorder.restart_clock()  # img/s counts training time only

                if due[2] or self.patience_spent():
                    with self.recorder.timed("checkpoints"):
                        self.save("last")
                        self.recorder.keep_snapshot(self.iteration, self.keep_checkpoints)
                if self.agreed_stop is not None:
                    self.stop_after_signal()
        if self.patience_spent():
            log.warning(
                "Early stop at iteration %d of %d: val mIoU has not improved on %.4f for %d "
                "validations (trainer.early_stop_patience). To train on, resume with a larger "
                "trainer.early_stop_patience, or null.",
                self.iteration, self.max_iters, self.best_miou,
                self.validations_without_improvement,
            )  # fmt: skip
        log.info(
            "Done: best val mIoU %.4f, checkpoints in %s", self.best_miou, self.recorder.run_dir
        )
        return metrics

    def patience_spent(self) -> bool:
        """Whether early stopping ends the run: ``early_stop_patience`` validations in a row
        without a better val mIoU (the same on every rank: the metrics are)."""
        patience = self.early_stop_patience
        return patience is not None and self.validations_without_improvement >= patience

    def read_decisions(self, keep: int) -> None:
        """Act on the decisions of the unread steps but the newest ``keep``: the host waits for
        a step only once the next one is queued, so the device never idles for it."""
        while len(self.unread_steps) > keep:
            self.check_step(self.unread_steps.pop(0))

    def check_step(self, step: StepResult) -> None:
        """Count a skipped step; stop after ``nonfinite_patience`` unhealthy steps in a row;
        note a stop signal that reached any rank (all ranks read the same, at the same step)."""
        nonfinite_loss, nonfinite_grads, stop = step.decision.tolist()  # the host sync
        if stop and self.agreed_stop is None:
            self.agreed_stop = int(stop)
            if self.stop_signal is None:
                self.stop_signal = int(stop)
                log.warning("%s on another rank: stopping", signal.Signals(int(stop)).name)
        if nonfinite_loss or nonfinite_grads:
            self.skipped_steps += 1
            log.warning(
                "Iteration %d: non-finite %s, update skipped (%d skipped so far)",
                step.iteration, "loss" if nonfinite_loss else "gradients", self.skipped_steps,
            )  # fmt: skip
        # fp16 overflows with a finite loss are the grad scaler's normal calibration.
        healthy = not nonfinite_loss and (not nonfinite_grads or self.scaler.is_enabled())
        self.nonfinite_streak = 0 if healthy else self.nonfinite_streak + 1
        if self.nonfinite_streak >= self.nonfinite_patience:
            raise StopTraining(
                f"Stopped at iteration {step.iteration}: loss or gradients non-finite "
                f"{self.nonfinite_streak} steps in a row (trainer.nonfinite_patience). The last "
                f"good checkpoint {self.recorder.checkpoint_path('last')} is intact. Lower "
                "optimizer.lr, set trainer.clip_grad_norm, or try trainer.precision=fp32.",
                EXIT_NONFINITE,
            )

    def fit_step(self, batches: Iterator) -> StepResult:
        """``train_step`` for ``fit``: until the optimizer step the weights are those of the last
        completed iteration, so an error before it (a data error, forward, backward, out of
        memory) first saves them to ``last.pt``. Later errors save nothing: the optimizer may
        have updated part of the weights."""
        try:
            total = self.accumulate_gradients(batches)
        except Exception as error:
            self.optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
            if self.stop_signal is not None and isinstance(error, RuntimeError):
                # A process-group SIGTERM (Slurm) also ended the DataLoader workers.
                self.agreed_stop = self.stop_signal
                self.stop_after_signal()
            self.save_before_error()
            raise
        return self.apply_gradients(total)

    def save_before_error(self, what: str | None = None) -> None:
        """Save ``last.pt`` at the last completed iteration, before an error in ``what`` (by
        default the next iteration) ends the run."""
        what = what or f"Iteration {self.iteration + 1}"
        path = self.recorder.checkpoint_path("last")
        try:
            self.save("last")
        except (OSError, RuntimeError) as save_error:
            # The error that stopped the step matters more: it propagates, this is logged.
            log.error("Could not save %s before stopping: %s", path, save_error)
            return
        owed = " with the validation owed (it runs first on resume)" * self.pending_validation
        log.warning(
            "%s failed; saved %s at iteration %d%s. Once the error below is fixed, continue "
            "with: python train.py resume=%s",
            what, path, self.iteration, owed, path,
        )  # fmt: skip

    def save(self, name: str, state: Callable[[], dict] | None = None) -> None:
        """Write ``checkpoints/<name>.pt`` from ``state()`` (by default ``state_dict``: all that
        resumes the run) on rank 0. A second stop signal during the write waits until the file
        is complete, then stops: raised inside torch.save it would abort the save with torch's
        internal error."""
        self.read_decisions(keep=0)  # the skipped-step count the checkpoint holds is complete
        self.saving = True
        try:
            path = self.recorder.save(state or self.state_dict, name)
        finally:
            self.saving = False
        if self.deferred_signal is not None:
            name = signal.Signals(self.deferred_signal).name
            raise StopTraining(
                f"{name}: stopped at iteration {self.iteration} of {self.max_iters} once "
                f"{path} was saved. Continue with: python train.py resume={path}",
                128 + self.deferred_signal,
            )

    def stop_after_signal(self) -> None:
        """Save ``last.pt`` at the current iteration and raise ``StopTraining`` (every rank)."""
        self.save("last")
        dist.barrier()  # no rank exits while rank 0 still writes: torchrun would stop it
        path = self.recorder.checkpoint_path("last")
        name = signal.Signals(self.agreed_stop).name
        raise StopTraining(
            f"{name}: stopped at iteration {self.iteration} of {self.max_iters}; saved "
            f"{path}. Continue with: python train.py resume={path}",
            128 + self.agreed_stop,
        )

    @contextmanager
    def stop_on_signals(self):
        """SIGINT/SIGTERM only set a flag that the next step's decision carries. A second Ctrl-C
        stops at once, or during a checkpoint's write as soon as it is complete; a repeated
        SIGTERM changes nothing: launchers forward theirs (SLURM signals the job step, whose
        torchrun then signals its workers again), and the save must go through."""

        def request_stop(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_signal is None:
                self.stop_signal = signum
                log.warning("%s received: stopping after the next step", name)
            elif signum != signal.SIGINT:
                log.warning("%s received again: still stopping after the next step", name)
            elif self.saving:
                self.deferred_signal = signum
                log.warning("%s received again: stopping once the checkpoint is written", name)
            else:
                raise KeyboardInterrupt

        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return
        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def run_model(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training forward pass. With ``compile``, the first one compiles (its time is
        logged) and all ranks then agree: if compiling failed on any of them, every rank warns
        and goes on eagerly, still under DDP (``CompiledForward``)."""
        started = time.perf_counter()
        outputs = self.ddp_model(images, with_aux=True)
        if self.compiled is not None and self.compiled.calls == 1:
            self.agree_on_compile(time.perf_counter() - started)
        return outputs

    def agree_on_compile(self, seconds: float) -> None:
        """After the first compiled call: one flag over all ranks, so that no rank goes on
        compiled while another runs eagerly (other graphs, other numerics)."""
        failure = self.compiled.failure
        flag = torch.full((1,), float(failure is not None), device=self.device)
        if not dist.any_rank(flag).item():
            log.info("trainer.compile: compiled the training step in %.1f s (its first forward "
                     "pass)", seconds)  # fmt: skip
            return
        self.compiled.eager = True
        if failure is None:
            log.warning("trainer.compile: torch.compile failed on another rank; continuing "
                        "without it")  # fmt: skip
            return
        message = str(failure).strip().splitlines()[0] if str(failure).strip() else ""
        log.warning(
            "trainer.compile: torch.compile failed (%s: %s); continuing without it",
            type(failure).__name__, message[:300],
        )  # fmt: skip

    def train_step(self, batches: Iterator) -> StepResult:
        """One optimizer step over ``grad_accum_steps`` batches, skipped if non-finite."""
        return self.apply_gradients(self.accumulate_gradients(batches))

    def accumulate_gradients(self, batches: Iterator) -> torch.Tensor:
        """Forward and backward over ``grad_accum_steps`` batches; returns their mean loss
        (on the device). The weights are not changed."""
        total = torch.zeros((), device=self.device)
        try:
            for index in range(self.grad_accum_steps):
                images, masks = next(batches)  # uint8, pinned for a GPU by the DataLoader
                images = self.normalize(images)  # copied as uint8, converted on the device
                masks = masks.to(self.device, non_blocking=True).long()
                # DDP averages the gradients over ranks once per step, in the last backward.
                last = index == self.grad_accum_steps - 1
                with nullcontext() if last else dist.no_sync(self.ddp_model):
                    with torch.autocast(
                        self.device.type,
                        AMP_DTYPES[self.precision],
                        enabled=self.precision != "fp32",
                    ):
                        logits, aux_logits = self.run_model(images)
                    # Outside autocast: the losses reduce in float32.
                    loss = self.loss_fn(loss_input(logits), masks)
                    if aux_logits is not None:
                        loss = loss + self.aux_weight * self.loss_fn(loss_input(aux_logits), masks)
                    self.scaler.scale(loss / self.grad_accum_steps).backward()
                total += loss.detach()
        except torch.OutOfMemoryError as error:
            raise RuntimeError(f"Training step {self.iteration + 1}: {OOM_HELP}") from error
        except ValueError as error:
            if "Expected more than 1 value per channel" in str(error):
                raise ValueError(
                    f"{error}: a BatchNorm layer saw a single value per channel; use "
                    "data.batch_size >= 2 (pooling branches such as ASPP reduce each image to 1x1)"
                ) from error
            raise
        return total / self.grad_accum_steps

    def apply_gradients(self, total: torch.Tensor) -> StepResult:
        """Unscale and clip the gradients, then step the optimizer unless the loss ``total`` or
        the gradients are non-finite (on any rank). The schedule and the weight average follow
        the iteration either way: a skipped step leaves the weights as they were."""
        self.scaler.unscale_(self.optimizer)  # so the norm and clipping see the true gradients
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = nn.utils.get_total_norm(grads)
        if self.clip_grad_norm is not None:
            nn.utils.clip_grads_with_norm_(self.model.parameters(), self.clip_grad_norm, grad_norm)
        # One small all-reduce under DDP, on the device: whether to apply the step (a
        # non-finite loss on any rank skips it on all) and whether a stop signal reached any
        # rank. A fill: torch.tensor(value, device=cuda) would be a blocking copy.
        signal_number = torch.full((), float(self.stop_signal or 0), device=self.device)
        decision = torch.stack([total.isfinite().logical_not().float(),
                                grad_norm.isfinite().logical_not().float(), signal_number])  # fmt: skip
        decision = dist.any_rank(decision)
        step = StepResult(total, decision, decision[:2].sum() == 0, self.iteration + 1)
        if skips_on_device(self.optimizer):
            # The fused kernel skips the whole update where found_inf is 1 (GradScaler's own
            # protocol, whose inf check the gradient norm above already covers).
            self.optimizer.found_inf = (~step.applied).float()
            self.optimizer.step()
            del self.optimizer.found_inf
        elif step.applied.item():  # any other optimizer: a host sync decides
            self.optimizer.step()
        self.scaler.update()  # under fp16, an overflow lowers the scale for the next step
        self.scheduler.step()  # the schedule follows the iteration, applied or skipped
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return step

    def validate_and_keep_best(self, loader: DataLoader) -> dict | None:
        """Run the owed validation (``pending_validation``) and save ``best.pt`` if it is the
        best so far. None when a stop signal came first or cut it short: it stays owed."""
        if self.agreed_stop is not None:
            return None
        rng = rng_state(self.device)
        with self.recorder.timed("validation"):
            try:
                result = self.validate(loader)
            except Exception:
                # Out of memory at full resolution is the likeliest GPU error: the iterations
                # since the last checkpoint are kept, with the validation owed.
                set_rng_state(rng, self.device)  # as before the validation, like a stop's save
                self.save_before_error(f"Validation at iteration {self.iteration}")
                raise
        if result is None:
            # Validation draws from the RNG (the DataLoader's seed): the resumed run repeats
            # it from the same state, as the uninterrupted run did.
            set_rng_state(rng, self.device)
            # Cut short on every rank alike; a rank the signal did not reach stops as if sent
            # SIGTERM.
            self.agreed_stop = self.stop_signal or signal.SIGTERM
            return None
        self.pending_validation = False
        self.recorder.validation(self.iteration, result)
        metrics = result.metrics
        if metrics["mIoU"] > self.best_miou:  # False for NaN; the same on every rank
            self.best_miou = metrics["mIoU"]
            self.validations_without_improvement = 0
            if self.best_checkpoint != "none":
                weights_only = self.best_checkpoint == "weights"
                self.save("best", self.weights_state if weights_only else self.state_dict)
        else:
            self.validations_without_improvement += 1
        return metrics

    def validate(self, loader: DataLoader) -> Evaluation | None:
        """Evaluate on ``loader`` (each rank its share, the counts summed over ranks); None when
        a stop signal cut the validation short."""
        model = self.model if self.ema is None else self.ema.module
        predictor = Predictor(model, self.device, self.mean, self.std, self.precision,
                              self.channels_last)  # fmt: skip
        try:
            return evaluate(
                predictor,
                loader,
                len(self.recorder.class_names),
                self.ignore_index,
                num_examples=self.num_val_images,
                num_worst=self.num_val_images,
                stop=lambda: self.stop_signal is not None,
            )
        except torch.OutOfMemoryError as error:
            raise RuntimeError(
                f"Validation: {OOM_HELP}; for validation also data.val_batch_size"
            ) from error

    def state_dict(self) -> dict:
        """Everything needed to resume training (the recorder adds what rebuilds the model)."""
        return {
            "model": unwrapped_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "samples_seen": self.samples_seen,
            "world_size": dist.world_size(),
            "precision": self.precision,  # as resolved: what this run really computed in
            "best_miou": self.best_miou,
            "skipped_steps": self.skipped_steps,
            "pending_validation": self.pending_validation,
            "validations_without_improvement": self.validations_without_improvement,
            "rng": rng_state(self.device),
        } | self.ema_state()

    def weights_state(self) -> dict:
        """What evaluate, predict, export and init_from need (the validated weights) and no more:
        ``trainer.best_checkpoint=weights``. It cannot resume a run."""
        model = self.model if self.ema is None else self.ema.module
        return {
            "kind": WEIGHTS_ONLY,
            "model": unwrapped_state_dict(model),
            "iteration": self.iteration,
            "world_size": dist.world_size(),
            "precision": self.precision,
            "best_miou": self.best_miou,
        }

    def ema_state(self) -> dict:
        """The averaged weights (what evaluate, predict and export use) and how many steps
        they average; nothing without ``ema_decay``."""
        if self.ema is None:
            return {}
        return {"ema": unwrapped_state_dict(self.ema.module),
                "ema_updates": int(self.ema.n_averaged)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_scaler(state["scaler"], state.get("precision"))
        self.iteration = state["iteration"]
        self.samples_seen = state["samples_seen"]
        self.best_miou = state["best_miou"]
        self.skipped_steps = state["skipped_steps"]
        # Checkpoints written before this key existed owe no validation.
        self.pending_validation = state.get("pending_validation", False)
        self.validations_without_improvement = state.get("validations_without_improvement", 0)
        if self.ema is not None:
            # A checkpoint without an average (EMA newly switched on) starts one from its weights.
            self.ema.module.load_state_dict(validated_weights(state))
            self.ema.n_averaged.fill_(state.get("ema_updates", 0))
        set_rng_state(state["rng"], self.device)

    def load_scaler(self, scaler_state: dict, trained_in: str | None) -> None:
        """The grad scaler's state; a run that changes precision keeps a fresh one (fp16 from a
        bf16, fp32 or CPU checkpoint) or none (away from fp16), and says so."""
        trained_in = trained_in or "a precision other than fp16"  # older checkpoints: unknown
        if self.scaler.is_enabled() and not scaler_state:
            log.warning("Resuming in fp16 from a checkpoint trained in %s: the grad scaler "
                        "starts afresh (scale %g)", trained_in, self.scaler.get_scale())  # fmt: skip
        elif not self.scaler.is_enabled() and scaler_state:
            log.warning("Resuming in %s from a checkpoint trained in fp16: its grad scaler "
                        "(scale %g) is no longer needed and is dropped", self.precision,
                        scaler_state.get("scale", float("nan")))  # fmt: skip
        else:
            self.scaler.load_state_dict(scaler_state)
