"""The decisions every step carries across ranks: whether its loss and gradients were finite
(the non-finite guard) and whether a stop signal reached any rank. Made on the device, the same
on every rank, and copied to pinned host memory behind an event; the host reads each step's
decision one step late, waiting for that step's event alone: it runs at most one step ahead
of the device and never waits for the step it just queued."""

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from seg.engine import dist

log = logging.getLogger(__name__)

# Exit codes of train.py (docs: resume and reliability): 128 + signal number after
# SIGINT/SIGTERM (130, 143), and this one when the non-finite guard gives up.
EXIT_NONFINITE = 3


class StopTraining(Exception):
    """Training stopped early on purpose; ``exit_code`` is what the command exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StepResult(NamedTuple):
    loss: torch.Tensor  # mean loss of the step's batches, on the device
    # On the device, the same on every rank: [non-finite loss, non-finite gradients, the number
    # of a stop signal that reached any rank (0: none), non-finite weights after the step (the
    # Trainer's)]. The host reads it one step late.
    decision: torch.Tensor
    applied: torch.Tensor  # whether the optimizer stepped (nothing non-finite), on the device
    iteration: int
    # ``decision`` on the host (pinned), complete once ``copied`` has happened (None on the CPU:
    # the copy was synchronous); None until ``queue_read``.
    host_decision: torch.Tensor | None
    copied: torch.cuda.Event | None


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip a step on the device: fused Adam and AdamW leave weights
    and state untouched where ``found_inf`` is 1, so no host sync decides the step. Fused SGD
    takes ``found_inf`` too, but a skipped first step leaves its momentum uninitialized (torch
    2.14, seen here; LibreYOLO #771 on CUDA): it decides on the host like every other optimizer."""
    # The groups, not the defaults: a loaded state dict brings its groups' own ``fused``.
    fused = all(group.get("fused") for group in optimizer.param_groups)
    return fused and isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)


