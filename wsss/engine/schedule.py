"""Learning-rate schedule of AFA (docs/method.md, "Losses, schedule"): linear warm-up, then poly decay.

With T = ``train.iterations``, W = ``train.warmup_iters``, t = optimizer steps taken::

    factor(t) = r + (1 - r) * t / W              t < W   (r = train.warmup_ratio)
    factor(t) = (1 - t / T) ** p                 W <= t  (p = train.poly_power)

as the official ``PolyWarmupAdamW``: the learning rate rises from ``r x lr`` to ``lr``, then
follows the poly curve of the whole run, which steps down to ``(1 - W/T) ** p`` at t = W (0.925
on VOC) and reaches 0 at the end. Each optimizer group's learning rate is
``train.lr * group["lr_mult"] * factor(t)`` (the groups of :meth:`AFANetwork.param_groups`);
the schedule is a :class:`torch.optim.lr_scheduler.LambdaLR`, so its state (the step
count) goes into the checkpoint with ``scheduler.state_dict()``.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from wsss.config import TrainConfig


def lr_factor(step: int, train_cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based)."""
    total, warmup, ratio = train_cfg.iterations, train_cfg.warmup_iters, train_cfg.warmup_ratio
    if step < warmup:
        return ratio + (1.0 - ratio) * step / warmup
    return (1.0 - min(step, total) / total) ** train_cfg.poly_power


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig) -> LambdaLR:
    """LambdaLR over each group's initial lr (train.lr x lr_mult) with :func:`lr_factor`."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, train_cfg))


__all__ = ["build_scheduler", "lr_factor"]
