"""Parameter groups for fine-tuning: a lower learning rate for the pretrained encoder, and no
weight decay on normalization layers and biases."""

import logging

from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer

from seg.config import build
from seg.models import encoder_prefix

log = logging.getLogger(__name__)

# Every BatchNorm, SyncBatchNorm and InstanceNorm derives from _NormBase; timm's and smp's own
# norm layers derive from these four.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def param_groups(
    model: nn.Module, lr: float, encoder_lr_mult: float = 1.0, norm_bias_decay: bool = True
) -> list[dict]:
    """The optimizer's parameter groups, the base-LR group first (the LR that is logged).

    The encoder's groups get ``lr * encoder_lr_mult``; without ``norm_bias_decay`` the
    parameters of normalization layers and all biases get ``weight_decay`` 0. Groups set only
    what differs from the optimizer's own settings. The defaults give one group of all
    parameters in ``model.parameters()`` order, as the optimizer state of older checkpoints has.
    """
    if encoder_lr_mult == 1 and norm_bias_decay:
        return [{"name": "all", "params": list(model.parameters())}]
    # Without an LR of its own the encoder needs no group of its own.
    encoder = encoder_prefix(model) + "." if encoder_lr_mult != 1 else None
    no_decay = set() if norm_bias_decay else _norm_and_bias_names(model)
    groups = {
        (in_encoder, decays): {"name": _group_name(in_encoder, decays), "params": []}
        for in_encoder in (False, True)
        for decays in (True, False)
    }
    for name, param in model.named_parameters():
        in_encoder = encoder is not None and name.startswith(encoder)
        groups[in_encoder, name not in no_decay]["params"].append(param)
    for (in_encoder, decays), group in groups.items():
        if in_encoder:
            group["lr"] = lr * encoder_lr_mult
        if not decays:
            group["weight_decay"] = 0.0
    return [group for group in groups.values() if group["params"]]


def _group_name(in_encoder: bool, decays: bool) -> str:
    return ("encoder" if in_encoder else "base") + ("" if decays else "_no_decay")


def _norm_and_bias_names(model: nn.Module) -> set[str]:
    """Names of the parameters of normalization layers and of every bias."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(prefix=module_name, recurse=False):
            if isinstance(module, NORM_LAYERS) or param_name.rsplit(".", 1)[-1] == "bias":
                names.add(param_name)
    return names


def build_optimizer(config: DictConfig, model: nn.Module) -> Optimizer:
    """The torch optimizer of an ``optimizer`` config over ``param_groups(model, ...)``.

    For the entry points (like ``build``): seg's own keys (``encoder_lr_mult``,
    ``norm_bias_decay``) shape the groups and never reach the torch class's constructor.
    """
    options = OmegaConf.to_container(config, resolve=True)
    encoder_lr_mult = options.pop("encoder_lr_mult", 1.0)
    if encoder_lr_mult == 0:
        # Frozen: no gradients at all, so none enlarge the norm that clipping and the
        # non-finite check see, and the backward pass stops at the decoder. The encoder keeps
        # its (lr 0) group: the same groups as any other multiplier.
        model.get_submodule(encoder_prefix(model)).requires_grad_(False)
    groups = param_groups(
        model,
        lr=options["lr"],
        encoder_lr_mult=encoder_lr_mult,
        norm_bias_decay=options.pop("norm_bias_decay", True),
    )
    optimizer = build(OmegaConf.create(options))(params=groups)
    for group in optimizer.param_groups:
        log.info(
            "Parameter group %s: %d tensors, %s parameters, lr %.3g, weight_decay %.3g",
            group["name"], len(group["params"]), f"{sum(p.numel() for p in group['params']):,}",
            group["lr"], group.get("weight_decay", 0.0),
        )  # fmt: skip
    return optimizer
