"""Token contrast (ToCo, Ru et al., CVPR 2023): the patch-token and class-token contrast losses and the
uncertain-region mask that places its local crops.

- ``token_label`` + ``token_pair_labels`` + ``patch_token_contrast_loss`` (PTC): pairs of the last block's patch
  tokens labelled by the pseudo label of the auxiliary CAM (an intermediate block's, less over-smoothed) on the
  token grid (1 same class, 0 different, ignore where either token is ignored and on the diagonal; every pair
  of the grid, no window), loss on the absolute cosine similarity:
  0.5 (1 - sum_{Y=1} |cos| / (n_pos + 1)) + 0.5 sum_{Y=0} |cos| / (n_neg + 1), counts over the batch.
- ``uncertain_region_mask``: the auxiliary CAM's max over the image's classes, 0 at or below ``low``, 2 at or
  above ``high``, 1 between (the uncertain region the local crops are drawn from).
- ``sample_crop_corners`` + ``local_crops``: the local crops, each centred on a token of the uncertain or
  background region (any position where an image has fewer such than crops), flagged negative where the
  crop's mean region value (0 / 1 / 2) is <= 0.2, i.e. mostly certain background.
- ``class_token_contrast_loss`` (CTC): the projected class tokens of the 2 global views (teacher) against
  those of all crops (student), an InfoNCE in which every crop flagged positive is a positive and the
  crops flagged negative (mostly certain region) the negatives.

These are the official code's formulas (``model/losses.py``, ``utils/camutils.py`` of rulixiang/ToCo), written
for the batch at once; CTC is evaluated in log space (same value, no overflow of exp(logit / temp)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.method.affinity import affinity_labels
from wsss.method.cam import box_mask


def token_label(cams: Tensor, labels: Tensor, high: float, low: float, valid_box: Tensor | None, image_size: tuple,
                ignore_index: int = 255, box_mode: str = "official", bg: float = 0.0) -> Tensor:
    """cams [B, K, h, w] in [0, 1] (the auxiliary CAMs resized to the token grid), labels [B, K], valid_box long
    [B, 4] in pixels of the ``image_size`` crop -> long [B, h, w]: class k + 1 where the largest present CAM is
    above ``high`` and ``bg``, 0 where it is at or below ``low`` (or above ``high`` but not ``bg``: the official
    ``cam_to_label`` applies its background score first, so ``bg`` counts only when above ``high``), ignore
    between ``low`` and ``high`` and outside the box.

    ``box_mode`` "official": the pixel box slices the token grid as in the official ``cam_to_label`` (a token
    row r is inside when y0 <= r < y1 in pixels); "grid": a token is inside when its centre pixel is.
    """
    value, index = (cams * labels[:, :, None, None].to(cams.dtype)).max(dim=1)
    label = torch.where(value > high, index + 1, torch.full_like(index, ignore_index))
    label = label.masked_fill((value <= low) | ((value > high) & (value <= bg)), 0)
    if valid_box is None:
        return label
    h, w = label.shape[-2:]
    if box_mode == "official":
        inside = box_mask(valid_box, (h, w))
    elif box_mode == "grid":
        ys = ((torch.arange(h, device=label.device) + 0.5) * image_size[0] / h).long()
        xs = ((torch.arange(w, device=label.device) + 0.5) * image_size[1] / w).long()
        inside = box_mask(valid_box, image_size)[:, ys][:, :, xs]
    else:
        raise ValueError(f"box_mode must be 'official' or 'grid', got {box_mode!r}")
    return label.masked_fill(~inside, ignore_index)


def token_pair_labels(label_grid: Tensor, ignore_index: int = 255) -> Tensor:
    """label_grid long [B, h, w] -> pair labels long [B, N, N]: 1 same label, 0 different, ignore_index where
    l_i or l_j is ignored and on the diagonal (a token is not its own pair)."""
    b, h, w = label_grid.shape
    labels = affinity_labels(label_grid, radius=max(h, w), ignore_index=ignore_index)
    labels.diagonal(dim1=1, dim2=2).fill_(ignore_index)
    return labels


def patch_token_contrast_loss(tokens: Tensor, pair_labels: Tensor) -> Tensor:
    """tokens [B, C, h, w], pair_labels [B, N, N] (``token_pair_labels``) -> scalar PTC loss."""
    b, c, h, w = tokens.shape
    x = F.normalize(tokens.float().reshape(b, c, h * w), p=2, dim=1, eps=1e-8)
    similarity = torch.bmm(x.transpose(1, 2), x).abs()
    positive = pair_labels == 1
    negative = pair_labels == 0
    pos_term = 1 - (similarity * positive).sum() / (positive.sum() + 1)
    neg_term = (similarity * negative).sum() / (negative.sum() + 1)
    return 0.5 * pos_term + 0.5 * neg_term


def uncertain_region_mask(cams: Tensor, labels: Tensor, high: float, low: float) -> Tensor:
    """cams [B, K, H, W] (foreground classes), labels multi-hot [B, K] -> int16 [B, H, W]: 0 where the max CAM
    of the image's classes is <= low, 2 where it is >= high, 1 between."""
    value = (cams * labels[:, :, None, None].to(cams.dtype)).amax(dim=1)
    mask = torch.ones_like(value, dtype=torch.int16)
    mask = mask.masked_fill(value <= low, 0)
    return mask.masked_fill(value >= high, 2)


