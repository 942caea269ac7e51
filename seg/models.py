"""Thin adapters over segmentation-models-pytorch and torchvision. Segmenters (semantic) have
one contract: ``model(images (N, in_channels, H, W)) -> logits (N, C, H, W)`` at the input
resolution, any H and W. ``maskrcnn`` (instance) is torchvision's Mask R-CNN, which never resizes."""

import difflib
import inspect
import io
import logging
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors import SafetensorError
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    mobilenet_backbone,
    resnet_fpn_backbone,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.segmentation._utils import _SimpleSegmentationModel
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from seg.checkpoint import load_checkpoint, validated_weights

log = logging.getLogger(__name__)

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
        if isinstance(self.net, _SimpleSegmentationModel):
            # torchvision's FCN and DeepLabV3, called part by part: their own forward would
            # compute the auxiliary head also where it is not wanted (validation, inference).
            features = self.net.backbone(images)
            logits = self.net.classifier(features["out"])
            aux = (
                self.net.aux_classifier(features["aux"])
                if with_aux and self.net.aux_classifier is not None
                else None
            )
        else:
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
    rgb_bands: Sequence[int] | None = None,
    options: dict | None = None,
) -> Segmenter:
    """Any segmentation-models-pytorch architecture (Unet, FPN, DeepLabV3Plus, Segformer, ...).

    ``pretrained`` loads ImageNet encoder weights; ``options`` are extra keyword arguments of the
    smp class (e.g. ``decoder_channels``), checked by smp itself. With ``in_channels`` != 3,
    RGB weights (ImageNet's or ``encoder_weights_path``'s) start the input convolution as
    :func:`rgb_input_filters` says, with ``rgb_bands`` (1-based input channels) as R, G, B.
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

    def create(channels: int, weights: str | None) -> nn.Module:
        return smp.create_model(arch, encoder_name=encoder_name, encoder_weights=weights,
                                in_channels=channels, classes=num_classes, **options)  # fmt: skip

    with _downloads(encoder_name):
        net = create(3 if pretrained else in_channels, "imagenet" if pretrained else None)
    if pretrained and in_channels != 3:
        # smp (and timm) would cycle R,G,B over the bands; the RGB encoder's weights are
        # adapted here instead, into the same model built for in_channels bands.
        rgb_weights = net.encoder.state_dict()
        net = create(in_channels, None)
        _load_encoder_state(net.encoder, rgb_weights, rgb_bands, "the ImageNet weights")
    if encoder_weights_path is not None:
        _load_weights(net.encoder, encoder_weights_path, rgb_bands)
    model = Segmenter(net, stride=net.encoder.output_stride)
    if encoder_depth < 5:
        freeze_unused(model, in_channels)
    return model


def freeze_unused(model: nn.Module, in_channels: int = 3, size: int = 64) -> list[str]:
    """Set ``requires_grad=False`` on the parameters no output depends on, found by one
    forward and backward pass on zeros (eval mode: no BatchNorm statistics change, no random
    number is drawn); returns their names.

    smp keeps the encoder stages that ``encoder_depth`` < 5 leaves unused: their parameters
    would never get a gradient, which DDP reports as an error at its second iteration. The
    modules stay, so checkpoints of such models keep their keys and still load.
    """
    was_training = model.training
    model.eval()
    model(torch.zeros(1, in_channels, size, size)).sum().backward()
    model.train(was_training)
    unused = []
    for name, parameter in model.named_parameters():
        if parameter.grad is None and parameter.requires_grad:
            parameter.requires_grad_(False)
            unused.append(name)
        parameter.grad = None
    return unused


def torchvision_model(
    arch: str,
    num_classes: int,
    encoder_name: str = "resnet50",
    pretrained: bool = False,
    encoder_weights_path: str | None = None,
    aux_weight: float = 0.0,
    in_channels: int = 3,
    rgb_bands: Sequence[int] | None = None,
) -> Segmenter:
    """torchvision's FCN, DeepLabV3 or LR-ASPP; ``aux_weight`` > 0 adds the auxiliary head's loss.
    ``in_channels`` and ``rgb_bands`` as for :func:`smp_model`."""
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
    if in_channels != 3:  # torchvision's builders take RGB only
        _widen_input_conv(net.backbone, in_channels, rgb_bands, pretrained)
    if encoder_weights_path is not None:
        _load_weights(net.backbone, encoder_weights_path, rgb_bands)
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


def _load_weights(module: nn.Module, path: str, rgb_bands: Sequence[int] | None) -> None:
    """Load an encoder/backbone state dict from a local file, ignoring classifier keys."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.encoder_weights_path={path}: file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    _load_encoder_state(module, state, rgb_bands, f"model.encoder_weights_path={path}")


