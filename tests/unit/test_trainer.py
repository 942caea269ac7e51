"""The Trainer's guards: non-finite steps, out-of-memory and BatchNorm errors with their fixes."""

import itertools
import logging
import math

import pytest
import torch
from torch import nn

from seg.engine.trainer import EXIT_NONFINITE, StopTraining, Trainer
from seg.models import Segmenter, torchvision_model
from seg.schedulers import poly


def batches(batch_size=2, num_classes=3, size=16):
    generator = torch.Generator().manual_seed(0)
    while True:
        yield (
            torch.randn(batch_size, 3, size, size, generator=generator),
            torch.randint(0, num_classes, (batch_size, size, size), generator=generator),
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


def make_trainer(tmp_path, loss_fn, model=None, **kwargs):
    model = model or Segmenter(nn.Conv2d(3, 3, 3, padding=1), stride=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = dict(device="cpu", precision="fp32", max_iters=6, val_every=100, ckpt_every=100)
    return Trainer(
        model, loss_fn, optimizer, poly(optimizer, max_iters=6), tmp_path, ["a", "b", "c"],
        [[0, 0, 0]] * 3, 255, [0.5] * 3, [0.5] * 3, **(settings | kwargs),
    )  # fmt: skip


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    trainer = make_trainer(tmp_path, PoisonedLoss(poisoned_calls={2, 3}))
    stream = batches()
    trainer.train_step(stream)
    weights = trainer.model.net.weight.detach().clone()
    lr = trainer.scheduler.get_last_lr()
    step = trainer.train_step(stream)
    assert not step.applied and not step.finite_loss
    assert torch.equal(trainer.model.net.weight, weights)  # no optimizer step
    assert trainer.scheduler.get_last_lr() == lr  # no scheduler step
    val = Loader(itertools.islice(batches(), 1))
    trainer.fit(Loader(itertools.islice(stream, 10)), val)
    assert trainer.skipped_steps == 1  # call 3 (in fit), counted once
    assert trainer.iteration == 6


def test_too_many_non_finite_steps_stop_with_the_last_good_checkpoint(tmp_path):
    trainer = make_trainer(
        tmp_path, PoisonedLoss(poisoned_calls=range(3, 100)), nonfinite_patience=3, ckpt_every=1
    )
    with pytest.raises(StopTraining, match="non-finite 3 steps in a row") as stop:
        trainer.fit(Loader(itertools.islice(batches(), 10)), Loader(itertools.islice(batches(), 1)))
    assert stop.value.exit_code == EXIT_NONFINITE
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


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
    assert trainer.forward_model is trainer.model


def test_fit_logs_where_the_time_went(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), max_iters=2)
    trainer.fit(Loader(itertools.islice(batches(), 2)), Loader(itertools.islice(batches(), 1)))
    assert "s training steps" in caplog.text and "s validation" in caplog.text
