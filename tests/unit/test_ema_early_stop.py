"""EMA of the weights and early stopping: what they compute, what validation and restore use,
and that a resumed run carries both on exactly."""

import itertools
import json
import logging

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from seg.checkpoint import load_checkpoint, unwrapped_state_dict
from seg.engine.trainer import averaged_model
from seg.inference import Predictor
from seg.tasks.semantic import evaluate
from tests.conftest import run_evaluation, run_training
from tests.unit.test_trainer import Endless, batches, make_trainer, val_batches


def steps(trainer, count, stream):
    for _ in range(count):
        assert trainer.train_step(stream).applied
        trainer.iteration += 1


def test_ema_follows_the_weights_with_its_decay(tmp_path):
    decay = 0.5
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), ema_decay=decay)
    stream = batches()
    expected = None
    for _ in range(3):
        steps(trainer, 1, stream)
        weight = trainer.model.net.weight.detach()
        # The first update copies the weights; each later one moves by (1 - decay).
        expected = weight.clone() if expected is None else decay * expected + (1 - decay) * weight
    torch.testing.assert_close(trainer.ema.module.net.weight, expected)
    assert not torch.equal(trainer.ema.module.net.weight, trainer.model.net.weight)


def test_validation_best_pt_and_restore_use_the_averaged_weights(tmp_path):
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), ema_decay=0.9, max_iters=4)
    metrics = trainer.fit(Endless(batches()), val_batches())
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["ema_updates"] == 4
    for key, value in trainer.ema.module.state_dict().items():
        assert torch.equal(best["ema"][key], value)

    # The logged metrics are those of the averaged weights, not the trained ones.
    def miou(model):
        predictor = Predictor(model, torch.device("cpu"), [0.5] * 3, [0.25] * 3, "fp32", True)
        return evaluate(predictor, val_batches(), 3, 255).metrics["mIoU"]

    assert metrics["mIoU"] == pytest.approx(miou(trainer.ema.module.eval()))
    assert metrics["mIoU"] != pytest.approx(miou(trainer.model.eval()))


def test_ema_resumes_exactly(tmp_path):
    stream = list(itertools.islice(batches(), 6))
    torch.manual_seed(0)
    straight = make_trainer(tmp_path / "a", nn.CrossEntropyLoss(), ema_decay=0.8)
    steps(straight, 6, iter(stream))

    torch.manual_seed(0)  # the same initial weights
    first = make_trainer(tmp_path / "b", nn.CrossEntropyLoss(), ema_decay=0.8)
    steps(first, 3, iter(stream[:3]))
    state = first.state_dict()
    resumed = make_trainer(tmp_path / "b", nn.CrossEntropyLoss(), ema_decay=0.8)
    resumed.load_state_dict(state)
    steps(resumed, 3, iter(stream[3:]))
    assert int(resumed.ema.n_averaged) == 6
    for key, value in straight.ema.module.state_dict().items():
        assert torch.equal(resumed.ema.module.state_dict()[key], value), key


def batchnorm_net():
    """A float32 convolution with BatchNorm, and a float64 layer: two dtype groups."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2).double())


def train_a_little(model, generator):
    """New weights and BatchNorm statistics, as a training step gives."""
    model[:2].train()(torch.randn(2, 3, 6, 6, generator=generator))  # BatchNorm's statistics
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def torchs_average(model, decay):
    """What the Trainer used before its own average: torch's EMA with the buffers."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def test_the_average_equals_torchs_averaged_model_bit_for_bit():
    torch.manual_seed(0)
    model, generator = batchnorm_net(), torch.Generator().manual_seed(1)
    ours, theirs = averaged_model(model, 0.9), torchs_average(model, 0.9)
    for _ in range(5):
        train_a_little(model, generator)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    assert ours.n_averaged == int(theirs.n_averaged) == 5
    assert type(ours.n_averaged) is int  # no tensor: nothing to copy to the device per step
    for (key, value), expected in zip(ours.module.state_dict().items(),
                                      theirs.module.state_dict().values(), strict=True):  # fmt: skip
        if value.is_floating_point():  # float32 and float64 groups alike
            assert torch.equal(value, expected), key
        else:  # num_batches_tracked: the model's count, not an average truncated to an integer
            assert key.endswith("num_batches_tracked")
            assert value == model.state_dict()[key] == 5 != expected


