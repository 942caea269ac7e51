"""The Trainer's guards: non-finite steps, out-of-memory and BatchNorm errors with their fixes,
signals and errors that leave a resumable checkpoint, and what it logs."""

import contextlib
import io
import itertools
import json
import logging
import math
import signal

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from tqdm import tqdm

from seg import checkpoint as checkpoint_module
from seg.checkpoint import load_checkpoint
from seg.data.base import DataError
from seg.device import resolve_compile
from seg.engine import recorder as recorder_module
from seg.engine.guard import EXIT_NONFINITE, StepGuard, StopTraining, skips_on_device
from seg.engine.recorder import Recorder
from seg.engine.trackers import TensorBoard
from seg.engine.trainer import Trainer
from seg.models import Segmenter, torchvision_model
from seg.schedulers import poly
from seg.tasks.semantic import SemanticTask


def batches(batch_size=2, num_classes=3, size=16):
    """uint8 images and masks, as the datasets give them."""
    generator = torch.Generator().manual_seed(0)
    while True:
        yield (
            torch.randint(0, 256, (batch_size, 3, size, size), generator=generator).byte(),
            torch.randint(0, num_classes, (batch_size, size, size), generator=generator).byte(),
        )


class Loader(list):
    """A finite list of batches with the attributes the Trainer reads from a DataLoader."""

    batch_size = 2

    @property
    def dataset(self):
        return range(sum(len(images) for images, _ in self))


class PoisonedLoss(nn.Module):
    """Cross-entropy that returns NaN on chosen calls."""

    def __init__(self, poisoned_calls):
        super().__init__()
        self.poisoned_calls = set(poisoned_calls)
        self.calls = 0

    def forward(self, logits, target):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits.float(), target)
        return loss * math.nan if self.calls in self.poisoned_calls else loss


# How a step is skipped: SGD on the host, fused AdamW on the device.
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "fused_adamw": lambda params: torch.optim.AdamW(params, lr=0.01, fused=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01),
}


def make_trainer(tmp_path, loss_fn, model=None, optimizer="sgd", **kwargs):
    model = model or Segmenter(nn.Conv2d(3, 3, 3, padding=1), stride=1)
    optimizer = OPTIMIZERS[optimizer](model.parameters())
    settings = dict(device="cpu", precision="fp32", max_iters=6, val_every=100, ckpt_every=100)
    recorder = Recorder(tmp_path, ["a", "b", "c"], [[0, 0, 0]] * 3, trackers=[TensorBoard()])
    return Trainer(
        model, semantic_task(loss_fn), optimizer, poly(optimizer, max_iters=6), recorder,
        **(settings | kwargs),
    )  # fmt: skip


def semantic_task(loss_fn, num_classes=3, aux_weight=0.0):
    """The semantic task the trainer tests train: 3 classes, pixels normalized by 0.5 / 0.25."""
    return SemanticTask(num_classes, 255, ["a", "b", "c"][:num_classes], [[0, 0, 0]] * num_classes,
                        [0.5] * 3, [0.25] * 3, loss=loss_fn, aux_weight=aux_weight)  # fmt: skip


def optimizer_state(trainer):
    return [
        {key: value.clone() for key, value in state.items()}
        for state in trainer.optimizer.state.values()
    ]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_non_finite_steps_are_skipped_and_counted(tmp_path, optimizer):
    trainer = make_trainer(tmp_path, PoisonedLoss(poisoned_calls={2, 3}), optimizer=optimizer)
    assert skips_on_device(trainer.optimizer) == (optimizer == "fused_adamw")
    stream = batches()
    trainer.train_step(stream)
    weights = trainer.model.net.weight.detach().clone()
    state = optimizer_state(trainer)
    lr = trainer.scheduler.get_last_lr()
    step = trainer.train_step(stream)
    assert not step.applied and step.decision[0] == 1  # the loss was the non-finite one
    assert torch.equal(trainer.model.net.weight, weights)  # no optimizer step
    for before, after in zip(state, optimizer_state(trainer), strict=True):
        assert all(torch.equal(before[key], after[key]) for key in before)  # state untouched
    assert trainer.scheduler.get_last_lr() != lr  # the schedule follows the iteration
    val = Loader(itertools.islice(batches(), 1))
    trainer.fit(Loader(itertools.islice(stream, 10)), val)
    assert trainer.guard.skipped_steps == 1  # call 3 (in fit), counted once
    assert trainer.iteration == 6


