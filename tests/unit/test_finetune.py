"""Fine-tuning: init_from loads the weights that fit and says which; parameter groups give the
encoder its own LR and spare normalization layers and biases the weight decay."""

import json
import logging
import re

import pytest
import torch
from hydra.utils import instantiate
from torchvision.ops.misc import FrozenBatchNorm2d

from seg.config import check_values
from seg.models import (
    COCO_CLASSES,
    encoder_prefix,
    freeze_batchnorm,
    init_from,
    maskrcnn,
    rgb_input_filters,
    smp_model,
    torchvision_model,
)
from seg.optim import build_optimizer, param_groups
from seg.schedulers import poly
from tests.conftest import REPO, compose_config, group_options


def tiny_unet(num_classes: int = 3, encoder_name: str = "resnet18"):
    torch.manual_seed(num_classes)  # another seed per class count: fresh heads differ
    return smp_model("Unet", num_classes, encoder_name=encoder_name)


@pytest.fixture
def source(tmp_path):
    """A 6-class model and its weights as a seg checkpoint (a plain dict with "model")."""
    model = tiny_unet(6)
    path = tmp_path / "source.pt"
    torch.save({"model": model.state_dict(), "iteration": 4}, path)
    return model, path


def test_init_from_a_checkpoint_with_other_classes_keeps_a_fresh_head(source, caplog):
    model, path = source
    target = tiny_unet(3)
    fresh_head = {k: v.clone() for k, v in target.state_dict().items() if "segmentation_head" in k}
    with caplog.at_level(logging.INFO, logger="seg.models"):
        init_from(target, str(path))
    for key, value in target.state_dict().items():
        if key in fresh_head:
            assert torch.equal(value, fresh_head[key]), key
        else:
            assert torch.equal(value, model.state_dict()[key]), key
    message = caplog.records[-1].getMessage()
    assert caplog.records[-1].levelno == logging.INFO
    loaded = len(model.state_dict()) - 2
    assert f"loaded {loaded} tensors: net.encoder.* (" in message
    assert "re-initialised 2 of another shape: net.segmentation_head.* (2)" in message
    assert "re-initialised 0 absent from the file: none" in message
    assert "ignored 0 the model lacks: none" in message


def test_init_from_the_same_classes_loads_everything(source):
    model, path = source
    target = tiny_unet(6)
    torch.manual_seed(1)
    target.net.segmentation_head[0].reset_parameters()  # unlike the source's
    init_from(target, str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_init_from_an_smp_save_pretrained_directory(tmp_path):
    model = tiny_unet(6)
    model.net.save_pretrained(tmp_path / "smp")  # config.json + model.safetensors
    target = tiny_unet(3)
    init_from(target, str(tmp_path / "smp"))
    assert torch.equal(target.net.encoder.conv1.weight, model.net.encoder.conv1.weight)
    assert torch.equal(target.net.decoder.blocks[0].conv1[0].weight,
                       model.net.decoder.blocks[0].conv1[0].weight)  # fmt: skip


def test_init_from_lists_what_a_partial_fit_leaves_out(source, caplog):
    _, path = source
    target = smp_model("FPN", 3, encoder_name="resnet18")
    with caplog.at_level(logging.INFO, logger="seg.models"):
        init_from(target, str(path))
    record = caplog.records[-1]
    assert record.levelno == logging.WARNING  # FPN's decoder starts from scratch
    assert "ignored 60 the model lacks: net.decoder.blocks.* (60)" in record.getMessage()
    assert "absent from the file: net.decoder.p" in record.getMessage()


def test_init_from_refuses_another_encoder(source):
    _, path = source
    with pytest.raises(ValueError, match=rf"init_from={path} does not fit .*\(net\.encoder\.\*\)"):
        init_from(tiny_unet(3, encoder_name="mobilenet_v2"), str(path))


def test_a_damaged_smp_directory_is_refused_in_one_line(tmp_path):
    directory = tmp_path / "smp"
    tiny_unet(6).net.save_pretrained(directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"init_from=.*smp: .*truncated.*SafetensorError"):
        init_from(tiny_unet(), str(directory))
    tiny_unet(6).net.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"_model_class": "Nope"}))
    with pytest.raises(ValueError, match=r"init_from=.*AttributeError.*Nope"):
        init_from(tiny_unet(), str(directory))


