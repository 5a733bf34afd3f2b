"""Learning-rate schedule of AFA (design notes sec. 5): linear warm-up, then poly decay.

With T = ``train.iterations``, W = ``train.warmup_iters``, t = optimizer steps taken::

    factor(t) = r + (1 - r) * t / W              t < W   (r = train.warmup_ratio)
    factor(t) = (1 - (t - W) / (T - W)) ** p     W <= t  (p = train.poly_power)

so the learning rate rises from ``r x lr`` to ``lr`` and then decays to 0 at the end
without a jump (the published code restarts the poly curve from ``(1 - W/T)``; the
difference is at most W/T). Each optimizer group's learning rate is
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
    if total <= warmup:
        return 1.0
    remaining = 1.0 - min(step - warmup, total - warmup) / (total - warmup)
    return remaining ** train_cfg.poly_power


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig) -> LambdaLR:
    """LambdaLR over each group's initial lr (train.lr x lr_mult) with :func:`lr_factor`."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, train_cfg))


__all__ = ["build_scheduler", "lr_factor"]