def test_an_unfused_checkpoint_resumes_into_a_fused_optimizer(tmp_path):
    # A checkpoint's param groups bring their own ``fused``: the step must follow them.
    old = make_trainer(tmp_path, nn.CrossEntropyLoss(), optimizer="adamw")
    old.train_step(batches())
    resumed = make_trainer(tmp_path, PoisonedLoss(poisoned_calls={1}), optimizer="fused_adamw")
    resumed.load_state_dict(old.state_dict())
    assert not skips_on_device(resumed.optimizer)
    weights = resumed.model.net.weight.detach().clone()
    stream = batches()
    assert not resumed.train_step(stream).applied
    assert torch.equal(resumed.model.net.weight, weights)
    assert resumed.train_step(stream).applied


def test_a_skipped_first_step_leaves_a_clean_optimizer_state(tmp_path):
    # The case fused SGD gets wrong (its momentum stays uninitialized memory): SGD decides on
    # the host, so the skipped step leaves no state and the next one starts it cleanly.
    trainer = make_trainer(tmp_path, PoisonedLoss(poisoned_calls={1}))
    stream = batches()
    assert not trainer.train_step(stream).applied
    assert not any(trainer.optimizer.state.values())
    assert trainer.train_step(stream).applied
    for state in trainer.optimizer.state.values():
        assert torch.isfinite(state["momentum_buffer"]).all()
    assert torch.isfinite(trainer.model.net.weight).all()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_too_many_non_finite_steps_stop_with_the_last_good_checkpoint(tmp_path, optimizer):
    trainer = make_trainer(
        tmp_path, PoisonedLoss(poisoned_calls=range(3, 100)), nonfinite_patience=3, ckpt_every=1,
        optimizer=optimizer,
    )  # fmt: skip
    with pytest.raises(StopTraining, match="non-finite 3 steps in a row") as stop:
        trainer.fit(Loader(itertools.islice(batches(), 10)), Loader(itertools.islice(batches(), 1)))
    assert stop.value.exit_code == EXIT_NONFINITE
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("optimizer", ["sgd", "fused_adamw"])
def test_weights_made_non_finite_by_an_update_stop_before_any_validation(tmp_path, optimizer):
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), optimizer=optimizer, val_every=1)
    trainer.optimizer.param_groups[0]["lr"] = 1e38  # the loss and gradients stay finite
    trainer.scheduler.base_lrs = [1e38]
    with pytest.raises(StopTraining, match="iteration 1: its update made the weights non-finite"):
        trainer.fit(Loader(itertools.islice(batches(), 10)), Loader(itertools.islice(batches(), 1)))
    assert not (tmp_path / "metrics.jsonl").exists()  # no NaN model validated, or became best


class BrokenStore:
    """A tracker whose store turns read-only mid-run: it fails from its second write on, and
    when it closes."""

    def __init__(self):
        self.writes = 0

    @contextlib.contextmanager
    def session(self, run_dir, iteration, params):
        yield
        raise OSError("attempt to write a readonly database")

    def scalars(self, values, step):
        self.writes += 1
        if self.writes > 1:
            raise OSError("attempt to write a readonly database\n(240 more lines)")

    def images(self, pictures, step):
        pass


def test_a_tracker_failing_mid_run_is_reported_once_and_loses_no_steps(tmp_path, caplog):
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), log_every=1, ckpt_every=2)
    store = BrokenStore()
    trainer.recorder.trackers = [store]
    with caplog.at_level(logging.ERROR):
        fit_with(trainer, batches())
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 6
    assert caplog.text.count("Tracker BrokenStore failed") == 1 and store.writes == 2
    assert "240 more lines" not in caplog.text


def test_out_of_memory_says_which_knobs_to_turn(tmp_path):
    class Hungry(nn.Conv2d):
        def forward(self, images):
            raise torch.OutOfMemoryError("CUDA out of memory")

    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), model=Segmenter(Hungry(3, 3, 1), 1))
    with pytest.raises(RuntimeError, match=r"data.batch_size.*crop_size.*precision"):
        trainer.train_step(batches())


def test_batch_of_one_with_batchnorm_pooling_says_how_to_fix(tmp_path):
    model = torchvision_model("deeplabv3", 3, encoder_name="mobilenet_v3_large")
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), model=model)
    with pytest.raises(ValueError, match=r"data.batch_size >= 2"):
        trainer.train_step(batches(batch_size=1, size=32))


