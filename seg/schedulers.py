"""Per-iteration learning-rate schedules with linear warmup, as ``LambdaLR`` factors."""

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup_factor(iteration: int, warmup_iters: int, warmup_ratio: float) -> float:
    """Linear ramp from ``warmup_ratio`` to 1 over ``warmup_iters`` iterations."""
    return warmup_ratio + (1 - warmup_ratio) * iteration / warmup_iters


def _poly_factor(
    iteration: int,
    max_iters: int,
    power: float,
    min_lr_ratio: float,
    warmup_iters: int,
    warmup_ratio: float,
) -> float:
    if iteration < warmup_iters:
        return _warmup_factor(iteration, warmup_iters, warmup_ratio)
    progress = min(iteration / max_iters, 1.0)  # past max_iters the LR stays at its minimum
    return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress) ** power


def _cosine_factor(
    iteration: int, max_iters: int, min_lr_ratio: float, warmup_iters: int, warmup_ratio: float
) -> float:
    if iteration < warmup_iters:
        return _warmup_factor(iteration, warmup_iters, warmup_ratio)
    progress = min((iteration - warmup_iters) / max(max_iters - warmup_iters, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def poly(
    optimizer: Optimizer,
    max_iters: int,
    power: float = 0.9,
    min_lr_ratio: float = 0.0,
    warmup_iters: int = 0,
    warmup_ratio: float = 0.1,
) -> LambdaLR:
    """lr = base_lr * (1 - iter / max_iters) ** power, after the warmup (mmseg/DeepLab's poly)."""
    factor = partial(
        _poly_factor,
        max_iters=max_iters,
        power=power,
        min_lr_ratio=min_lr_ratio,
        warmup_iters=warmup_iters,
        warmup_ratio=warmup_ratio,
    )
    return LambdaLR(optimizer, factor)


def cosine(
    optimizer: Optimizer,
    max_iters: int,
    min_lr_ratio: float = 0.0,
    warmup_iters: int = 0,
    warmup_ratio: float = 0.1,
) -> LambdaLR:
    """Half a cosine from base_lr down to ``min_lr_ratio * base_lr`` after the warmup."""
    factor = partial(
        _cosine_factor,
        max_iters=max_iters,
        min_lr_ratio=min_lr_ratio,
        warmup_iters=warmup_iters,
        warmup_ratio=warmup_ratio,
    )
    return LambdaLR(optimizer, factor)