def sample_crop_corners(region: Tensor, num_crops: int, size: int, generator: torch.Generator | None = None) -> Tensor:
    """region int [B, H, W] (``uncertain_region_mask``) -> long [B, num_crops, 2]: (y, x) of the top-left corner
    of each local crop of ``size``, drawn without replacement among the corners whose crop centre (y + size // 2,
    x + size // 2) has region <= 1; among all corners where an image has fewer than ``num_crops`` of those."""
    b, h, w = region.shape
    margin = size // 2
    rows, cols = h - 2 * margin, w - 2 * margin
    if rows <= 0 or cols <= 0 or rows * cols < num_crops:
        raise ValueError(f"{num_crops} local crops of {size} pixels do not fit an image of {h} x {w}")
    candidate = (region[:, margin : h - margin, margin : w - margin] <= 1).reshape(b, -1)
    candidate |= (candidate.sum(dim=1, keepdim=True) < num_crops)
    scores = torch.rand(candidate.shape, generator=generator, device=region.device)
    chosen = scores.masked_fill(~candidate, -1.0).topk(num_crops, dim=1).indices  # a uniform random subset
    return torch.stack([chosen // cols, chosen % cols], dim=-1)


def local_crops(images: Tensor, region: Tensor, corners: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """images [B, C, H, W], region [B, H, W], corners [B, n, 2] (``sample_crop_corners``) -> crops
    [n, B, C, size, size] (crop-major, as the CTC loss orders the student's crops) and flags [B, n + 2] float:
    1 for the two global views and the positive crops, 0 for a crop whose region values sum to <= 0.2 x its area."""
    b, n = corners.shape[:2]
    offset = torch.arange(size, device=images.device)
    ys = (corners[..., 0, None] + offset)[:, :, :, None]  # [B, n, size, 1]
    xs = (corners[..., 1, None] + offset)[:, :, None, :]  # [B, n, 1, size]
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    crops = images.permute(0, 2, 3, 1)[batch, ys, xs]  # [B, n, size, size, C]
    share = region[batch, ys, xs].float().sum(dim=(2, 3)) / (size * size)
    flags = torch.cat([torch.ones(b, 2, device=images.device), (share > 0.2).float()], dim=1)
    return crops.permute(1, 0, 4, 2, 3), flags


def class_token_contrast_loss(student: Tensor, teacher: Tensor, flags: Tensor, temperature: float) -> Tensor:
    """student [n_crops * B, D] (crop-major: all images' crop 0, then crop 1, ...; crops 0 and 1 the global
    views), teacher [2 * B, D] (the global views), flags [B, n_crops] (1 positive, 0 negative) -> scalar.

    With a_tj = <teacher_t, student_j> / temperature and S_t = sum over negative crops of exp(a_tj) + 1e-4, an
    image's loss is [sum_t sum_{positive j} -log(exp(a_tj) / (exp(a_tj) + S_t)) + sum_t log(1 + S_t)]
    / 2 / (n_positive + 1e-4); the batch mean of that.
    """
    b = flags.shape[0]
    n_crops = flags.shape[1]
    s = student.float().reshape(n_crops, b, -1).transpose(0, 1)  # [B, n_crops, D]
    t = teacher.float().reshape(2, b, -1).transpose(0, 1)  # [B, 2, D]
    logits = torch.bmm(t, s.transpose(1, 2)) / temperature  # [B, 2, n_crops]
    positive = (flags != 0)[:, None, :]
    eps = torch.full_like(logits[..., :1], 1e-4).log()
    log_s = torch.cat([logits.masked_fill(positive, float("-inf")), eps], dim=-1).logsumexp(dim=-1, keepdim=True)
    pos_terms = (torch.logaddexp(logits, log_s) - logits).masked_fill(~positive, 0).sum(dim=(1, 2))
    extra = F.softplus(log_s).sum(dim=(1, 2))  # log(1 + S_t)
    n_positive = positive.sum(dim=(1, 2)).to(logits.dtype)
    return ((pos_terms + extra) / 2 / (n_positive + 1e-4)).mean()


__all__ = [
    "class_token_contrast_loss",
    "local_crops",
    "patch_token_contrast_loss",
    "sample_crop_corners",
    "token_label",
    "token_pair_labels",
    "uncertain_region_mask",
]