def test_a_checkpoint_with_torchs_average_resumes_it(tmp_path):
    # A checkpoint of the Trainer before its own average: "ema" the AveragedModel's module,
    # "ema_updates" its count. It loads, and the average goes on as torch's would have.
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, nn.CrossEntropyLoss(), ema_decay=0.8)
    old = torchs_average(trainer.model, 0.8)
    stream = batches()
    for _ in range(3):
        trainer.train_step(stream)
        old.update_parameters(trainer.model)
    state = trainer.state_dict() | {"ema": unwrapped_state_dict(old.module),
                                    "ema_updates": int(old.n_averaged)}  # fmt: skip
    resumed = make_trainer(tmp_path, nn.CrossEntropyLoss(), ema_decay=0.8)
    resumed.load_state_dict(state)
    assert resumed.ema.n_averaged == 3
    resumed.train_step(stream)
    old.update_parameters(resumed.model)
    for key, value in old.module.state_dict().items():
        assert torch.equal(resumed.ema.module.state_dict()[key], value), key


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1])
def test_an_ema_decay_outside_0_1_is_refused_naming_the_key(decay):
    with pytest.raises(ValueError, match=r"trainer\.ema_decay"):
        averaged_model(nn.Linear(1, 1), decay)


def frozen_trainer(path, **kwargs):
    """A trainer whose weights never change (lr 0): val mIoU can never improve."""
    trainer = make_trainer(
        path, nn.CrossEntropyLoss(), **({"val_every": 1, "max_iters": 10} | kwargs)
    )
    for group in trainer.optimizer.param_groups:
        group["lr"] = group["initial_lr"] = 0.0
    trainer.scheduler.base_lrs = [0.0]
    return trainer


def test_early_stop_after_patience_validations_without_improvement(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    trainer = frozen_trainer(tmp_path, early_stop_patience=2)
    trainer.fit(Endless(batches()), val_batches())
    # Iteration 1 sets the best; 2 and 3 do not beat it: patience spent at 3.
    assert trainer.iteration == 3
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["iteration"] == 3 and last["validations_without_improvement"] == 2
    assert "Early stop at iteration 3 of 10" in caplog.text


def test_a_resumed_run_remembers_the_early_stop_count(tmp_path):
    trainer = frozen_trainer(tmp_path, early_stop_patience=3, max_iters=2)
    trainer.fit(Endless(batches()), val_batches())
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["validations_without_improvement"] == 1

    resumed = frozen_trainer(tmp_path, early_stop_patience=3)
    resumed.load_state_dict(state)
    resumed.fit(Endless(batches()), val_batches())
    assert resumed.iteration == 4  # 2 more validations without improvement, not 3

    # An early-stopped run has nothing left to train, unless patience is raised.
    again = frozen_trainer(tmp_path, early_stop_patience=3)
    again.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "last.pt"))
    again.fit(Endless(batches()), val_batches())
    assert again.iteration == 4
    longer = frozen_trainer(tmp_path, early_stop_patience=None)
    longer.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "last.pt"))
    longer.fit(Endless(batches()), val_batches())
    assert longer.iteration == 10


def test_evaluate_reports_the_val_miou_of_the_averaged_weights(tmp_path):
    run_dir = tmp_path / "run"
    run_training(run_dir, "model.encoder_name=resnet18", "trainer.ema_decay=0.99")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    logged = max(json.loads(line)["mIoU"] for line in lines)
    best = run_dir / "checkpoints" / "best.pt"
    # Training validated on 4 images (debug=tiny): the same 4 here.
    common = ("bootstrap=0", "num_worst=0", "max_samples=4")
    assert run_evaluation(f"checkpoint={best}", *common)["mIoU"] == pytest.approx(logged)
    # The trained weights alone give another result: evaluate did use the average.
    state = load_checkpoint(best)
    del state["ema"]
    plain = tmp_path / "plain" / "checkpoints" / "best.pt"
    plain.parent.mkdir(parents=True)
    torch.save(state, plain)
    assert run_evaluation(f"checkpoint={plain}", *common)["mIoU"] != pytest.approx(logged)


@pytest.mark.parametrize(("decay", "warned"), [(0.9999999999, True), (0.99, True), (0.9, False)])
def test_an_average_that_cannot_warm_up_within_the_run_is_warned(caplog, decay, warned):
    from seg.train import warn_slow_average

    with caplog.at_level(logging.WARNING, logger="seg.train"):
        warn_slow_average(decay, max_iters=20)
    assert ("averages over about" in caplog.text) == warned
    warn_slow_average(None, max_iters=20)  # no average: nothing to warn about
