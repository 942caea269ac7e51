"""The training loop: fit / train_step / validate / state_dict / load_state_dict, top to bottom.

It knows no task: the task (``seg.engine.task``) turns a batch into losses and scores a
split; device and precision resolution (``seg.device``), the step guard (signals and the
non-finite guard, ``engine.guard``), the best score (``engine.validation``) and what a run
writes (``engine.recorder``) are parts it calls.
"""

import copy
import logging
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from functools import partial

import torch
from torch import nn
from torch.utils.data import DataLoader

from seg.checkpoint import (
    WEIGHTS_ONLY,
    rank_rng_state,
    rng_state,
    set_rng_state,
    training_state,
    unwrapped_state_dict,
    validated_weights,
)
from seg.device import (
    AMP_DTYPES,
    CompiledForward,
    configure_determinism,
    resolve_channels_last,
    resolve_compile,
    resolve_device,
    resolve_precision,
)
from seg.engine import dist
from seg.engine.evaluation import evaluate
from seg.engine.guard import StepGuard, StepResult, StopTraining, skips_on_device
from seg.engine.prefetch import DeviceBatches
from seg.engine.recorder import Recorder
from seg.engine.task import Report, Task
from seg.engine.validation import BestScore

log = logging.getLogger(__name__)
# The schedule follows the iteration, applied or skipped: when a process's first step is skipped
# (an fp16 overflow, a non-finite loss), torch warns that the scheduler stepped before the
# optimizer. Filtered once here: catch_warnings() around each step would reset Python's
# once-per-location memory and repeat every other warning at every step.
warnings.filterwarnings(
    "ignore", r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`", UserWarning
)

# trainer.best_checkpoint: best.pt resumes like last.pt, holds the validated weights alone (a
# quarter of an AdamW checkpoint), or is not written.
BEST_CHECKPOINTS = ("full", "weights", "none")

OOM_HELP = (
    "out of memory. Lower data.batch_size (with trainer.grad_accum_steps to keep the effective "
    "batch), lower data.train_transform.crop_size, or use trainer.precision=bf16/fp16"
)


class WeightAverage:
    """An exponential moving average of a model's weights and buffers (BatchNorm statistics
    included), in ``module``: floating tensors move ``1 - decay`` of the way to the model's
    after each update (the first update copies them), integer buffers (BatchNorm's
    ``num_batches_tracked``) are copied. The floating values equal torch's ``AveragedModel``
    with ``get_ema_multi_avg_fn(decay)`` and ``use_buffers=True``, whose state dict this one's
    is; but the update count is a Python int and each update is a few foreach kernels, where
    ``AveragedModel`` copies its CPU count to the device per dtype group (blocking) and
    averages each integer buffer in kernels of its own."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model)
        self.decay = decay
        self.n_averaged = 0  # updates so far
        # Positions in [*parameters, *buffers] by (device, dtype): one foreach call per group
        # (a mixed list falls back to a kernel per tensor).
        self.groups: dict[tuple, list[int]] = {}
        for at, tensor in enumerate(self.tensors(self.module)):
            self.groups.setdefault((tensor.device, tensor.dtype), []).append(at)

    @staticmethod
    def tensors(model: nn.Module) -> list[torch.Tensor]:
        return [tensor.detach() for tensor in (*model.parameters(), *model.buffers())]

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Average ``model`` (the same architecture, on the same device) in."""
        averaged, current = self.tensors(self.module), self.tensors(model)
        for (_, dtype), positions in self.groups.items():
            ours = [averaged[at] for at in positions]
            theirs = [current[at] for at in positions]
            if self.n_averaged == 0 or not dtype.is_floating_point:
                torch._foreach_copy_(ours, theirs)
            else:
                torch._foreach_lerp_(ours, theirs, 1 - self.decay)
        self.n_averaged += 1


def averaged_model(model: nn.Module, decay: float | None) -> WeightAverage | None:
    """The moving average of ``model``'s weights with ``decay``, or None when it is null."""
    if decay is None:
        return None
    if not 0 < decay < 1:
        raise ValueError(f"trainer.ema_decay={decay!r}; give a number between 0 and 1 "
                         "(e.g. 0.999), or null for no averaging")  # fmt: skip
    return WeightAverage(model, decay)


class Trainer:
    """Iteration-based training with mixed precision, on one process or under torchrun (DDP).

    One iteration is one optimizer step over ``grad_accum_steps`` batches per process. Validation
    runs every ``val_every`` iterations and at the end; ``checkpoints/last.pt`` is written every
    ``ckpt_every`` iterations and at the end, ``checkpoints/best.pt`` whenever the task's
    primary metric improves; ``recorder`` writes them, and everything else the run shows (on
    rank 0 only). SIGINT/SIGTERM reaching any rank finish the next step on every rank, write
    ``last.pt`` and raise ``StopTraining``; a validation they skip or cut short is owed in
    ``last.pt`` and runs first on resume. A second Ctrl-C stops at once, but never inside a
    checkpoint's write; in a step's forward and backward pass it first saves ``last.pt`` at the
    last completed iteration. An error while computing a step's gradients (data, forward, backward,
    out of memory) writes ``last.pt`` at the last completed iteration, then propagates; an
    error in validation writes it with the validation owed. A step with a non-finite loss or
    gradient on any rank is skipped on all; ``nonfinite_patience`` such steps in a row stop
    training with ``last.pt`` untouched. With ``ema_decay``, validation and ``best.pt`` use an
    exponential moving average of the weights. With ``early_stop_patience``, training ends
    after that many validations in a row without a better score; the count is checkpointed,
    so a resumed run keeps it.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        recorder: Recorder,
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
        if dist.resolve_sync_bn(sync_bn, model):
            # Same parameter objects in the new modules: the optimizer's references stay valid.
            model = dist.convert_sync_batchnorm(model, self.device)
        # .to() swaps parameter data in place, so the optimizer's references stay valid.
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.task = task
        self.task.to(self.device)
        # Training steps go through DDP (gradients averaged over ranks) and, with ``compile``,
        # the compiled model; validation, checkpoints and the fallback use the plain one
        # (compilation is lazy: failures show at the first step).
        # compile=auto leaves tasks with data-dependent shapes eager (Mask R-CNN).
        compiling = task.compile_auto or compile != "auto"
        self.compiled = (
            CompiledForward(self.model) if compiling and resolve_compile(compile, self.device)
            else None
        )  # fmt: skip
        self.ddp_model = dist.wrap(self.compiled or self.model, self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.recorder = recorder
        # A no-op unless fp16: bf16 has fp32's exponent range and needs no loss scaling.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.autocast = partial(torch.autocast, self.device.type, AMP_DTYPES[self.precision],
                                enabled=self.precision != "fp32")  # fmt: skip
        configure_determinism(deterministic, self.device)
        self.max_iters = max_iters
        self.grad_accum_steps = grad_accum_steps
        self.clip_grad_norm = clip_grad_norm
        self.val_every = val_every
        self.ckpt_every = ckpt_every
        self.log_every = log_every
        self.num_val_images = num_val_images
        # Averages the plain model's weights after each applied step (not DDP's or compile's
        # wrapper: the same tensors, without their prefixes).
        self.ema = averaged_model(self.model, ema_decay)
        self.best = BestScore(task.metric, task.mode, early_stop_patience)
        if best_checkpoint not in BEST_CHECKPOINTS:
            raise ValueError(
                f"trainer.best_checkpoint={best_checkpoint!r}; options: {list(BEST_CHECKPOINTS)}"
            )
        self.best_checkpoint = best_checkpoint
        self.keep_checkpoints = keep_checkpoints
        self.guard = StepGuard(nonfinite_patience, self.scaler.is_enabled(),
                               recorder.checkpoint_path("last"))  # fmt: skip
        self.iteration = 0
        self.samples_seen = 0  # training samples consumed by all ranks: the data order's position
        # True from the moment a validation is due until it completes: a checkpoint saved in
        # between (a stop signal) makes the resumed run validate before training on.
        self.pending_validation = False
        # Every rank's random state, gathered where all ranks save together (rank 0 writes).
        self.rank_rng: list[dict] = []

    def fit(self, train_loader: DataLoader, val_loader: DataLoader) -> dict:
        """Train from ``self.iteration`` to ``max_iters``; returns the last validation's record
        (its metrics.jsonl line)."""
        images_per_step = train_loader.batch_size * self.grad_accum_steps * dist.world_size()
        log.info(
            "Training on %s, precision %s%s, iterations %d -> %d, run dir %s",
            self.device, self.precision, ", channels_last" if self.channels_last else "",
            self.iteration, self.max_iters, self.recorder.run_dir,
        )  # fmt: skip
        batches = DeviceBatches(iter(train_loader), self.device)  # one batch ahead
        record = {}
        self.model.train()
        with (
            self.recorder.session(self.iteration, self.max_iters, images_per_step, self.device),
            self.guard.catching_signals(),
        ):
            if self.pending_validation:  # the checkpoint's run stopped before it was done
                record = self.validate_and_keep_best(val_loader) or record
                if self.guard.agreed_stop is not None:
                    self.stop_after_signal()
                self.save("last")  # record it done: a later resume does not repeat it
            while self.iteration < self.max_iters and not self.best.spent():
                with self.recorder.timed("training steps"):
                    step = self.fit_step(batches)
                self.iteration += 1
                self.samples_seen += images_per_step
                self.recorder.step(step.loss, step.applied)
                self.guard.unread.append(step)
                last = self.iteration == self.max_iters
                due = [self.iteration % every == 0 or last
                       for every in (self.log_every, self.val_every, self.ckpt_every)]  # fmt: skip
                # The previous step's decision, read while this one runs on the device; this
                # one's too where logs, validation or a checkpoint need the counts now.
                self.guard.read(keep=0 if any(due) else 1)

                if due[0]:
                    lr = self.scheduler.get_last_lr()[0]
                    skipped = self.guard.skipped_steps
                    self.recorder.training(self.iteration, self.max_iters, lr, skipped)

                if due[1]:
                    self.pending_validation = True
                    record = self.validate_and_keep_best(val_loader) or record
                    self.recorder.restart_clock()  # img/s counts training time only

                if due[2] or self.best.spent():
                    with self.recorder.timed("checkpoints"):
                        self.save("last")
                        self.recorder.keep_snapshot(self.iteration, self.keep_checkpoints)
                if self.guard.agreed_stop is not None:
                    self.stop_after_signal()
        best = f"best val {self.best.metric} {self.best.value:.4f}"
        if self.best.spent():
            log.warning(
                "Early stop at iteration %d of %d: val %s has not improved on %.4f for %d "
                "validations (trainer.early_stop_patience). To train on, resume with a larger "
                "trainer.early_stop_patience, or null.",
                self.iteration, self.max_iters, self.best.metric, self.best.value,
                self.best.without_improvement,
            )  # fmt: skip
        log.info("Done: %s, checkpoints in %s", best, self.recorder.run_dir)
        return record

    def fit_step(self, batches: Iterator) -> StepResult:
        """``train_step`` for ``fit``: until the optimizer step the weights are those of the last
        completed iteration, so an error before it (a data error, forward, backward, out of
        memory) first saves them to ``last.pt``. Later errors save nothing: the optimizer may
        have updated part of the weights."""
        try:
            total = self.accumulate_gradients(batches)
        except KeyboardInterrupt:
            # A second Ctrl-C (StepGuard), mostly met here, where steps spend their time: the
            # weights are whole, so the first Ctrl-C's promise holds, as for an error.
            self.optimizer.zero_grad(set_to_none=True)
            self.save("last", collective=False)  # the other ranks may be anywhere
            path = self.recorder.checkpoint_path("last")
            saved = (f"; saved {path} at iteration {self.iteration}. Continue with: python "
                     f"train.py resume={path}") * self.recorder.write  # fmt: skip
            raise StopTraining(
                f"SIGINT received twice: stopped at once in iteration {self.iteration + 1}{saved}",
                128 + signal.SIGINT,
            ) from None
        except Exception as error:
            self.optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
            if self.guard.stop_signal is not None and isinstance(error, RuntimeError):
                # A process-group SIGTERM (Slurm) also ended the DataLoader workers.
                self.guard.agreed_stop = self.guard.stop_signal
                self.stop_after_signal()
            self.save_before_error()
            raise
        return self.apply_gradients(total)

    def save_before_error(self, what: str | None = None) -> None:
        """Save ``last.pt`` at the last completed iteration, before an error in ``what`` (by
        default the next iteration) ends the run. This rank alone is here: no collective."""
        what = what or f"Iteration {self.iteration + 1}"
        path = self.recorder.checkpoint_path("last")
        try:
            self.save("last", collective=False)
        except (OSError, RuntimeError) as save_error:
            # The error that stopped the step matters more: it propagates, this is logged.
            log.error("Could not save %s before stopping: %s", path, save_error)
            return
        if not self.recorder.write:
            return  # rank 0 writes, and says so: another rank saved nothing (rank 0 may be dead)
        owed = " with the validation owed (it runs first on resume)" * self.pending_validation
        log.warning(
            "%s failed; saved %s at iteration %d%s. Once the error below is fixed, continue "
            "with: python train.py resume=%s",
            what, path, self.iteration, owed, path,
        )  # fmt: skip

    def save(
        self, name: str, state: Callable[[], dict] | None = None, collective: bool = True
    ) -> None:
        """Write ``checkpoints/<name>.pt`` from ``state()`` (by default ``state_dict``: all that
        resumes the run) on rank 0. ``collective``: every rank is here at the same step, and
        gives its random state to the checkpoint (else only this rank's is kept)."""
        self.guard.read(keep=0)  # the skipped-step count the checkpoint holds is complete
        own = rng_state(self.device)
        self.rank_rng = dist.gather(own) if collective else [own]
        path = self.recorder.checkpoint_path(name)
        try:
            resumable = state in (None, self.state_dict)
            with self.guard.saving_checkpoint(path, self.iteration, self.max_iters, resumable):
                self.recorder.save(state or self.state_dict, name)
        finally:
            self.rank_rng = []

    def stop_after_signal(self) -> None:
        """Save ``last.pt`` at the current iteration and raise ``StopTraining`` (every rank)."""
        self.save("last")
        dist.barrier()  # no rank exits while rank 0 still writes: torchrun would stop it
        path = self.recorder.checkpoint_path("last")
        signal_number = self.guard.agreed_stop
        name = signal.Signals(signal_number).name
        raise StopTraining(
            f"{name}: stopped at iteration {self.iteration} of {self.max_iters}; saved "
            f"{path}. Continue with: python train.py resume={path}",
            128 + signal_number,
        )

    def train_step(self, batches: Iterator) -> StepResult:
        """One optimizer step over ``grad_accum_steps`` batches, skipped if non-finite."""
        return self.apply_gradients(self.accumulate_gradients(batches))

    def accumulate_gradients(self, batches: Iterator) -> torch.Tensor:
        """Forward and backward over ``grad_accum_steps`` batches; returns their mean loss
        (on the device). The weights are not changed."""
        total = torch.zeros((), device=self.device)
        try:
            for index in range(self.grad_accum_steps):
                batch = self.task.prepare(next(batches), self.device, self.memory_format)
                # DDP averages the gradients over ranks once per step, in the last backward.
                last = index == self.grad_accum_steps - 1
                with nullcontext() if last else dist.no_sync(self.ddp_model):
                    started = time.perf_counter()
                    losses = self.task.loss(self.ddp_model, batch, self.autocast)
                    if self.compiled is not None and self.compiled.calls == 1:
                        self.agree_on_compile(time.perf_counter() - started)
                    loss = sum(losses.values())  # float32 scalars, each the task's
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
        # rank.
        step = self.guard.decide(total, grad_norm, self.iteration + 1)
        if skips_on_device(self.optimizer):
            # The fused kernel skips the whole update where found_inf is 1 (GradScaler's own
            # protocol, whose inf check the gradient norm above already covers).
            self.optimizer.found_inf = (~step.applied).float()
            self.optimizer.step()
            del self.optimizer.found_inf
        elif step.applied.item():  # any other optimizer: a host sync decides
            self.optimizer.step()
        # An update that made the weights non-finite though loss and gradients were finite (an
        # absurd LR): read with the decision, at no sync of its own, before any validation.
        step = self.guard.queue_read(step, nn.utils.get_total_norm(list(self.model.parameters())))
        self.scaler.update()  # under fp16, an overflow lowers the scale for the next step
        self.scheduler.step()  # the schedule follows the iteration, applied or skipped
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return step

    def validate_and_keep_best(self, loader: DataLoader) -> dict | None:
        """Run the owed validation (``pending_validation``) and save ``best.pt`` if it is the
        best so far; returns its record. None when a stop signal came first or cut it short:
        it stays owed."""
        if self.guard.agreed_stop is not None:
            return None
        rng = rng_state(self.device)
        with self.recorder.timed("validation"):
            try:
                report = self.validate(loader)
            except Exception:
                # Out of memory at full resolution is the likeliest GPU error: the iterations
                # since the last checkpoint are kept, with the validation owed.
                set_rng_state(rng, self.device)  # as before the validation, like a stop's save
                self.save_before_error(f"Validation at iteration {self.iteration}")
                raise
        if report is None:
            # Validation draws from the RNG (the DataLoader's seed): the resumed run repeats
            # it from the same state, as the uninterrupted run did.
            set_rng_state(rng, self.device)
            # Cut short on every rank alike; a rank the signal did not reach stops as if sent
            # SIGTERM.
            self.guard.agreed_stop = self.guard.stop_signal or signal.SIGTERM
            return None
        self.pending_validation = False
        self.recorder.validation(self.iteration, report)
        if self.best.update(report.score) and self.best_checkpoint != "none":
            weights_only = self.best_checkpoint == "weights"
            self.save("best", self.weights_state if weights_only else self.state_dict)
        return report.record

    def validate(self, loader: DataLoader) -> Report | None:
        """Evaluate on ``loader`` (each rank its share, combined over ranks by the task's
        evaluator); None when a stop signal cut the validation short."""
        model = self.model if self.ema is None else self.ema.module
        predict = self.task.predictor(model, self.device, self.precision, self.channels_last)
        try:
            # the split's dataset: a task may score against its files (COCO's annotations)
            evaluator = self.task.evaluator(
                self.device, self.num_val_images, dataset=loader.dataset
            )
            result = evaluate(model, predict, loader, evaluator, self.device,
                              stop=lambda: self.guard.stop_signal is not None)  # fmt: skip
        except torch.OutOfMemoryError as error:
            raise RuntimeError(
                f"Validation: {OOM_HELP}; for validation also data.val_batch_size"
            ) from error
        return None if result is None else self.task.report(result, "val")

    def state_dict(self) -> dict:
        """Everything needed to resume training (the recorder adds what rebuilds the model)."""
        ema = {}
        if self.ema is not None:
            ema = {"ema": unwrapped_state_dict(self.ema.module),
                   "ema_updates": self.ema.n_averaged}  # fmt: skip
        return training_state(
            model=unwrapped_state_dict(self.model),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            iteration=self.iteration,
            samples_seen=self.samples_seen,
            world_size=dist.world_size(),
            precision=self.precision,  # as resolved: what this run really computed in
            best_metric=self.best.value,
            metric=self.best.metric,
            skipped_steps=self.guard.skipped_steps,
            pending_validation=self.pending_validation,
            validations_without_improvement=self.best.without_improvement,
            rng=self.rank_rng or [rng_state(self.device)],
            **ema,
        )

    def weights_state(self) -> dict:
        """What evaluate, predict, export and init_from need (the validated weights) and no more:
        ``trainer.best_checkpoint=weights``. It cannot resume a run."""
        model = self.model if self.ema is None else self.ema.module
        return training_state(
            kind=WEIGHTS_ONLY,
            model=unwrapped_state_dict(model),
            iteration=self.iteration,
            world_size=dist.world_size(),
            precision=self.precision,
            best_metric=self.best.value,
            metric=self.best.metric,
        )

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_scaler(state["scaler"], state.get("precision"))
        self.iteration = state["iteration"]
        self.samples_seen = state["samples_seen"]
        self.best.value = state["best_metric"]
        self.guard.skipped_steps = state["skipped_steps"]
        # Checkpoints written before these keys existed owe no validation.
        self.pending_validation = state.get("pending_validation", False)
        self.best.without_improvement = state.get("validations_without_improvement", 0)
        if self.ema is not None:
            # A checkpoint without an average (EMA newly switched on) starts one from its weights.
            self.ema.module.load_state_dict(validated_weights(state))
            self.ema.n_averaged = state.get("ema_updates", 0)
        rng, own = rank_rng_state(state["rng"], dist.rank(), dist.world_size())
        if not own and dist.world_size() > 1:
            log.warning(
                "The checkpoint holds the random state of %d process(es), not of each of these "
                "%d: every process continues from rank 0's (exact where the ranks draw alike, "
                "as semantic runs do)", len(state["rng"]), dist.world_size(),
            )  # fmt: skip
        set_rng_state(rng, self.device)

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
