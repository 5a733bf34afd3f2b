"""``mmcv.cnn.ConvModule``, as much as the official ``SegFormerHead`` uses: conv -> norm -> ReLU."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_NORMS = {"BN": nn.BatchNorm2d, "BN2d": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm}


class ConvModule(nn.Module):
    """Conv2d (bias only without a norm, mmcv's ``bias="auto"``), then the norm of ``norm_cfg`` (named ``bn``
    as mmcv names batch norms), then ReLU (named ``activate``, in place). mmcv's initialisation: He-normal
    (fan_out) conv weight, norm weight 1 and bias 0."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, norm_cfg: dict[str, Any] | None = None, **unused: Any) -> None:
        super().__init__()
        if unused.get("act_cfg", {"type": "ReLU"}) != {"type": "ReLU"} or unused.get("conv_cfg") is not None:
            raise NotImplementedError(f"ConvModule stub: only the default conv and ReLU, got {unused}")
        self.with_norm = norm_cfg is not None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                              bias=not self.with_norm)
        if self.with_norm:
            norm_cfg = dict(norm_cfg)
            kind = norm_cfg.pop("type")
            requires_grad = norm_cfg.pop("requires_grad", True)
            self.bn = _NORMS[kind](out_channels, **norm_cfg)
            for p in self.bn.parameters():
                p.requires_grad = requires_grad
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        if self.with_norm:
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.with_norm:
            x = self.bn(x)
        return self.activate(x)