def _load_encoder_state(
    module: nn.Module, state: dict[str, torch.Tensor], rgb_bands: Sequence[int] | None, source: str
) -> None:
    """Load ``state`` into an encoder, its RGB input convolution adapted to the module's bands."""
    state, adapted = adapt_rgb_input(state, module.state_dict(), rgb_bands)
    if adapted:
        log.info("%s: RGB input convolution %s adapted to %d bands (R, G, B on bands %s)",
                 source, ", ".join(adapted), module.state_dict()[adapted[0]].shape[1],
                 list(rgb_bands) if rgb_bands else "none")  # fmt: skip
    # nn.Module's own method: smp's encoders override it without returning the key lists.
    try:
        missing, unexpected = nn.Module.load_state_dict(module, state, strict=False)
    except RuntimeError as error:  # tensors of another shape: torch's message names them
        raise ValueError(
            f"{source} does not fit encoder {type(module).__name__}: {error}"
        ) from None
    unexpected = [k for k in unexpected if not k.startswith("fc.")]  # ImageNet classifier head
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit encoder {type(module).__name__}: "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )


def rgb_input_filters(
    weight: torch.Tensor, in_channels: int, rgb_bands: Sequence[int] | None
) -> torch.Tensor:
    """An input convolution's RGB filters (O, 3, kh, kw) made into filters for ``in_channels``
    bands (O, in_channels, kh, kw): the red, green and blue filters on ``rgb_bands`` (1-based
    input channels, in R, G, B order; None: no band is red, green or blue), the mean of the
    three on every other band, all scaled by 3 / in_channels. An image equal on every band
    thus gets the response the RGB layer gives a grey image (smp and timm scale alike, but
    cycle R, G, B, R, ... over the bands: a coastal-aerosol band 1 would get the red filter).
    """
    bands = _checked_rgb_bands(rgb_bands, in_channels)
    out_channels, _, *kernel = weight.shape
    adapted = weight.mean(dim=1, keepdim=True).expand(out_channels, in_channels, *kernel).clone()
    for colour, band in enumerate(bands):
        adapted[:, band - 1] = weight[:, colour]
    return adapted * (3 / in_channels)


def _checked_rgb_bands(rgb_bands: Sequence[int] | None, in_channels: int) -> list[int]:
    if rgb_bands is None and in_channels >= 3:
        log.warning(
            "data.rgb_bands is not set: each of the %d input bands gets the mean of the "
            "pretrained red, green and blue filters. Set data.rgb_bands=[r,g,b] (counted from "
            "1, after data.bands) to give the red, green and blue bands their own",
            in_channels,
        )
    bands = [] if rgb_bands is None else list(rgb_bands)
    if bands and (
        len(bands) != 3
        or len(set(bands)) != 3
        or not all(isinstance(b, int) and 1 <= b <= in_channels for b in bands)
    ):
        raise ValueError(
            f"data.rgb_bands={bands}: give three distinct input bands, red, green, blue, "
            f"counted from 1 (1..{in_channels}), or null when none is"
        )
    return bands