def test_a_deeper_encoder_of_the_same_family_is_warned_as_another_encoder(tmp_path, caplog):
    tiny_unet(3, "resnet34").net.save_pretrained(tmp_path / "r34")
    with caplog.at_level(logging.WARNING):
        init_from(tiny_unet(3, "resnet18"), str(tmp_path / "r34"))
    assert "another encoder than model.encoder_name" in caplog.text


def test_the_fine_tune_example_shows_what_init_from_logs(tmp_path, caplog):
    """docs/training.md's example: the default model's run (6 classes) into 2 classes."""
    text = (REPO / "docs" / "training.md").read_text()
    documented = re.search(r"```\n(init_from=(\S+):\n(?:  .*\n)+)```", text)
    source = smp_model("Unet", 6, encoder_name="resnet34")  # the default model= and data=
    path = tmp_path / "best.pt"
    torch.save({"model": source.state_dict()}, path)
    with caplog.at_level(logging.INFO, logger="seg.models"):
        init_from(smp_model("Unet", 2, encoder_name="resnet34"), str(path))
    logged = caplog.records[-1].getMessage().replace(str(path), documented[2])
    assert logged + "\n" == documented[1]


def test_init_from_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"init_from=.*nope\.pt: no such file"):
        init_from(tiny_unet(), str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match=r"directory without config\.json"):
        init_from(tiny_unet(), str(tmp_path))
    # a state dict is read as the model's weights (torchvision's COCO files are such)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "state_dict.pt")
    with pytest.raises(ValueError, match="none of the encoder's weights"):
        init_from(tiny_unet(), str(tmp_path / "state_dict.pt"))
    torch.save({"epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a seg checkpoint nor a state dict of tensors"):
        init_from(tiny_unet(), str(tmp_path / "other.pt"))


SMALL_MASK_RCNN = dict(backbone="mobilenet_v3_small", anchor_sizes=(16, 32, 64), fpn_channels=16,
                       box_head_size=32, mask_head_channels=16)  # fmt: skip


def coco_like_weights(path):
    """A state dict shaped like torchvision's COCO weights: 91 classes, frozen BatchNorm."""
    torch.manual_seed(1)
    model = maskrcnn(COCO_CLASSES, **SMALL_MASK_RCNN)
    freeze_batchnorm(model.backbone.body)
    torch.save(model.state_dict(), path)
    return model.state_dict()


def test_mask_rcnn_starts_from_coco_like_weights_with_new_class_heads(tmp_path, caplog):
    coco = coco_like_weights(tmp_path / "coco.pth")
    model = maskrcnn(6, weights_path=str(tmp_path / "coco.pth"), **SMALL_MASK_RCNN)
    state = model.state_dict()
    body = [key for key in coco if key.startswith("backbone.body.")]
    assert body and all(torch.equal(state[key], coco[key]) for key in body)
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 6  # re-initialised
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 6
    # what torchvision's builder does with weights: frozen BatchNorm, only some layers train
    frozen = [m for m in model.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and all(m.eps == 0.0 for m in frozen)
    assert not all(p.requires_grad for p in model.backbone.body.parameters())
    # init_from= the same file into a model built from scratch: the fitting tensors load
    scratch = maskrcnn(6, **SMALL_MASK_RCNN)
    init_from(scratch, str(tmp_path / "coco.pth"))
    assert torch.equal(scratch.state_dict()["backbone.fpn.layer_blocks.0.0.weight"],
                       coco["backbone.fpn.layer_blocks.0.0.weight"])  # fmt: skip
    # the class heads (another class count) start fresh
    assert re.search(
        r"re-initialised \d+ of another shape: .*roi_heads\.box_predictor", caplog.text
    )


def test_mask_rcnn_takes_any_band_count_and_adapts_coco_rgb_filters(tmp_path):
    coco = coco_like_weights(tmp_path / "coco.pth")
    first = "backbone.body.0.0.weight"  # MobileNetV3's stem convolution
    model = maskrcnn(6, weights_path=str(tmp_path / "coco.pth"), in_channels=4,
                     rgb_bands=[3, 2, 1], **SMALL_MASK_RCNN)  # fmt: skip
    weight, rgb = model.state_dict()[first], coco[first]
    assert weight.shape[1] == 4
    # red on band 3, green on 2, blue on 1, their mean on band 4, all scaled by 3/4
    for band, colour in ((3, 0), (2, 1), (1, 2)):
        assert torch.allclose(weight[:, band - 1], rgb[:, colour] * 3 / 4)
    assert torch.allclose(weight[:, 3], rgb.mean(1) * 3 / 4)
    # the builder's frozen stem stays frozen with its adapted filters
    assert not model.get_parameter(first).requires_grad
    scratch = maskrcnn(2, in_channels=1, **SMALL_MASK_RCNN).eval()
    assert scratch.get_parameter(first).requires_grad
    with torch.no_grad():  # one grey band in, detections out
        (detections,) = scratch([torch.rand(1, 64, 64)])
    assert detections["masks"].shape[1:] == (1, 64, 64)


def test_weights_of_another_backbone_are_refused_naming_it(tmp_path):
    coco_like_weights(tmp_path / "coco.pth")
    with pytest.raises(ValueError, match=r"does not fit a Mask R-CNN with backbone resnet18"):
        maskrcnn(6, backbone="resnet18", weights_path=str(tmp_path / "coco.pth"),
                 anchor_sizes=(16, 32, 64, 128, 256))  # fmt: skip


@pytest.mark.parametrize("option", group_options("model"))
def test_every_model_has_an_encoder_and_a_rest(option):
    model = instantiate(compose_config(f"model={option}").model)
    groups = param_groups(model, lr=1.0, encoder_lr_mult=0.5)
    assert [group["name"] for group in groups] == ["base", "encoder"]
    encoder = model.get_submodule(encoder_prefix(model))
    assert groups[1]["params"] == list(encoder.parameters())


def test_default_groups_are_one_in_parameter_order():
    model = tiny_unet()
    groups = param_groups(model, lr=0.1)
    assert len(groups) == 1 and groups[0]["params"] == list(model.parameters())
    assert "lr" not in groups[0]  # the optimizer's own


def test_encoder_lr_is_the_base_lr_times_the_multiplier_under_the_schedule():
    model = torchvision_model("lraspp", 3, encoder_name="mobilenet_v3_large")
    cfg = compose_config("optimizer=sgd", "optimizer.encoder_lr_mult=0.1")
    optimizer = build_optimizer(cfg.optimizer, model)
    base, encoder = optimizer.param_groups
    assert (base["name"], base["lr"]) == ("base", cfg.optimizer.lr)
    assert encoder["name"] == "encoder"
    assert encoder["lr"] == pytest.approx(0.1 * cfg.optimizer.lr)
    assert encoder["params"] == list(model.net.backbone.parameters())
    scheduler = poly(optimizer, max_iters=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert encoder["lr"] == pytest.approx(0.1 * base["lr"])  # the schedule scales every group
    assert scheduler.get_last_lr()[0] == base["lr"]  # the LR that is logged


def test_a_zero_multiplier_computes_no_encoder_gradients():
    model = tiny_unet()
    cfg = compose_config("optimizer.encoder_lr_mult=0")
    optimizer = build_optimizer(cfg.optimizer, model)
    assert [group["name"] for group in optimizer.param_groups] == ["base", "encoder"]
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    encoder = model.get_submodule(encoder_prefix(model))
    assert all(param.grad is None for param in encoder.parameters())
    decoder = [p for name, p in model.named_parameters() if not name.startswith("net.encoder.")]
    assert all(param.grad is not None for param in decoder)


def test_no_norm_bias_decay_spares_norm_layers_and_biases():
    model = tiny_unet()
    groups = param_groups(model, lr=0.1, encoder_lr_mult=0.5, norm_bias_decay=False)
    by_name = {group["name"]: group for group in groups}
    assert list(by_name) == ["base", "base_no_decay", "encoder", "encoder_no_decay"]
    spared = {id(p) for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]}
    for name, param in model.named_parameters():
        module = model.get_submodule(name.rpartition(".")[0])
        expected = isinstance(module, torch.nn.BatchNorm2d) or name.endswith(".bias")
        assert (id(param) in spared) == expected, name
    assert by_name["encoder_no_decay"]["lr"] == 0.05 and "weight_decay" not in by_name["base"]


@pytest.mark.parametrize("option", group_options("optimizer"))
def test_a_zero_decay_group_does_not_decay(option):
    model = tiny_unet()
    cfg = compose_config(f"optimizer={option}", "optimizer.norm_bias_decay=false")
    optimizer = build_optimizer(cfg.optimizer, model)
    before = [[p.detach().clone() for p in group["params"]] for group in optimizer.param_groups]
    for param in model.parameters():
        param.grad = torch.zeros_like(param)  # only the weight decay can move a weight
    optimizer.step()
    for group, old in zip(optimizer.param_groups, before, strict=True):
        moved = any(not torch.equal(p, o) for p, o in zip(group["params"], old, strict=True))
        assert moved == (group["weight_decay"] > 0), group["name"]


def test_encoder_lr_mult_zero_freezes_the_encoder_weights():
    model = tiny_unet()
    cfg = compose_config("optimizer.encoder_lr_mult=0")
    optimizer = build_optimizer(cfg.optimizer, model)
    encoder = [p.detach().clone() for p in model.net.encoder.parameters()]
    head = model.net.segmentation_head[0].weight.detach().clone()
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    assert all(
        torch.equal(p, o) for p, o in zip(model.net.encoder.parameters(), encoder, strict=True)
    )
    assert not torch.equal(model.net.segmentation_head[0].weight, head)


def test_group_options_are_checked():
    with pytest.raises(ValueError, match=r"optimizer.encoder_lr_mult=-0.5 is not allowed"):
        check_values(compose_config("optimizer.encoder_lr_mult=-0.5"))
    with pytest.raises(ValueError, match=r"optimizer.norm_bias_decay='no' is not allowed"):
        check_values(compose_config("optimizer.norm_bias_decay=no"))


@pytest.mark.parametrize(
    "override",
    ["optimizer.encoder_lr_mult=inf", "optimizer.encoder_lr_mult=1e30", "optimizer.lr=inf",
     "optimizer.lr=nan", "optimizer.weight_decay=1e30"],
)  # fmt: skip
def test_non_finite_and_absurd_rates_are_refused(override):
    # An infinite encoder LR made the weights NaN at the first update while the loss was finite.
    with pytest.raises(ValueError, match=rf"{override.split('=')[0]}=.* is not allowed: .* and <"):
        check_values(compose_config(override))


def test_init_from_an_rgb_checkpoint_adapts_its_input_convolution_to_the_bands(source, caplog):
    model, path = source
    target = smp_model("Unet", 6, encoder_name="resnet18", in_channels=4)
    with caplog.at_level(logging.INFO, logger="seg.models"):
        init_from(target, str(path), rgb_bands=[1, 2, 3])
    expected = rgb_input_filters(model.net.encoder.conv1.weight, 4, [1, 2, 3])
    assert torch.equal(target.net.encoder.conv1.weight, expected)
    for key, value in model.state_dict().items():
        if key != "net.encoder.conv1.weight":
            assert torch.equal(target.state_dict()[key], value), key
    assert caplog.records[-1].levelno == logging.INFO
    assert "net.encoder.conv1.weight RGB, adapted" in caplog.records[-1].getMessage()


def test_init_from_a_file_of_other_bands_warns_that_its_input_convolution_starts_fresh(
    tmp_path, caplog
):
    path = tmp_path / "four_bands.pt"
    torch.save({"model": smp_model("Unet", 2, "resnet18", in_channels=4).state_dict()}, path)
    target = smp_model("Unet", 2, encoder_name="resnet18", in_channels=5)
    fresh = target.net.encoder.conv1.weight.clone()
    with caplog.at_level(logging.INFO, logger="seg.models"):
        init_from(target, str(path))
    assert torch.equal(target.net.encoder.conv1.weight, fresh)
    assert caplog.records[-1].levelno == logging.WARNING
    assert "other input bands than the model" in caplog.records[-1].getMessage()
