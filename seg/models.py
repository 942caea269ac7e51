"""Thin adapters over segmentation-models-pytorch and torchvision with one contract:
``model(images (N, 3, H, W)) -> logits (N, C, H, W)`` at the input resolution, any H and W."""

import difflib
import inspect
import io
import logging
from collections import Counter
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.segmentation._utils import _SimpleSegmentationModel

from seg.engine.checkpoint import load_checkpoint, validated_weights

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


def encoder_prefix(model: Segmenter) -> str:
    """Where the encoder sits in ``model``: ``net.encoder`` (smp) or ``net.backbone``
    (torchvision), as a module path and a state-dict key prefix."""
    for name in ("encoder", "backbone"):
        if isinstance(getattr(model.net, name, None), nn.Module):
            return f"net.{name}"
    raise ValueError(
        f"{type(model.net).__name__} has neither an encoder (smp) nor a backbone (torchvision)"
    )


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


def init_from(model: Segmenter, path: str) -> None:
    """Start ``model`` from the weights at ``path`` (``init_from=``, a new run's starting point):
    a seg checkpoint (.pt) or a directory written by smp's ``save_pretrained``.

    Weights whose names and shapes fit are loaded; the model's others keep their fresh
    initialisation (e.g. the head for another number of classes); the file's others are
    ignored. Raises a ValueError when none of the encoder's weights fit (another encoder).
    """
    weights = _read_weights(path)
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
    # Tensors of the model that the file lacks train from scratch: worth a warning, unlike a
    # head of another shape, which is what fine-tuning to other classes means.
    log.log(
        logging.WARNING if missing else logging.INFO,
        "init_from=%s:\n  loaded %d tensors: %s\n  re-initialised %d of another shape: %s"
        "\n  re-initialised %d absent from the file: %s\n  ignored %d the model lacks: %s",
        path,
        len(fitting), _grouped(fitting, every),
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
        except (KeyError, ValueError, OSError) as error:
            raise ValueError(
                f"init_from={path}: not a directory smp's save_pretrained wrote, or an "
                f"incomplete one ({type(error).__name__}: {error})"
            ) from error
        return {f"net.{key}": value for key, value in net.state_dict().items()}
    if not location.is_file():
        raise FileNotFoundError(
            f"init_from={path}: no such file or directory; give a seg checkpoint (.pt) or a "
            "directory written by smp's save_pretrained"
        )
    checkpoint = load_checkpoint(location)
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