def test_compile_failure_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch, caplog):
    def broken_compile(model):
        def fails(*args, **kwargs):
            raise RuntimeError("backend exploded")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), compile=True)
    step = trainer.train_step(batches())
    assert step.applied
    assert "torch.compile failed (RuntimeError: backend exploded)" in caplog.text
    assert trainer.compiled.eager  # from now on, and still under DDP if any
    assert trainer.train_step(batches()).applied


def test_compile_auto_is_on_for_cuda_only_and_its_time_is_logged(tmp_path, monkeypatch, caplog):
    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile("auto", torch.device("cpu")) is False
    with pytest.raises(ValueError, match=r"trainer.compile='yes'; options: auto, true, false"):
        resolve_compile("yes", torch.device("cpu"))
    assert make_trainer(tmp_path, nn.CrossEntropyLoss()).compiled is None  # auto on the CPU
    monkeypatch.setattr(torch, "compile", lambda model: lambda *a, **k: model(*a, **k))
    caplog.set_level(logging.INFO)
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), compile=True)
    trainer.train_step(batches())
    trainer.train_step(batches())
    assert caplog.text.count("trainer.compile: compiled the training step in") == 1


def test_fit_logs_where_the_time_went(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), max_iters=2)
    trainer.fit(Loader(itertools.islice(batches(), 2)), Loader(itertools.islice(batches(), 1)))
    assert "s training steps" in caplog.text and "s validation" in caplog.text


class SignallingLoader(Loader):
    """Sends this process SIGINT once, just before batch number ``at`` (from 0): the signal
    reaches the trainer while it is inside a step or a validation."""

    at = None

    def __iter__(self):
        for i, batch in enumerate(list.__iter__(self)):
            if i == self.at:
                self.at = None  # once: Loader.dataset iterates too
                signal.raise_signal(signal.SIGINT)
            yield batch


def val_batches():
    return Loader(itertools.islice(batches(), 2))


@pytest.mark.parametrize("where", ["validation", "step"])
def test_a_validation_skipped_by_a_signal_is_owed_and_runs_on_resume(tmp_path, where):
    checkpoints = tmp_path / "checkpoints"
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), max_iters=2)
    train, val = Loader(itertools.islice(batches(), 2)), SignallingLoader(val_batches())
    if where == "validation":
        val.at = 1  # inside the last validation, before its second batch
    else:
        # Inside the last step, just before validation is due: batches are fetched one
        # ahead, so the fetch of batch 2 happens during step 2.
        train = SignallingLoader(itertools.islice(batches(), 3))
        train.at = 2
    with pytest.raises(StopTraining) as stop:
        trainer.fit(train, val)
    assert stop.value.exit_code == 128 + signal.SIGINT
    state = load_checkpoint(checkpoints / "last.pt")
    assert state["iteration"] == 2 and state["pending_validation"]
    assert not (checkpoints / "best.pt").exists()
    assert not (tmp_path / "metrics.jsonl").exists()

    resumed = make_trainer(tmp_path, nn.CrossEntropyLoss(), max_iters=2)
    resumed.load_state_dict(state)
    metrics = resumed.fit(Loader(), val_batches())  # nothing to train: it still validates
    assert metrics["mIoU"] == resumed.best.value
    assert load_checkpoint(checkpoints / "best.pt")["iteration"] == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [2]
    assert not load_checkpoint(checkpoints / "last.pt")["pending_validation"]
    # done: a further resume has nothing left to do
    again = make_trainer(tmp_path, nn.CrossEntropyLoss(), max_iters=2)
    again.load_state_dict(load_checkpoint(checkpoints / "last.pt"))
    assert again.fit(Loader(), val_batches()) == {}
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_checkpoint_from_before_pending_validation_owes_none(tmp_path):
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), max_iters=1)
    trainer.fit(Loader(itertools.islice(batches(), 1)), val_batches())
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    del state["pending_validation"]
    (tmp_path / "metrics.jsonl").unlink()
    resumed = make_trainer(tmp_path, nn.CrossEntropyLoss(), max_iters=1)
    resumed.load_state_dict(state)
    assert resumed.fit(Loader(), val_batches()) == {}
    assert not (tmp_path / "metrics.jsonl").exists()


class Endless:
    """A DataLoader stand-in over an iterator of training batches."""

    batch_size = 2

    def __init__(self, iterator):
        self.iterator = iterator

    def __iter__(self):
        return self.iterator


