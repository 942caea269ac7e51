"""Losses with one contract: ``loss(logits (N, C, H, W), target (N, H, W) int64) -> scalar``.

Pixels whose target is ``ignore_index`` contribute nothing. Logits are cast to float32 first,
so a loss called under autocast still reduces in full precision.
"""

from collections.abc import Mapping, Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropy(nn.Module):
    """Softmax cross-entropy with optional per-class weights and label smoothing.

    Shape: logits (N, C, H, W), target (N, H, W) -> scalar, averaged over non-ignored pixels
    (weighted by class weight when given, as in ``torch.nn.CrossEntropyLoss``).
    """

    def __init__(
        self,
        ignore_index: int = 255,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        options = dict(
            weight=self.class_weights,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )
        if not torch.are_deterministic_algorithms_enabled():
            return F.cross_entropy(logits.float(), target, **options)
        # trainer.deterministic: CUDA's mean reduction adds with atomics (no deterministic
        # kernel), its per-pixel losses do not; the same mean, summed by a plain reduction.
        losses = F.cross_entropy(logits.float(), target, reduction="none", **options)
        valid = target != self.ignore_index
        if self.class_weights is None:
            return losses.sum() / valid.sum()
        weights = self.class_weights[target.masked_fill(~valid, 0)] * valid
        return losses.sum() / weights.sum()


class Dice(nn.Module):
    """Soft Dice loss, 1 - mean over classes of the Dice score over the whole batch (smp's).

    Classes absent from the batch's ground truth contribute 0. Shape: logits (N, C, H, W),
    target (N, H, W) -> scalar.
    """

    def __init__(self, ignore_index: int = 255, smooth: float = 0.0, log_loss: bool = False):
        super().__init__()
        self.dice = smp.losses.DiceLoss(
            mode="multiclass", ignore_index=ignore_index, smooth=smooth, log_loss=log_loss
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits.float(), target)


class Focal(nn.Module):
    """Softmax focal loss: mean over non-ignored pixels of ``-(1 - p_t)^gamma * log(p_t)``.

    Written here because smp's multiclass FocalLoss sums one-vs-rest *sigmoid* losses over the
    classes, which does not combine with softmax cross-entropy on the same logits.
    Shape: logits (N, C, H, W), target (N, H, W) -> scalar.
    """

    def __init__(self, ignore_index: int = 255, gamma: float = 2.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_pt = -F.cross_entropy(
            logits.float(), target, ignore_index=self.ignore_index, reduction="none"
        )
        valid = target != self.ignore_index  # ignored pixels have log_pt = 0 and are left out
        focal = -((1 - log_pt.exp()) ** self.gamma) * log_pt
        # clamp: an all-ignored batch gives 0, not NaN
        return (focal * valid).sum() / valid.sum().clamp_min(1)


class WeightedSum(nn.Module):
    """``sum(weights[name] * losses[name](logits, target))``, e.g. cross-entropy + Dice."""

    def __init__(self, losses: Mapping[str, nn.Module], weights: Mapping[str, float]):
        super().__init__()
        if set(losses) != set(weights):
            raise ValueError(
                f"loss.weights keys {sorted(weights)} must match loss.losses keys {sorted(losses)}"
            )
        self.losses = nn.ModuleDict(dict(losses))
        self.weights = dict(weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[name] * loss(logits, target) for name, loss in self.losses.items())