class StepGuard:
    """Signals and the non-finite guard, for one training run.

    SIGINT/SIGTERM only set ``stop_signal``, which the next step's decision carries to every
    rank (``agreed_stop`` once read). A second Ctrl-C stops at once (``KeyboardInterrupt``: the
    Trainer saves first where the weights are whole, ``catching_signals`` names the last
    resumable checkpoint written, ``saved``), or during a checkpoint's write (``saving``) as
    soon as it is complete (``deferred_signal``); a repeated SIGTERM changes nothing: launchers
    forward theirs. A step with a non-finite loss or gradient on any rank is skipped on all
    (``skipped_steps``); ``nonfinite_patience`` such steps in a row raise ``StopTraining``,
    naming ``last_checkpoint`` (untouched). Under fp16 (``scaling``) overflows with a finite
    loss are the grad scaler's calibration and do not count.
    """

    def __init__(self, nonfinite_patience: int, scaling: bool, last_checkpoint: Path):
        self.nonfinite_patience = nonfinite_patience
        self.scaling = scaling
        self.last_checkpoint = last_checkpoint
        self.skipped_steps = 0
        self.nonfinite_streak = 0
        self.stop_signal: int | None = None  # a signal that reached this process
        self.agreed_stop: int | None = None  # the signal on which all ranks stop, once read
        self.saving = False  # a checkpoint is being written: a second signal waits for it
        self.deferred_signal: int | None = None
        self.saved: tuple[Path, int] | None = None  # the last resumable checkpoint, its iteration
        # Steps of ``fit`` whose decisions the host has not read yet (the newest one, between
        # log lines).
        self.unread: list[StepResult] = []

    def decide(self, loss: torch.Tensor, grad_norm: torch.Tensor, iteration: int) -> StepResult:
        """The step's decision, agreed by all ranks in one small all-reduce on the device."""
        # A fill: torch.tensor(value, device=cuda) would be a blocking copy.
        signal_number = torch.full((), float(self.stop_signal or 0), device=loss.device)
        decision = torch.stack([loss.isfinite().logical_not().float(),
                                grad_norm.isfinite().logical_not().float(), signal_number])  # fmt: skip
        decision = dist.any_rank(decision)
        return StepResult(loss, decision, decision[:2].sum() == 0, iteration, None, None)

    def queue_read(self, step: StepResult, weights_norm: torch.Tensor) -> StepResult:
        """The step's decision plus whether its update left the weights non-finite (an absurd
        LR with finite loss and gradients; DDP keeps weights equal on every rank, so no
        collective), queued for the host to read later."""
        decision = torch.cat([step.decision, weights_norm.isfinite().logical_not().float()[None]])
        # A non-blocking copy to pinned memory and an event: reading ``decision`` itself
        # (.tolist()) would wait for everything queued, the next step included.
        cuda = decision.device.type == "cuda"
        host = torch.empty(decision.shape, dtype=decision.dtype, pin_memory=cuda)
        host.copy_(decision, non_blocking=cuda)
        copied = torch.cuda.Event() if cuda else None
        if copied is not None:
            copied.record()
        return step._replace(decision=decision, host_decision=host, copied=copied)

    def read(self, keep: int) -> None:
        """Act on the decisions of the unread steps but the newest ``keep``: the host waits for
        a step's decision (its event) only once the next step is queued, so the device never
        idles for it."""
        while len(self.unread) > keep:
            self.check(self.unread.pop(0))

    def check(self, step: StepResult) -> None:
        """Count a skipped step; stop after ``nonfinite_patience`` unhealthy steps in a row;
        note a stop signal that reached any rank (all ranks read the same, at the same step)."""
        if step.copied is not None:
            step.copied.synchronize()  # this step's decision only, not what was queued after it
        nonfinite_loss, nonfinite_grads, stop, nonfinite_weights = step.host_decision.tolist()
        if nonfinite_weights:  # every later step and validation would be NaN: stop now
            raise StopTraining(
                f"Stopped at iteration {step.iteration}: its update made the weights non-finite "
                "though the loss and gradients were finite: too large a learning rate "
                f"(optimizer.lr, optimizer.encoder_lr_mult). {self.last_checkpoint} is intact.",
                EXIT_NONFINITE,
            )
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
        healthy = not nonfinite_loss and (not nonfinite_grads or self.scaling)
        self.nonfinite_streak = 0 if healthy else self.nonfinite_streak + 1
        if self.nonfinite_streak >= self.nonfinite_patience:
            raise StopTraining(
                f"Stopped at iteration {step.iteration}: loss or gradients non-finite "
                f"{self.nonfinite_streak} steps in a row (trainer.nonfinite_patience). The last "
                f"good checkpoint {self.last_checkpoint} is intact. Lower optimizer.lr, set "
                "trainer.clip_grad_norm, or try trainer.precision=fp32.",
                EXIT_NONFINITE,
            )

    @contextmanager
    def catching_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM set ``stop_signal`` while the block runs (see the class)."""

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
        except KeyboardInterrupt:
            # The second Ctrl-C came where the weights may be half updated (the optimizer
            # step, a validation's bookkeeping): one line on what is saved, not a traceback
            # from wherever it landed (inside autograd, a DataLoader, a collective).
            if self.saved is None:
                saved = "This run wrote no checkpoint to resume from yet."
            else:
                path, iteration = self.saved
                saved = (f"The last checkpoint written is {path} (iteration {iteration}); "
                         f"continue with: python train.py resume={path}")  # fmt: skip
            raise StopTraining(
                f"SIGINT received twice: stopped at once, outside a step's forward and backward "
                f"pass, without saving. {saved}",
                128 + signal.SIGINT,
            ) from None
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextmanager
    def saving_checkpoint(
        self, path: Path, iteration: int, max_iters: int, resumable: bool = True
    ) -> Iterator[None]:
        """A checkpoint's write: a second stop signal meanwhile waits until the file is
        complete, then stops (raised inside torch.save it would abort the save with torch's
        internal error). ``resumable``: not a weights-only file."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if resumable:
            self.saved = (path, iteration)
        if self.deferred_signal is not None:
            name = signal.Signals(self.deferred_signal).name
            raise StopTraining(
                f"{name}: stopped at iteration {iteration} of {max_iters} once "
                f"{path} was saved. Continue with: python train.py resume={path}",
                128 + self.deferred_signal,
            )