def fit_with(trainer, train_batches):
    return trainer.fit(Endless(train_batches), val_batches())


def failing_batches(at, error):
    for i, batch in enumerate(batches()):
        if i == at:
            raise error
        yield batch


class FailsOnCall(nn.Conv2d):
    """A convolution whose ``fail_on``-th forward raises ``error`` (if not None)."""

    def __init__(self, fail_on, error):
        super().__init__(3, 3, 3, padding=1)
        self.fail_on, self.error, self.calls = fail_on, error, 0

    def forward(self, images):
        self.calls += 1
        if self.calls == self.fail_on and self.error is not None:
            raise self.error
        return super().forward(images)


ERRORS_BEFORE_THE_UPDATE = {  # each raised in the third iteration
    "data": DataError("img3.png: image file is truncated; replace it"),
    "forward": RuntimeError("a bad kernel"),
    "out of memory": torch.OutOfMemoryError("CUDA out of memory"),
}


@pytest.mark.parametrize("where", ERRORS_BEFORE_THE_UPDATE)
def test_an_error_before_the_optimizer_step_first_saves_the_last_completed_iteration(
    tmp_path, where
):
    error = ERRORS_BEFORE_THE_UPDATE[where]
    train = failing_batches(2, error) if where == "data" else batches()
    net = FailsOnCall(3, None if where == "data" else error)
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), model=Segmenter(net, stride=1))
    with pytest.raises((DataError, RuntimeError)):
        fit_with(trainer, train)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["iteration"] == 2  # the two completed steps are not lost
    for name, value in checkpoint_module.unwrapped_state_dict(trainer.model).items():
        assert torch.equal(state["model"][name], value), name
    assert all(p.grad is None for p in trainer.model.parameters())  # no partial gradients
    resumed = make_trainer(tmp_path, nn.CrossEntropyLoss(), max_iters=3)
    resumed.load_state_dict(state)
    fit_with(resumed, batches())
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 3


def test_only_the_rank_that_writes_says_it_saved(tmp_path, caplog):
    # Under torchrun rank 0 alone writes: another rank's error (rank 0 died) saved nothing.
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), model=Segmenter(FailsOnCall(3, None),
                           stride=1))  # fmt: skip
    trainer.recorder.write = False
    with pytest.raises(DataError), caplog.at_level(logging.WARNING):
        fit_with(trainer, failing_batches(2, DataError("img3.png: truncated")))
    assert "saved" not in caplog.text
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_an_error_in_the_optimizer_step_saves_nothing(tmp_path):
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss())
    steps = []

    def fail_after_the_third_update(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("failed after updating the weights")

    trainer.optimizer.register_step_post_hook(fail_after_the_third_update)
    with pytest.raises(RuntimeError, match="after updating"):
        fit_with(trainer, batches())
    # the weights are no longer those of iteration 2: they must not be saved as such
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


class InterruptedFile(io.FileIO):
    """A checkpoint file whose first write is interrupted by SIGINT twice (Ctrl-C, Ctrl-C)."""

    interrupted = False

    def write(self, data):
        if not InterruptedFile.interrupted:
            InterruptedFile.interrupted = True
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return super().write(data)


def test_a_second_signal_during_a_save_waits_for_it_then_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(InterruptedFile, "interrupted", False)
    monkeypatch.setattr(checkpoint_module, "open", InterruptedFile, raising=False)
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), ckpt_every=1)
    with pytest.raises(StopTraining, match="SIGINT: stopped at iteration 1") as stop:
        fit_with(trainer, batches())
    assert stop.value.exit_code == 128 + signal.SIGINT
    assert InterruptedFile.interrupted
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.pt"]


def ctrl_c_twice(*args):
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGINT)


class InterruptedInBackward(nn.CrossEntropyLoss):
    """Ctrl-C, Ctrl-C from inside autograd's backward pass of the third step."""

    calls = 0

    def forward(self, logits, target):
        self.calls += 1
        if self.calls == 3:
            logits.register_hook(ctrl_c_twice)
        return super().forward(logits, target)