def adapt_rgb_input(
    weights: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    rgb_bands: Sequence[int] | None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``weights`` with each RGB input convolution, a weight (O, 3, kh, kw) where the model's
    state ``own`` has (O, C, kh, kw), C != 3, replaced by :func:`rgb_input_filters`; and the
    keys so adapted. Other tensors are returned as they are."""
    adapted = [
        key
        for key, value in weights.items()
        if key in own
        and value.ndim == 4
        and value.shape[1] == 3
        and own[key].shape[1] != 3
        and own[key].shape[:1] + own[key].shape[2:] == value.shape[:1] + value.shape[2:]
    ]
    return {
        key: rgb_input_filters(value, own[key].shape[1], rgb_bands) if key in adapted else value
        for key, value in weights.items()
    }, adapted


def _widen_input_conv(
    backbone: nn.Module, in_channels: int, rgb_bands: Sequence[int] | None, pretrained: bool
) -> None:
    """Give a torchvision backbone's first convolution ``in_channels`` inputs: its pretrained
    RGB filters adapted (:func:`rgb_input_filters`), or fresh ones initialised as torchvision
    initialises them (Kaiming normal over fan-out, which the band count does not change)."""
    conv = next(module for module in backbone.modules() if isinstance(module, nn.Conv2d))
    if pretrained:
        weight = rgb_input_filters(conv.weight.detach(), in_channels, rgb_bands)
    else:
        weight = conv.weight.new_empty(conv.out_channels, in_channels, *conv.kernel_size)
        nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
    conv.in_channels = in_channels
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)  # frozen stays


def encoder_prefix(model: nn.Module) -> str:
    """Where the encoder sits in ``model``: ``net.encoder`` (smp), ``net.backbone``
    (torchvision's segmenters) or ``backbone.body`` (Mask R-CNN, whose FPN is not the
    encoder), as a module path and a state-dict key prefix."""
    for path in ("net.encoder", "net.backbone", "backbone.body"):
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        return path
    raise ValueError(f"{type(model).__name__} has no encoder (smp), backbone (torchvision) or "
                     "backbone body (Mask R-CNN)")  # fmt: skip


def _match_weights(
    own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Sort keys by how ``weights`` fit a model's state dict ``own``: (fitting, of another
    shape, missing from ``weights``, absent from the model)."""
    fitting = [
        key for key, value in weights.items() if key in own and value.shape == own[key].shape
    ]
    reshaped = [key for key in weights if key in own and weights[key].shape != own[key].shape]
    missing = [key for key in own if key not in weights]
    unexpected = [key for key in weights if key not in own]
    return fitting, reshaped, missing, unexpected


def load_checkpoint_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], source: str
) -> None:
    """Load a checkpoint's model weights, or raise a ValueError naming the weights that do not
    fit (shape, missing, unexpected) instead of torch's size-mismatch traceback."""
    own = model.state_dict()
    _, reshaped, missing, unexpected = _match_weights(own, weights)
    if reshaped or missing or unexpected:
        reshaped = [
            f"{key} {list(weights[key].shape)} in the checkpoint, {list(own[key].shape)} in "
            "this model"
            for key in reshaped
        ]
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


