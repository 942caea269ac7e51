"""Every model config honours the contract: logits (N, C, H, W) at any input size, trainable."""

import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision
from hydra.utils import instantiate

from seg.models import rgb_input_filters, smp_model, torchvision_model
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


def test_rgb_filters_go_on_the_rgb_bands_and_the_mean_filter_on_the_others():
    rgb = torch.randn(8, 3, 3, 3)  # stands for pretrained filters
    adapted = rgb_input_filters(rgb, 5, [4, 3, 2])  # e.g. Sentinel-2 B04, B03, B02
    assert adapted.shape == (8, 5, 3, 3)
    scale = 3 / 5
    assert torch.allclose(adapted[:, 3], rgb[:, 0] * scale)  # red
    assert torch.allclose(adapted[:, 2], rgb[:, 1] * scale)  # green
    assert torch.allclose(adapted[:, 1], rgb[:, 2] * scale)  # blue
    for band in (0, 4):
        assert torch.allclose(adapted[:, band], rgb.mean(dim=1) * scale)
    # an image equal on every band gets the RGB layer's response to the same grey image
    grey = torch.rand(1, 1, 16, 16)
    expected = torch.nn.functional.conv2d(grey.expand(1, 3, 16, 16), rgb)
    got = torch.nn.functional.conv2d(grey.expand(1, 5, 16, 16), adapted)
    assert torch.allclose(got, expected, atol=1e-5)
    # no RGB band (one band of a CT scan): the mean filter everywhere, i.e. smp's sum for 1
    assert torch.allclose(rgb_input_filters(rgb, 1, None), rgb.sum(dim=1, keepdim=True))


def test_many_bands_without_rgb_bands_are_warned(caplog):
    rgb_input_filters(torch.randn(4, 3, 3, 3), 13, None)
    assert "data.rgb_bands is not set" in caplog.text


@pytest.mark.parametrize("bands", [[1, 2], [1, 1, 2], [0, 1, 2], [2, 3, 6]])
def test_bad_rgb_bands_are_refused_naming_the_key(bands):
    with pytest.raises(ValueError, match=r"data.rgb_bands=\[.*1\.\.5"):
        rgb_input_filters(torch.randn(4, 3, 3, 3), 5, bands)


def fake_imagenet(monkeypatch, seed: int = 0):
    """smp.create_model with ``encoder_weights="imagenet"`` loading random weights (fixed by
    ``seed``) instead of downloading; returns those weights by encoder name."""
    create = smp.create_model
    made = {}

    def create_offline(arch, encoder_name, encoder_weights, in_channels, **kwargs):
        net = create(arch, encoder_name=encoder_name, encoder_weights=None,
                     in_channels=in_channels, **kwargs)  # fmt: skip
        if encoder_weights == "imagenet":
            assert in_channels == 3, "ImageNet weights are RGB"
            generator = torch.Generator().manual_seed(seed)
            state = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                     for k, v in net.encoder.state_dict().items()}  # fmt: skip
            net.encoder.load_state_dict(state)
            made[encoder_name] = state
        return net

    monkeypatch.setattr("segmentation_models_pytorch.create_model", create_offline)
    return made


@pytest.mark.parametrize(
    ("arch", "encoder", "first_conv"),
    [
        ("Unet", "resnet18", "conv1.weight"),
        ("Unet", "tu-resnet18", "model.conv1.weight"),  # timm's, which cycles R,G,B too
        ("Segformer", "mit_b0", "patch_embed1.proj.weight"),
    ],
)
def test_pretrained_encoders_take_other_band_counts_with_rgb_filters_on_the_rgb_bands(
    monkeypatch, arch, encoder, first_conv
):
    imagenet = fake_imagenet(monkeypatch)
    model = smp_model(arch, 2, encoder_name=encoder, pretrained=True, in_channels=4,
                      rgb_bands=[3, 2, 1])  # fmt: skip
    rgb = imagenet[encoder]
    own = model.net.encoder.state_dict()
    assert torch.equal(own[first_conv], rgb_input_filters(rgb[first_conv], 4, [3, 2, 1]))
    assert all(torch.equal(own[key], value) for key, value in rgb.items() if key != first_conv)
    assert model(torch.randn(1, 4, 64, 64)).shape == (1, 2, 64, 64)
    # three bands: the weights as they are
    rgb_model = smp_model(arch, 2, encoder_name=encoder, pretrained=True)
    assert torch.equal(rgb_model.net.encoder.state_dict()[first_conv], rgb[first_conv])


def test_encoder_weights_from_an_rgb_file_are_adapted_to_the_bands(tmp_path):
    source = smp_model("Unet", 3, encoder_name="resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(source.net.encoder.state_dict(), path)
    model = smp_model("Unet", 3, encoder_name="resnet18", encoder_weights_path=str(path),
                      in_channels=13, rgb_bands=[4, 3, 2])  # fmt: skip
    expected = rgb_input_filters(source.net.encoder.conv1.weight, 13, [4, 3, 2])
    assert torch.equal(model.net.encoder.conv1.weight, expected)
    assert torch.equal(model.net.encoder.layer1[0].conv1.weight,
                       source.net.encoder.layer1[0].conv1.weight)  # fmt: skip


def test_torchvision_models_take_other_band_counts(monkeypatch):
    model = torchvision_model("lraspp", 2, encoder_name="mobilenet_v3_large", in_channels=5)
    logits, _ = model(torch.randn(2, 5, 48, 48), with_aux=True)
    assert logits.shape == (2, 2, 48, 48)
    # pretrained: the backbone's RGB filters adapted (the builder stands in for the download)
    builder = torchvision.models.get_model_builder("lraspp_mobilenet_v3_large")
    rgb = {}

    def offline(weights, weights_backbone, **kwargs):
        net = builder(weights=None, weights_backbone=None, **kwargs)
        rgb["filters"] = net.backbone["0"][0].weight.detach().clone()
        return net

    monkeypatch.setattr("torchvision.models.get_model_builder", lambda name: offline)
    model = torchvision_model("lraspp", 2, encoder_name="mobilenet_v3_large", pretrained=True,
                              in_channels=5, rgb_bands=[1, 2, 3])  # fmt: skip
    assert torch.equal(model.net.backbone["0"][0].weight,
                       rgb_input_filters(rgb["filters"], 5, [1, 2, 3]))  # fmt: skip


@pytest.mark.parametrize("option", ["lraspp", "unet"])
def test_model_configs_take_the_data_bands(option):
    cfg = compose_config(f"model={option}", "data=folder", "data.root=x", "data.in_channels=4",
                         "data.rgb_bands=[3,2,1]", "model.encoder_name=" +
                         ("mobilenet_v3_large" if option == "lraspp" else "resnet18"))  # fmt: skip
    model = instantiate(cfg.model)
    assert model(torch.randn(1, 4, 64, 64)).shape == (1, 2, 64, 64)