def test_a_second_ctrl_c_in_a_step_saves_the_last_completed_iteration(tmp_path):
    trainer = make_trainer(tmp_path, InterruptedInBackward())
    # One line saying what was saved (it was a traceback from inside autograd, nothing saved).
    match = (
        r"SIGINT received twice: stopped at once in iteration 3; saved .*last\.pt at iteration 2"
    )
    with pytest.raises(StopTraining, match=match) as stop:
        fit_with(trainer, batches())
    assert stop.value.exit_code == 128 + signal.SIGINT
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["iteration"] == 2
    for name, value in checkpoint_module.unwrapped_state_dict(trainer.model).items():
        assert torch.equal(state["model"][name], value), name


@pytest.mark.parametrize(
    ("settings", "saved"),
    [
        ({"ckpt_every": 1}, r"The last checkpoint written is .*last\.pt \(iteration 2\)"),
        # a weights-only best.pt resumes nothing: not named
        ({"val_every": 1, "best_checkpoint": "weights"}, r"no checkpoint to resume from yet"),
    ],
    ids=["last", "weights-only-best"],
)
def test_a_second_ctrl_c_in_the_update_names_the_last_checkpoint_written(tmp_path, settings, saved):
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), **settings)
    steps = []

    def interrupt_the_third_update(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 3:
            ctrl_c_twice()

    trainer.optimizer.register_step_post_hook(interrupt_the_third_update)
    with pytest.raises(StopTraining, match=rf"without saving\. .*{saved}") as stop:
        fit_with(trainer, batches())
    assert stop.value.exit_code == 128 + signal.SIGINT
    # half an update is not saved as iteration 2 or 3
    last = tmp_path / "checkpoints" / "last.pt"
    if last.exists() or "ckpt_every" in settings:
        assert load_checkpoint(last)["iteration"] == 2


class TwiceTerminatedLoss(nn.CrossEntropyLoss):
    """SIGTERM twice in the first step: the launcher's and the one torchrun forwards."""

    def forward(self, logits, target):
        if not getattr(self, "signalled", False):
            self.signalled = True
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
        return super().forward(logits, target)


def test_a_repeated_sigterm_still_stops_after_the_next_step_with_a_save(tmp_path):
    trainer = make_trainer(tmp_path, TwiceTerminatedLoss())
    # The stop decision of step 1 is read once step 2 is queued: the run stops after step 2.
    with pytest.raises(StopTraining, match="SIGTERM: stopped at iteration 2") as stop:
        fit_with(trainer, batches())
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 2


def test_progress_lines_are_logged_under_a_progress_bar_too(tmp_path, monkeypatch, caplog):
    shown = []

    def shown_bar(*args, **kwargs):  # as on a terminal (under pytest, tqdm sees no TTY)
        bar = tqdm(*args, **(kwargs | {"disable": False}))
        shown.append(not bar.disable)
        return bar

    monkeypatch.setattr(recorder_module, "tqdm", shown_bar)
    caplog.set_level(logging.INFO)
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), max_iters=2, log_every=1)
    fit_with(trainer, batches())
    assert shown == [True]
    assert "iteration 1/2  loss " in caplog.text and "iteration 2/2  loss " in caplog.text


def test_tensorboard_val_group_holds_the_headline_metrics_alone(tmp_path):
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), max_iters=1)
    fit_with(trainer, batches())
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {tag for tag in scalars if tag.startswith("val/")} == {
        "val/mIoU", "val/mDice", "val/aAcc", "val/mAcc"
    }  # fmt: skip
    per_class = {f"val_class/{metric}/{name}" for metric in ("IoU", "Dice") for name in "abc"}
    assert {tag for tag in scalars if tag.startswith("val_class/")} == per_class


def fp16_scaler(trainer):
    """Give a CPU trainer an enabled grad scaler, as an fp16 run on CUDA has (same code)."""
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return trainer


def test_an_fp16_resume_from_a_checkpoint_without_a_scaler_starts_a_fresh_one(tmp_path, caplog):
    # GradScaler.load_state_dict({}) raised "The source state dict is empty".
    state = make_trainer(tmp_path, nn.CrossEntropyLoss()).state_dict()
    assert state["scaler"] == {} and state["precision"] == "fp32"
    resumed = fp16_scaler(make_trainer(tmp_path, nn.CrossEntropyLoss()))
    resumed.load_state_dict(state)
    assert resumed.scaler.get_scale() == 1024.0
    assert "Resuming in fp16 from a checkpoint trained in fp32: the grad scaler starts" in (
        caplog.text
    )
    assert resumed.train_step(batches()).applied