def init_from(model: Segmenter, path: str, rgb_bands: Sequence[int] | None = None) -> None:
    """Start ``model`` from the weights at ``path`` (``init_from=``, a new run's starting point):
    a seg checkpoint (.pt) or a directory written by smp's ``save_pretrained``.

    Weights whose names and shapes fit are loaded; the model's others keep their fresh
    initialisation (e.g. the head for another number of classes); the file's others are
    ignored. An RGB file's input convolution is adapted to a model of other input channels
    (:func:`rgb_input_filters`, ``rgb_bands`` as R, G, B). Raises a ValueError when none of
    the encoder's weights fit (another encoder).
    """
    weights, adapted = adapt_rgb_input(_read_weights(path), model.state_dict(), rgb_bands)
    fitting, reshaped, missing, unexpected = _match_weights(model.state_dict(), weights)
    encoder = encoder_prefix(model) + "."
    if not any(key.startswith(encoder) for key in fitting):
        theirs = [key for key in weights if key.startswith(encoder)] or list(weights)
        ours = [key for key in missing + reshaped if key.startswith(encoder)]
        raise ValueError(
            f"init_from={path} does not fit the configured model: none of the encoder's "
            f"weights ({encoder}*) match in name and shape (the file has e.g. {theirs[:2]}, "
            f"the model {ours[:2]}). Configure the model the file was trained with "
            "(model=..., model.encoder_name=...)"
        )
    model.load_state_dict({key: weights[key] for key in fitting}, strict=False)
    every = list(model.state_dict()) + unexpected
    # Encoder weights the model lacks: a deeper encoder of the same family (resnet34 into
    # resnet18) fits in part, and only a partial copy of it loads.
    other_encoder = any(key.startswith(encoder) for key in unexpected)
    # An encoder tensor of another shape (the input convolution of a file with other bands
    # than RGB and the model's) trains from scratch, unlike a head of another shape, which is
    # what fine-tuning to other classes means; so do tensors the file lacks: worth a warning.
    other_bands = any(key.startswith(encoder) for key in reshaped)
    log.log(
        logging.WARNING if missing or other_encoder or other_bands else logging.INFO,
        "init_from=%s:%s%s\n  loaded %d tensors: %s%s\n  re-initialised %d of another shape: %s"
        "\n  re-initialised %d absent from the file: %s\n  ignored %d the model lacks: %s",
        path,
        " its encoder has weights the model lacks: another encoder than model.encoder_name? "
        "Only a partial copy of it is loaded" * other_encoder,
        " encoder weights of another shape start fresh: the file has other input bands than "
        "the model, and only an RGB file's input convolution adapts" * other_bands,
        len(fitting), _grouped(fitting, every),
        f"; of which {', '.join(adapted)} RGB, adapted to the model's bands (R, G, B on "
        f"{list(rgb_bands) if rgb_bands else 'none'})" * bool(adapted),
        len(reshaped), _grouped(reshaped, every),
        len(missing), _grouped(missing, every),
        len(unexpected), _grouped(unexpected, every),
    )  # fmt: skip


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """The model weights at ``path`` with ``Segmenter``'s key names."""
    location = Path(path)
    if location.is_dir():
        if not (location / "config.json").is_file():
            raise ValueError(
                f"init_from={path} is a directory without config.json: give a seg checkpoint "
                "(.pt) or a directory written by smp's save_pretrained"
            )
        try:
            # encoder_weights=None: the directory's weights replace the encoder's, so
            # nothing is downloaded. huggingface_hub print()s where it loads from: silenced.
            with redirect_stdout(io.StringIO()):
                net = smp.from_pretrained(str(location), encoder_weights=None)
        except (KeyError, ValueError, OSError, AttributeError, SafetensorError) as error:
            # AttributeError: config.json names a class smp lacks; SafetensorError: the weights
            # file is corrupted or truncated.
            raise ValueError(
                f"init_from={path}: not a directory smp's save_pretrained wrote, or a corrupted, "
                f"truncated or incomplete one ({type(error).__name__}: {error})"
            ) from error
        return {f"net.{key}": value for key, value in net.state_dict().items()}
    if not location.is_file():
        raise FileNotFoundError(
            f"init_from={path}: no such file or directory; give a seg checkpoint (.pt), a "
            "directory written by smp's save_pretrained or a state dict of the model's (.pth)"
        )
    try:
        checkpoint = load_checkpoint(location)
    except ValueError as error:
        if "is not a seg checkpoint" not in str(error):
            raise
        # A plain state dict of the model, e.g. torchvision's COCO weights of Mask R-CNN.
        state = torch.load(location, map_location="cpu", weights_only=True)
        if not all(isinstance(value, torch.Tensor) for value in state.values()):
            raise ValueError(
                f"init_from={path}: neither a seg checkpoint nor a state dict of tensors"
            ) from error
        return state
    return validated_weights(checkpoint)  # what evaluate reports


def _grouped(keys: list[str], every: list[str]) -> str:
    """``keys`` in short: each module of which all of ``every``'s keys are in ``keys`` is
    named once (``net.encoder.* (102)``), so a list of hundreds reads in one line."""
    chosen = set(keys)
    total, inside = Counter(), Counter()
    for key in every:
        for prefix in _prefixes(key):
            total[prefix] += 1
            inside[prefix] += key in chosen
    names = {}  # the outermost module per key whose keys are all chosen; insertion-ordered
    for key in keys:
        prefix = next(p for p in _prefixes(key) if inside[p] == total[p])
        names[prefix] = key if total[prefix] == 1 else f"{prefix}.* ({total[prefix]})"
    return ", ".join(names.values()) or "none"


