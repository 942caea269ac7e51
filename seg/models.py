"""Thin adapters over segmentation-models-pytorch and torchvision with one contract:
``model(images (N, 3, H, W)) -> logits (N, C, H, W)`` at the input resolution, any H and W."""

import difflib
import inspect
from contextlib import contextmanager
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

TORCHVISION_ARCHS = ("fcn", "deeplabv3", "lraspp")
NO_DOWNLOAD_HELP = (
    "set model.pretrained=false to train from scratch, or run once on a machine with internet "
    "and copy its weight cache (~/.cache/torch/hub, ~/.cache/huggingface) here (HF_HUB_OFFLINE=1 "
    "then skips the network), or set model.encoder_weights_path=<a .pth state dict of the encoder>"
)


class Segmenter(nn.Module):
    """Pads the input to a multiple of ``stride``, runs ``net`` and crops the logits back.

    ``net`` returns a tensor (smp) or a dict with "out" and optionally "aux" (torchvision).
    """

    def __init__(self, net: nn.Module, stride: int, aux_weight: float = 0.0):
        super().__init__()
        self.net = net
        self.stride = stride
        self.aux_weight = aux_weight  # weight of the auxiliary head's loss; 0 when there is none

    def forward(
        self, images: torch.Tensor, with_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (N, C, H, W); with ``with_aux`` a pair (logits, auxiliary logits or None)."""
        height, width = images.shape[-2:]
        # Zero padding (the mean after normalization) at the bottom/right; no branch on the
        # amount, so that an exported graph with dynamic sizes pads every input correctly.
        images = F.pad(images, (0, -width % self.stride, 0, -height % self.stride))
        out = self.net(images)
        logits, aux = (out["out"], out.get("aux")) if isinstance(out, dict) else (out, None)
        logits = self._to_input_size(logits, images, height, width)
        if not with_aux:
            return logits
        return logits, None if aux is None else self._to_input_size(aux, images, height, width)

    @staticmethod
    def _to_input_size(logits: torch.Tensor, images: torch.Tensor, height: int, width: int):
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, images.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]


def smp_model(
    arch: str,
    num_classes: int,
    encoder_name: str = "resnet34",
    encoder_depth: int = 5,
    pretrained: bool = False,
    encoder_weights_path: str | None = None,
    in_channels: int = 3,
    options: dict | None = None,
) -> Segmenter:
    """Any segmentation-models-pytorch architecture (Unet, FPN, DeepLabV3Plus, Segformer, ...).

    ``pretrained`` loads ImageNet encoder weights; ``options`` are extra keyword arguments of the
    smp class (e.g. ``decoder_channels``), checked by smp itself.
    """
    options = dict(options or {})
    archs = {name.lower(): name for name in smp.MODEL_ARCHITECTURES_MAPPING}
    if arch.lower() not in archs:
        raise ValueError(
            f"model.arch={arch!r} is not an smp architecture; options: {sorted(archs)}"
        )
    if not _is_smp_encoder(encoder_name):
        close = difflib.get_close_matches(encoder_name, smp.encoders.get_encoder_names(), n=8)
        raise ValueError(
            f"model.encoder_name={encoder_name!r} is not an smp encoder; close matches: {close} "
            "(all: segmentation_models_pytorch.encoders.get_encoder_names(), or 'tu-<timm model>')"
        )
    if (
        "encoder_depth"
        in inspect.signature(smp.MODEL_ARCHITECTURES_MAPPING[archs[arch.lower()]]).parameters
    ):
        options["encoder_depth"] = encoder_depth
    with _downloads(encoder_name):
        net = smp.create_model(
            arch,
            encoder_name=encoder_name,
            encoder_weights="imagenet" if pretrained else None,
            in_channels=in_channels,
            classes=num_classes,
            **options,
        )
    if encoder_weights_path is not None:
        _load_weights(net.encoder, encoder_weights_path)
    return Segmenter(net, stride=net.encoder.output_stride)


def torchvision_model(
    arch: str,
    num_classes: int,
    encoder_name: str = "resnet50",
    pretrained: bool = False,
    encoder_weights_path: str | None = None,
    aux_weight: float = 0.0,
) -> Segmenter:
    """torchvision's FCN, DeepLabV3 or LR-ASPP; ``aux_weight`` > 0 adds the auxiliary head's loss."""
    name = f"{arch}_{encoder_name}"
    builders = torchvision.models.list_models(module=torchvision.models.segmentation)
    if name not in builders:
        raise ValueError(
            f"torchvision has no {name!r} (model.arch={arch!r}, model.encoder_name="
            f"{encoder_name!r}); options: {sorted(builders)}"
        )
    builder = torchvision.models.get_model_builder(name)
    kwargs = {"aux_loss": True} if aux_weight > 0 else {}
    with _downloads(encoder_name):
        net = builder(
            weights=None,
            weights_backbone="DEFAULT" if pretrained else None,
            num_classes=num_classes,
            **kwargs,
        )
    if encoder_weights_path is not None:
        _load_weights(net.backbone, encoder_weights_path)
    # torchvision heads upsample to any input size, so no padding is needed (stride 1).
    return Segmenter(net, stride=1, aux_weight=aux_weight)


@contextmanager
def _downloads(encoder_name: str):
    """Turn a failed weight download (no network: an OSError) into how to get the weights."""
    try:
        yield
    except OSError as error:
        raise RuntimeError(
            f"cannot download ImageNet weights for encoder {encoder_name!r} ({error}); "
            + NO_DOWNLOAD_HELP
        ) from error


def _is_smp_encoder(name: str) -> bool:
    if name.startswith("tu-"):  # smp wraps any timm backbone under this prefix
        return timm.is_model(name.removeprefix("tu-"))
    return name in smp.encoders.get_encoder_names()


def _load_weights(module: nn.Module, path: str) -> None:
    """Load an encoder/backbone state dict from a local file, ignoring classifier keys."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.encoder_weights_path={path}: file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    # nn.Module's own method: smp's encoders override it without returning the key lists.
    missing, unexpected = nn.Module.load_state_dict(module, state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith("fc.")]  # ImageNet classifier head
    if missing or unexpected:
        raise ValueError(
            f"model.encoder_weights_path={path} does not fit encoder {type(module).__name__}: "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )


def load_checkpoint_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], source: str
) -> None:
    """Load a checkpoint's model weights, or raise a ValueError naming the weights that do not
    fit (shape, missing, unexpected) instead of torch's size-mismatch traceback."""
    own = model.state_dict()
    reshaped = [
        f"{key} {list(value.shape)} in the checkpoint, {list(own[key].shape)} in this model"
        for key, value in weights.items()
        if key in own and value.shape != own[key].shape
    ]
    missing = [key for key in own if key not in weights]
    unexpected = [key for key in weights if key not in own]
    if reshaped or missing or unexpected:
        problems = [
            f"{len(found)} {what} (e.g. {'; '.join(found[:3])})"
            for what, found in (
                ("weights of another shape", reshaped),
                ("weights missing from the checkpoint", missing),
                ("checkpoint weights this model lacks", unexpected),
            )
            if found
        ]
        raise ValueError(f"{source} does not fit the configured model: {', '.join(problems)}")
    model.load_state_dict(weights)