def test_a_resume_away_from_fp16_drops_the_scaler_and_says_so(tmp_path, caplog):
    trainer = fp16_scaler(make_trainer(tmp_path, nn.CrossEntropyLoss()))
    trainer.train_step(batches())
    state = trainer.state_dict()
    assert state["scaler"]["scale"] == 1024.0
    make_trainer(tmp_path, nn.CrossEntropyLoss()).load_state_dict(state)
    assert "from a checkpoint trained in fp16: its grad scaler (scale 1024) is no longer" in (
        caplog.text
    )


def test_out_of_memory_while_compiling_is_not_taken_for_a_compile_failure(tmp_path, monkeypatch):
    def compile_runs_out_of_memory(model):
        def run(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory")

        return run

    monkeypatch.setattr(torch, "compile", compile_runs_out_of_memory)
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), compile=True)
    with pytest.raises(RuntimeError, match=r"out of memory\. Lower data\.batch_size"):
        trainer.train_step(batches())
    assert not trainer.compiled.eager  # compile stays on


def test_an_error_after_the_compiling_call_propagates(tmp_path, monkeypatch):
    # A later error (here at the third call) is the step's own: compile stays on and the
    # error ends the run, where the fallback used to swallow it and blame compile.
    calls = []

    def compiled(model):
        def run(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("a kernel failed")
            return model(*args, **kwargs)

        return run

    monkeypatch.setattr(torch, "compile", compiled)
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), compile=True)
    stream = batches()
    trainer.train_step(stream)
    trainer.train_step(stream)
    with pytest.raises(RuntimeError, match="a kernel failed"):
        trainer.train_step(stream)


class FailingValidation(Loader):
    def __iter__(self):
        raise torch.OutOfMemoryError("CUDA out of memory")


def test_a_validation_error_first_saves_last_pt_with_the_validation_owed(tmp_path, caplog):
    # Validation and a checkpoint due together (iteration 4): an OOM in validation used to
    # lose the iterations since the last checkpoint.
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), max_iters=4, val_every=4,
                           ckpt_every=4)  # fmt: skip
    with pytest.raises(RuntimeError, match="Validation: out of memory"):
        trainer.fit(Loader(itertools.islice(batches(), 4)), FailingValidation())
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["iteration"] == 4 and state["pending_validation"]
    assert "Validation at iteration 4 failed; saved" in caplog.text
    assert "with the validation owed" in caplog.text
    resumed = make_trainer(tmp_path, nn.CrossEntropyLoss(), max_iters=4)
    resumed.load_state_dict(state)
    assert resumed.fit(Loader(), val_batches())["mIoU"] == resumed.best.value  # validated first


def guard_steps(device="cpu"):
    """A guard and three decisions made on ``device``: finite, non-finite loss, finite."""
    guard = StepGuard(nonfinite_patience=5, scaling=False, last_checkpoint="last.pt")
    norm = torch.ones((), device=device)
    losses = [1.0, float("nan"), 2.0]
    return guard, [guard.queue_read(guard.decide(torch.tensor(v, device=device), norm, i + 1), norm)
                   for i, v in enumerate(losses)]  # fmt: skip


def test_the_guard_acts_on_a_decision_one_step_late():
    guard, (first, nonfinite, third) = guard_steps()
    assert torch.equal(nonfinite.host_decision, nonfinite.decision.cpu())
    assert nonfinite.host_decision.tolist() == [1.0, 0.0, 0.0, 0.0] and nonfinite.copied is None
    guard.unread += [first, nonfinite]
    guard.read(keep=1)  # the newest (non-finite) step is left unread while the next one runs
    assert guard.skipped_steps == 0 and guard.unread == [nonfinite]
    guard.unread.append(third)
    guard.read(keep=1)
    assert guard.skipped_steps == 1 and guard.unread == [third]
    guard.read(keep=0)  # a checkpoint or log line: all of them now
    assert guard.skipped_steps == 1 and guard.unread == []


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    recorder = Recorder(tmp_path, ["a"], [[0, 0, 0]], trackers=[])
    lines = ['{"iteration": 2, "mIoU": 0.5}\n', '{"iteration": 4, "mIoU": 0.6}\n']
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"iteration": 6, "mIo')
    with caplog.at_level(logging.WARNING):
        recorder.truncate_metrics(4)  # a kill while the line for iteration 6 was written
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines)
    assert "torn last line" in caplog.text
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 2\n' + lines[1])
    with pytest.raises(ValueError, match=r"metrics\.jsonl is damaged"):
        recorder.truncate_metrics(4)