def _prefixes(key: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: the modules around a key, outermost first."""
    parts = key.split(".")
    return [".".join(parts[:depth]) for depth in range(1, len(parts) + 1)]


# Mask R-CNN (torchvision) for the instance task. Backbones: ResNet-FPN as in the builders
# (resnet50_v2: maskrcnn_resnet50_fpn_v2's convolutional heads with BatchNorm) and MobileNetV3-FPN.
MASKRCNN_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet50_v2", "mobilenet_v3_small",
                      "mobilenet_v3_large")  # fmt: skip
COCO_CLASSES = 91  # torchvision's COCO weights: 90 category ids (with gaps) and background


class KeepSize(GeneralizedRCNNTransform):
    """Mask R-CNN's input transform without resizing and normalizing: seg's transforms own
    the scale (torchvision's would rescale every image to ``min_size`` in eval) and the task
    normalizes once, with ``data.mean``/``data.std``. It still batches the images, padded to
    a multiple of ``size_divisible``."""

    def __init__(self, size_divisible: int = 32):
        super().__init__(min_size=1, max_size=1, image_mean=[0.0], image_std=[1.0],
                         size_divisible=size_divisible)  # fmt: skip

    # typed as torchvision types them: torch.jit.script (export.py) compiles these overrides
    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return image, target


def in_float32(module: nn.Module, inputs, output):
    """A forward hook: ``output`` (tensors, or lists/tuples of them) in float32. On the heads
    whose outputs become boxes, scores and masks, so that box decoding, NMS, score ranking and
    mask pasting run in float32 under bf16/fp16 autocast (bf16 moves boxes in 8-pixel steps
    past x=1024 and merges close scores)."""
    if isinstance(output, torch.Tensor):
        return output.float()
    return type(output)(in_float32(module, inputs, item) for item in output)


def maskrcnn(
    num_classes: int,
    backbone: str = "resnet18",
    weights_path: str | None = None,
    trainable_layers: int | None = None,
    fpn_channels: int = 256,
    box_head_size: int = 1024,
    mask_head_channels: int = 256,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    detections_per_image: int = 100,
    score_threshold: float = 0.05,
    rpn_batch_size: int = 256,
    roi_batch_size: int = 512,
    in_channels: int = 3,
    rgb_bands: Sequence[int] | None = None,
) -> MaskRCNN:
    """torchvision's Mask R-CNN for ``num_classes`` classes, background included (class 0).

    Without ``weights_path`` the whole network trains from scratch (BatchNorm everywhere, all
    layers trainable). ``weights_path``: a local file of torchvision's COCO weights for this
    backbone (nothing is downloaded); built as torchvision's builder builds it with weights
    (frozen BatchNorm in the backbone, ``trainable_layers`` of it trained, 3 by default; the
    v1 weights' BatchNorm epsilon 0), with the class heads re-initialised for another
    ``num_classes``. ``fpn_channels``, ``box_head_size`` and ``mask_head_channels`` size the
    FPN and heads (not for resnet50_v2, whose heads are torchvision's). One anchor size per
    FPN level (5 for ResNets, 3 for MobileNets), each with ``aspect_ratios``;
    ``detections_per_image`` and ``score_threshold`` bound what inference returns;
    ``rpn_batch_size``/``roi_batch_size`` are the sampled anchors and proposals per image.
    ``in_channels`` bands in: the backbone's first convolution takes them (with COCO weights,
    its RGB filters adapted as :func:`rgb_input_filters` adapts them, on ``rgb_bands``).
    """
    if backbone not in MASKRCNN_BACKBONES:
        raise ValueError(f"model.backbone={backbone!r}; options: {list(MASKRCNN_BACKBONES)}")
    pretrained = weights_path is not None
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else (5 if backbone.startswith("resnet") else 6)
    norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    options = dict(box_detections_per_img=detections_per_image, box_score_thresh=score_threshold,
                   rpn_batch_size_per_image=rpn_batch_size,
                   box_batch_size_per_image=roi_batch_size)  # fmt: skip
    classes = COCO_CLASSES if pretrained else num_classes
    if backbone == "resnet50_v2":
        model = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(
            weights=None, weights_backbone=None, num_classes=classes,
            trainable_backbone_layers=trainable_layers, **options,
        )  # fmt: skip
        if pretrained:  # the builder's backbone with weights: frozen BatchNorm
            freeze_batchnorm(model.backbone.body)
    else:
        body = _fpn_backbone(backbone, norm_layer, trainable_layers, fpn_channels)
        model = MaskRCNN(
            body, None,  # the predictors below carry the class count
            box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_size),
            box_predictor=FastRCNNPredictor(box_head_size, classes),
            mask_head=MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, 1),
            mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, classes),
            **options,
        )  # fmt: skip
    levels = len(model.backbone.body.return_layers) + 1  # + LastLevelMaxPool's
    if len(anchor_sizes) != levels:
        raise ValueError(
            f"model.anchor_sizes={list(anchor_sizes)}: give one size per feature level of the "
            f"{backbone} FPN ({levels}), smallest first"
        )
    model.rpn.anchor_generator = AnchorGenerator(
        tuple((size,) for size in anchor_sizes), (tuple(aspect_ratios),) * levels
    )
    model.transform = KeepSize()
    if pretrained:
        _load_coco_weights(model, weights_path, backbone, num_classes)
    if in_channels != 3:  # after the weights: their RGB filters are adapted, not dropped
        _widen_input_conv(model.backbone.body, in_channels, rgb_bands, pretrained)
    for head in (model.rpn.head, model.roi_heads.box_predictor, model.roi_heads.mask_predictor):
        head.register_forward_hook(in_float32)
    return model


def _fpn_backbone(
    name: str, norm_layer, trainable_layers: int, fpn_channels: int
) -> BackboneWithFPN:
    """torchvision's ResNet- or MobileNetV3-FPN (no weights) with ``fpn_channels`` channels."""
    if name.startswith("resnet"):
        backbone = resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=norm_layer,
                                       trainable_layers=trainable_layers)  # fmt: skip
    else:
        backbone = mobilenet_backbone(backbone_name=name, weights=None, fpn=True,
                                      norm_layer=norm_layer, trainable_layers=trainable_layers)  # fmt: skip
    if fpn_channels != backbone.out_channels:  # the builders' FPN has 256 channels
        in_channels = [block[0].in_channels for block in backbone.fpn.inner_blocks]
        backbone.fpn = FeaturePyramidNetwork(in_channels, fpn_channels, LastLevelMaxPool())
        backbone.out_channels = fpn_channels
    return backbone


def freeze_batchnorm(module: nn.Module) -> None:
    """Replace ``module``'s BatchNorm2d layers by FrozenBatchNorm2d with the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            frozen.load_state_dict(child.state_dict(), strict=False)  # no num_batches_tracked
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)


def _load_coco_weights(model: MaskRCNN, path: str, backbone: str, num_classes: int) -> None:
    """Load torchvision's COCO weights from ``path`` into ``model`` (built for 91 classes),
    then give it heads for ``num_classes``, freshly initialised where they differ."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"model.weights_path={path}: file not found. Download torchvision's COCO weights "
            "for this backbone on a machine with internet (e.g. maskrcnn_resnet50_fpn_coco-"
            "bf2d0c1e.pth from download.pytorch.org/models/) and copy it here"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    _, reshaped, missing, unexpected = _match_weights(own, state)
    if reshaped or missing or unexpected:
        raise ValueError(
            f"model.weights_path={path} does not fit a Mask R-CNN with backbone {backbone} "
            f"(and these fpn/head sizes): of another shape {reshaped[:2]}, missing "
            f"{missing[:2]}, unexpected {unexpected[:2]}; set model.backbone to the file's "
            "(resnet50 for maskrcnn_resnet50_fpn_coco, resnet50_v2 for _v2) and its sizes"
        )
    model.load_state_dict(state)
    if backbone != "resnet50_v2":  # what torchvision's builder does for the v1 COCO weights
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.eps = 0.0
    if num_classes != COCO_CLASSES:
        box = model.roi_heads.box_predictor
        mask = model.roi_heads.mask_predictor
        model.roi_heads.box_predictor = FastRCNNPredictor(box.cls_score.in_features, num_classes)
        model.roi_heads.mask_predictor = MaskRCNNPredictor(
            mask.conv5_mask.in_channels, mask.conv5_mask.out_channels, num_classes
        )
