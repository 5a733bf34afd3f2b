"""Attention logits kept as their two factors, for the AFA head of the CAM passes.

The affinity head needs only sum_m w_m S_m over its M maps, with S_m = q_m k_m^T. Given the
factors, that sum is one product [N, M*d] x [M*d, N] of the weighted queries and the keys
(:meth:`wsss.models.heads.AffinityHead.forward`), instead of M products [N, d] x [d, N], a
[B, M, N, N] tensor, a concatenation over blocks and a reduction over M. The two are the
same number up to float rounding (the sum is taken in another order).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class AttnFactors(NamedTuple):
    """Raw attention logits S = q k^T in factored form: q, k [B, M, N, d] (M = blocks x heads)."""

    q: Tensor
    k: Tensor

    def logits(self) -> Tensor:
        """The logits themselves, [B, M, N, N]."""
        return self.q @ self.k.transpose(-2, -1)


AttnRecord = Tensor | AttnFactors | None  # what an attention layer hands back besides its output


def record_mode(with_attn: bool, factored: bool) -> str | None:
    """What a backbone's recording attention layers keep: None, "logits" or "factors"."""
    return ("factors" if factored else "logits") if with_attn else None


def concat_attn(kept: list[Tensor] | list[AttnFactors]) -> Tensor | AttnFactors:
    """Several blocks' logits (or factors) -> one, concatenated over the map dimension."""
    if isinstance(kept[0], AttnFactors):
        return AttnFactors(torch.cat([f.q for f in kept], dim=1), torch.cat([f.k for f in kept], dim=1))
    return torch.cat(kept, dim=1)
