"""benchmark_instance.py compares like with like: its copy of torchvision's reference loop and
seg's Trainer step, from the same weights on the same batch, make the same update."""

import copy
import itertools

import torch
from hydra.utils import instantiate

from tests.conftest import load_script

benchmark_instance = load_script("benchmark_instance")


def test_the_reference_loop_and_the_trainer_make_the_same_fp32_update():
    cfg = benchmark_instance.compose_train(
        "task=instance", "model=tiny/instance", "optimizer=sgd", "trainer.device=cpu",
        "trainer.precision=fp32", "trainer.channels_last=false", "data.dataset.image_size=64",
        "data.train_transform.crop_size=[64,64]",
    )  # fmt: skip
    task, batch = benchmark_instance.fixed_batch(cfg, 2)
    torch.manual_seed(0)
    template = instantiate(cfg.model)
    trainer = benchmark_instance.make_trainer(
        cfg, copy.deepcopy(template), class_names=cfg.data.class_names
    )
    # Mask R-CNN samples anchors and proposals at random: both steps start from one RNG state
    torch.manual_seed(1)
    trainer.train_step(itertools.repeat(batch))
    model = copy.deepcopy(template).train()
    optimizer = benchmark_instance.build_optimizer(cfg.optimizer, model)
    images, targets = task.prepare(batch, torch.device("cpu"), torch.contiguous_format)
    torch.manual_seed(1)
    loss = benchmark_instance.reference_step(
        model, optimizer, images, targets, torch.device("cpu"), None, None
    )
    assert loss > 0
    moved = 0
    for (name, ours), theirs in zip(
        trainer.model.state_dict().items(), model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)
        moved += not torch.equal(ours, template.state_dict()[name])
    assert moved > 10  # the step changed the weights, alike
