"""The class-token projection heads of ToCo (Ru et al., CVPR 2023): a student head trained by the CTC loss and
a teacher head that follows it by an exponential moving average.

:class:`ProjectionHead` is the DINO head (Caron et al., ICCV 2021) as ToCo configures it: an MLP (``layers``
linear layers, GELU between, ``hidden_dim`` wide, ending at ``bottleneck_dim``), L2 normalisation, then a
linear layer without bias whose rows are normalised to unit length (DINO's weight-normalised last layer with
its gain frozen at 1, written here as a plain parameter and its row norm). :func:`ema_update` moves the
teacher's parameters towards the student's: t <- m t + (1 - m) s, ToCo's m = 0.9 at every iteration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """class tokens [N, in_dim] -> projections [N, out_dim] (each output a cosine of unit vectors)."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"ProjectionHead needs at least 1 layer, got {layers}")
        widths = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        modules: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            modules.append(nn.Linear(a, b))
            if i < layers - 1:
                modules.append(nn.GELU())
        self.mlp = nn.Sequential(*modules)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_weight = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_weight, a=math.sqrt(5))  # nn.Linear's default, as DINO's layer has

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return F.linear(x, self.last_weight / self.last_weight.norm(dim=1, keepdim=True))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Every parameter of ``teacher`` <- momentum x itself + (1 - momentum) x the student's (same structure)."""
    targets = list(teacher.parameters())
    sources = list(student.parameters())
    if len(targets) != len(sources):
        raise ValueError(f"teacher has {len(targets)} parameters, student {len(sources)}")
    torch._foreach_lerp_(targets, sources, 1.0 - momentum)


__all__ = ["ProjectionHead", "ema_update"]
