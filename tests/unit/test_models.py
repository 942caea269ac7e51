"""Every model config honours the contract: logits (N, C, H, W) at any input size, trainable."""

import pytest
import torch
from hydra.utils import instantiate

from seg.models import smp_model, torchvision_model
from tests.conftest import compose_config, semantic_models


@pytest.mark.parametrize("option", semantic_models())
def test_model_output_shape_and_backward(option):
    cfg = compose_config(f"model={option}")
    model = instantiate(cfg.model)
    images = torch.randn(2, 3, 64, 64)
    logits, aux_logits = model(images, with_aux=True)
    assert logits.shape == (2, cfg.data.num_classes, 64, 64)
    loss = logits.square().mean() + (0 if aux_logits is None else aux_logits.square().mean())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "build",
    [
        lambda: smp_model("Unet", 3, encoder_name="resnet18"),
        lambda: smp_model("DeepLabV3Plus", 3, encoder_name="resnet18"),
        lambda: torchvision_model("lraspp", 3, encoder_name="mobilenet_v3_large"),
    ],
)
def test_sizes_the_architecture_cannot_take_are_padded_and_cropped_back(build):
    model = build().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 70, 45)).shape == (1, 3, 70, 45)


def test_padding_is_zeros_at_the_bottom_right_and_cropped_away():
    model = smp_model("Unet", 3, encoder_name="resnet18").eval()
    images = torch.randn(1, 3, 50, 40)
    with torch.no_grad():
        expected = model.net(torch.nn.functional.pad(images, (0, 24, 0, 14)))[..., :50, :40]
        assert torch.equal(model(images), expected)


def test_torchvision_aux_head_feeds_the_loss_only_when_weighted():
    with_aux = torchvision_model("fcn", 4, aux_weight=0.4)
    assert with_aux.aux_weight == 0.4
    logits, aux = with_aux(torch.randn(2, 3, 48, 48), with_aux=True)
    assert aux is not None and aux.shape == logits.shape == (2, 4, 48, 48)
    without = torchvision_model("fcn", 4, aux_weight=0.0)
    assert without(torch.randn(2, 3, 48, 48), with_aux=True)[1] is None


def test_bad_names_list_the_options():
    with pytest.raises(ValueError, match=r"resnet34"):
        smp_model("Unet", 3, encoder_name="resnet33")
    with pytest.raises(ValueError, match=r"deeplabv3plus"):
        smp_model("DeepLabV4", 3)
    with pytest.raises(ValueError, match=r"fcn_resnet50"):
        torchvision_model("fcn", 3, encoder_name="resnet18")


def test_encoder_weights_from_a_local_file(tmp_path):
    source = smp_model("Unet", 3, encoder_name="resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(source.net.encoder.state_dict(), path)
    model = smp_model("Unet", 3, encoder_name="resnet18", encoder_weights_path=str(path))
    for key, value in source.net.encoder.state_dict().items():
        assert torch.equal(model.net.encoder.state_dict()[key], value)
    with pytest.raises(FileNotFoundError, match=r"encoder_weights_path"):
        smp_model("Unet", 3, encoder_name="resnet18", encoder_weights_path=str(tmp_path / "x"))


def test_failed_download_says_how_to_get_the_weights(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr("segmentation_models_pytorch.create_model", offline)
    with pytest.raises(RuntimeError, match=r"pretrained=false.*encoder_weights_path"):
        smp_model("Unet", 3, pretrained=True)


@pytest.mark.parametrize(
    ("arch", "options"), [("FPN", {}), ("Unet", {"decoder_channels": [32, 16, 8]})]
)
def test_encoder_stages_a_shallow_depth_leaves_unused_get_no_gradient_but_keep_their_keys(
    arch, options
):
    # Depth 3 runs the stem, layer1 and layer2; DDP fails at its second iteration on the
    # parameters of layer3 and layer4, which never get a gradient.
    model = smp_model(arch, 3, encoder_name="resnet18", encoder_depth=3, options=options)
    unused_stages = ("net.encoder.layer3.", "net.encoder.layer4.")
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        name for name, _ in model.named_parameters() if name.startswith(unused_stages)
    }
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert {name for name, p in model.named_parameters() if p.grad is None} == frozen
    # the modules stay: checkpoints of such models keep these keys and still load
    assert any(key.startswith(unused_stages) for key in model.state_dict())
    assert all(p.requires_grad for p in smp_model(arch, 3, encoder_name="resnet18").parameters())


def test_torchvision_aux_head_runs_only_when_its_output_is_wanted():
    model = torchvision_model("fcn", 3, aux_weight=0.4)
    calls = []
    model.net.aux_classifier.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))  # validation and inference
    assert calls == []
    model(torch.randn(2, 3, 32, 32), with_aux=True)
    assert calls == [1]
