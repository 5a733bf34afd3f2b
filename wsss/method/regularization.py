"""Dense-energy (dense CRF) regularisation of the segmentation softmax, in pure PyTorch.

Tang, Perazzi, Djelouah, Ben Ayed, Schroers, Boykov, "On Regularized Losses for
Weakly-supervised CNN Segmentation", ECCV 2018. The official AFA code (``DenseEnergyLoss``
in its ``utils/losses.py``, unused in its released training script) takes it from there and
needs a compiled permutohedral-lattice bilateral filter; this module computes the same kind of
energy with shifted tensor views, on CPU and GPU, with an analytic backward.

Formulation
-----------
Everything happens at a reduced resolution h x w = floor(H * scale) x floor(W * scale) of the
H x W crop (bilinear, ``align_corners=False``; at scale 0.5 that is the mean of each 2x2 block):

* S [B, C, h, w]: softmax of ``seg_logits`` (at their own resolution), bilinearly resized;
* I [B, 3, h, w]: the RGB image on 0..255 intensities;
* m [B, h, w]: the region of interest, 1 where *every* full-resolution pixel that the bilinear
  sample mixes is in ``valid_mask`` (so padding never leaks into I or m), else 0;
* the bilateral kernel, for pixels i != j with |dy|, |dx| <= radius (dy, dx = p_j - p_i):

      W_ij = exp(-|p_i - p_j|^2 / (2 (sigma_xy * scale)^2) - |I_i - I_j|^2 / (2 sigma_rgb^2)),

  zero outside the window; ``sigma_xy`` is in pixels of the full-resolution crop, hence the
  factor ``scale``, as the official code does.

The loss is the Potts relaxation sum_k S_k^T W (1 - S_k) over the pairs inside the ROI,
divided by the batch size B (as the official code divides by N):

    E = 1/B * sum_b sum_{i, j} m_i m_j W_ij sum_k S_ki (1 - S_kj)
      = 1/B * sum_b sum_{i, j} m_i m_j W_ij (1 - <S_i, S_j>)        (softmax rows sum to 1).

It is >= 0, zero for a segmentation that is constant and one-hot over the ROI, and counts the
similar-looking close pixel pairs whose class distributions differ. It is a plain sum (not a
mean over pixels), so it grows with the crop area: the weight has to be chosen for the crop.

Relation to the official code
-----------------------------
The official loss is -1/N * sum_k (m S_k)^T G (W~ (m S_k)): W~ the permutohedral-lattice
approximation of exp(-|f_i - f_j|^2 / 2) on the features (x, y) / sigma_xy and RGB / sigma_rgb
(self-pair j = i included), G a gate, 1 - max_k S_k on labelled pixels and 1 on pixels the
pseudo label ignores. Without the gate and the self-pair, -S^T W S differs from the energy above
by sum_ij m_i m_j W_ij, which does not depend on S: the gradients w.r.t. the logits are the
same. Differences that remain:

* window: W here is exact inside the (2 radius + 1)^2 window and zero outside it. With the
  defaults sigma_xy * scale = 50 px the official Gaussian is effectively global over the
  downscaled crop; the window is a deviation, for cost (time and memory linear in h * w * C *
  radius^2). Inside a radius-5 window the spatial factor is >= exp(-50 / 5000) ~ 0.99, so W is
  essentially the colour kernel over the 120 nearest pixels.
* no gate: every pair in the ROI counts fully. To leave pixels ignored by the pseudo label out
  (the official gate does the opposite and weights them fully), the caller clears them in
  ``valid_mask``.
* no self-pair (it only adds sum_i (1 - |S_i|^2), a confidence term, to the official loss),
  and the exact Gaussian rather than the lattice approximation.
* the official backward is -2 G W~ (m S) / N (the gate taken as a constant, on one side of the
  pair only); ours is the exact gradient of E.
* the official code resizes the image by nearest neighbour and the probabilities after upsampling
  the logits to the crop; here both are resized bilinearly, the probabilities straight from the
  logits' resolution.

Implementation: the window is visited through the 2 r (r + 1) offsets of one half-plane (the
pair (i, i + o) is the pair (j, j - o)): per offset one [B, 1, h, w] kernel map is computed from
shifted views of the once-padded image and ROI, and both ends of each pair are accumulated,
in place, into padded views of A = m * W (m S) [B, C, h, w] and D = m * W m [B, 1, h, w]. Then
E = sum(S * (D - A)) / B and dE/dS = (D - 2 A) / B, the backward of a custom autograd function,
so no per-offset graph is kept: memory is a few [B, C, h, w] tensors, never an [hw, hw] matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.method.ops import resize

# Images arrive in [0, 1]; sigma_rgb is on 0..255 intensities, as in the official code.
RGB_RANGE = 255.0
# A reduced pixel is in the ROI when the bilinear resize of the valid mask is 1 there, i.e. every
# full-resolution pixel mixed into it is valid; the tolerance absorbs rounding of the weights.
ROI_TOLERANCE = 1e-4


def half_window_offsets(radius: int) -> list[tuple[int, int]]:
    """(dy, dx) with |dy|, |dx| <= radius and (dy > 0 or (dy == 0 and dx > 0)): one offset of each pair
    {o, -o} of the (2 radius + 1)^2 - 1 window offsets, 2 radius (radius + 1) in all."""
    return [(dy, dx) for dy in range(radius + 1) for dx in range(-radius, radius + 1) if dy > 0 or dx > 0]


def reduced_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The resolution of the energy: floor(side * scale) like ``F.interpolate(scale_factor=scale)``, >= 1."""
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def downscale_inputs(images: Tensor, seg_logits: Tensor, valid_mask: Tensor,
                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The inputs of the energy at the reduced resolution h x w (see ``reduced_size``), float32.

    images [B, 3, H, W] in [0, 1], seg_logits [B, C, h0, w0], valid_mask bool [B, H, W] ->
    (rgb [B, 3, h, w] on 0..255, probs [B, C, h, w] softmax then bilinear, roi [B, 1, h, w] 0/1).
    Only ``probs`` carries gradient (to ``seg_logits``).
    """
    size = reduced_size(images.shape[-2], images.shape[-1], scale)
    rgb = resize(images.detach().float() * RGB_RANGE, size)
    probs = resize(seg_logits.float().softmax(dim=1), size)
    roi = resize(valid_mask.detach().unsqueeze(1).float(), size)
    roi = (roi >= 1.0 - ROI_TOLERANCE).float()
    return rgb, probs, roi


def filter_pairs(probs: Tensor, rgb: Tensor, roi: Tensor, sigma_rgb: float, sigma_xy: float,
                 radius: int) -> tuple[Tensor, Tensor]:
    """The windowed bilateral filtering of the energy, at one resolution (sigma_xy in its pixels).

    probs [B, C, h, w], rgb [B, 3, h, w] (0..255), roi [B, 1, h, w] (0/1), all float32 ->
    (A [B, C, h, w], D [B, 1, h, w]) with A_ki = m_i sum_j W_ij m_j S_kj and D_i = m_i sum_j W_ij m_j,
    the sums over the window offsets j - i != 0, |dy|, |dx| <= radius.
    """
    b, c, h, w = probs.shape
    r = radius
    pad = (r, r, r, r)
    # exp(-|I_i - I_j|^2 / (2 sigma_rgb^2)) = exp(-|I'_i - I'_j|^2) with I' = I / (sqrt(2) sigma_rgb)
    rgb = rgb * (1.0 / (math.sqrt(2.0) * sigma_rgb))
    rgb_pad = F.pad(rgb, pad)
    roi_pad = F.pad(roi, pad)  # zero outside the image: pairs leaving it get weight 0
    probs_pad = F.pad(probs, pad)
    acc = probs.new_zeros(b, c, h + 2 * r, w + 2 * r)  # A, padded so that both ends of a pair are views
    deg = probs.new_zeros(b, 1, h + 2 * r, w + 2 * r)  # D, likewise
    acc_i = acc[..., r : r + h, r : r + w]
    deg_i = deg[..., r : r + h, r : r + w]
    inv_two_var_xy = 1.0 / (2.0 * sigma_xy * sigma_xy)
    for dy, dx in half_window_offsets(r):
        if dy >= h or abs(dx) >= w:  # no pixel has this neighbour
            continue
        rows, cols = slice(r + dy, r + dy + h), slice(r + dx, r + dx + w)
        colour = (rgb_pad[..., rows, cols] - rgb).square_().sum(dim=1, keepdim=True)
        weight = colour.add_((dy * dy + dx * dx) * inv_two_var_xy).neg_().exp_()
        weight.mul_(roi).mul_(roi_pad[..., rows, cols])  # W_ij m_i m_j at i, for j = i + (dy, dx)
        acc_i.addcmul_(probs_pad[..., rows, cols], weight)  # i gathers S_j
        acc[..., rows, cols].addcmul_(probs, weight)  # j gathers S_i
        deg_i.add_(weight)
        deg[..., rows, cols].add_(weight)
    return acc_i, deg_i


class _DenseEnergy(torch.autograd.Function):
    """E = sum(S * (D - A)) / B, dE/dS = (D - 2 A) / B (see the module docstring)."""

    @staticmethod
    def forward(ctx, probs: Tensor, rgb: Tensor, roi: Tensor, sigma_rgb: float, sigma_xy: float,
                radius: int) -> Tensor:
        acc, deg = filter_pairs(probs, rgb, roi, sigma_rgb, sigma_xy, radius)
        batch = probs.shape[0]
        ctx.save_for_backward(acc, deg)
        ctx.batch = batch
        return (probs * (deg - acc)).sum() / batch

    @staticmethod
    def backward(ctx, grad_energy: Tensor):
        acc, deg = ctx.saved_tensors
        grad_probs = (deg - 2.0 * acc).mul_(grad_energy / ctx.batch)
        return grad_probs, None, None, None, None, None


def dense_energy_loss(images: Tensor, seg_logits: Tensor, valid_mask: Tensor, sigma_rgb: float, sigma_xy: float,
                      scale: float, radius: int) -> Tensor:
    """images [B, 3, H, W] RGB in [0, 1] (de-normalized); seg_logits [B, C, h, w] (any size; resized bilinearly);
    valid_mask bool [B, H, W] (True = pixel of the real image, not padding; pixels ignored by the pseudo label
    may also be excluded by the caller) -> scalar loss (float32), differentiable w.r.t. seg_logits.

    The dense energy of the module docstring: sigma_rgb on 0..255 intensities, sigma_xy in pixels of the
    H x W crop (scaled by ``scale`` with the images), ``scale`` the resolution factor of the energy,
    ``radius`` the half-size of the square window of neighbours. Runs in float32 whatever the autocast
    state or the input dtypes. Trainer defaults: sigma_rgb 15, sigma_xy 100, scale 0.5, radius 5.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if seg_logits.dim() != 4 or seg_logits.shape[0] != images.shape[0]:
        raise ValueError(f"seg_logits must be [B, C, h, w] with B = {images.shape[0]}, got {tuple(seg_logits.shape)}")
    expected_mask = (images.shape[0], *images.shape[-2:])
    if tuple(valid_mask.shape) != expected_mask:
        raise ValueError(f"valid_mask must be [B, H, W] = {list(expected_mask)}, got {tuple(valid_mask.shape)}")
    if sigma_rgb <= 0 or sigma_xy <= 0 or scale <= 0:
        raise ValueError(f"sigma_rgb, sigma_xy and scale must be > 0, got {sigma_rgb}, {sigma_xy}, {scale}")
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    with torch.autocast(device_type=seg_logits.device.type, enabled=False):
        rgb, probs, roi = downscale_inputs(images, seg_logits, valid_mask, scale)
        return _DenseEnergy.apply(probs, rgb, roi, float(sigma_rgb), float(sigma_xy * scale), int(radius))


__all__ = ["dense_energy_loss", "downscale_inputs", "filter_pairs", "half_window_offsets", "reduced_size"]
