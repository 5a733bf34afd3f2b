"""Visual inspection of a trained AFA model: one PNG panel per image and an HTML index.

A panel shows, for one image, every stage of the method (Ru et al., CVPR 2022):

    row 1   input (affinity query points marked) | PAR pseudo label (high/low) |
            random-walk (AFA) label | segmentation prediction | ground truth
    row 2   the CAM of each shown class, as a heat map blended on the image
    row 3   the predicted affinity of a few query pixels (the most confident pixel of
            each shown class and one background pixel): the affinity-matrix row at
            that token, upsampled, blended on the image
    legend  VOC-palette colours of the classes in the label maps

The shown classes are the image's labels when the image comes from a split with
masks, otherwise the classes the classifier predicts (sigmoid > 0.5, at least the top one).

Library pieces, usable one by one from a notebook::

    maps = compute_maps(network, image_uint8, cfg, class_names, gt=mask)   # ImageMaps of numpy arrays
    panel = render_panel(maps, title="val_0003")                           # PIL.Image
    index = visualize("work_dirs/demo/checkpoints/last.pth", "viz", split="val", limit=8)

Rendering is numpy + PIL only: label maps are coloured by palette indexing, heat maps
through the small colour look-up table :data:`HEAT_LUT`.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from tqdm import tqdm

from wsss.config import Config
from wsss.data.io import IGNORE_VALUE, VOC_PALETTE
from wsss.data.transforms import EvalTransform, denormalize
from wsss.engine.colors import colorize_label, heat_overlay
from wsss.engine.inference import predict_seg
from wsss.engine.metrics import ConfusionMatrix
from wsss.engine.runtime import autocast, network_method, pseudo_label_params
from wsss.errors import WsssError
from wsss.method.ops import resize
from wsss.method.pseudo_labels import cam_maps, pseudo_labels
from wsss.models.network import AFANetwork

POINT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255), (255, 0, 255), (0, 255, 0), (255, 128, 0), (0, 255, 255), (255, 255, 0),
)

# --------------------------------------------------------------------------- layout

TILE_SIZE = 160  # side of one square tile in pixels; maps are letterboxed into it
GAP = 6  # pixels between tiles and around the panel
TILE_TITLE_HEIGHT = 16
HEADER_HEIGHT = 24
LEGEND_ROW_HEIGHT = 18
COLUMNS = 5  # tiles per row; row 1 always has five
BACKGROUND = (40, 40, 40)
TEXT = (235, 235, 235)
EMPTY_TILE = (70, 70, 70)


def mark_points(
    image: np.ndarray, points: Sequence[tuple[int, int]], colours: Sequence[tuple[int, int, int]] | None = None
) -> np.ndarray:
    """uint8 [H, W, 3] with a ringed cross at each (y, x) point -> a new uint8 [H, W, 3]."""
    img = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(img)
    radius = max(3, round(max(image.shape[:2]) / 40))
    for i, (y, x) in enumerate(points):
        colour = (colours or POINT_COLOURS)[i % len(colours or POINT_COLOURS)]
        box = (x - radius, y - radius, x + radius, y + radius)
        draw.ellipse(box, outline=(0, 0, 0), width=3)
        draw.ellipse(box, outline=colour, width=1)
        draw.line((x - radius, y, x + radius, y), fill=colour, width=1)
        draw.line((x, y - radius, x, y + radius), fill=colour, width=1)
    return np.asarray(img)


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis so that it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def letterbox(image: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: scaled to fit (aspect kept), centred on EMPTY_TILE."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    scaled = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((nw, nh), resample))
    tile = np.empty((size, size, 3), dtype=np.uint8)
    tile[:] = EMPTY_TILE
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    tile[y0:y0 + nh, x0:x0 + nw] = scaled
    return tile


@dataclass
class Tile:
    """One titled picture of a panel: ``picture`` uint8 [H, W, 3] or None for a "n/a" tile."""

    title: str
    picture: np.ndarray | None
    nearest: bool = False  # resize with nearest neighbour (label maps) instead of bilinear


def render_tiles(
    rows: Sequence[Sequence[Tile]],
    title: str = "",
    legend: Sequence[tuple[str, tuple[int, int, int]]] = (),
    tile_size: int = TILE_SIZE,
    columns: int = COLUMNS,
) -> Image.Image:
    """Rows of tiles (each row wrapped at ``columns``) under a title, above a colour legend -> RGB image.

    Width = columns * (tile_size + GAP) + GAP; the height grows with the rows and the legend.
    """
    font = _font(11)
    title_font = _font(14)
    grid: list[list[Tile]] = []
    for row in rows:
        grid.extend(list(row[i:i + columns]) for i in range(0, len(row), columns))
    width = columns * (tile_size + GAP) + GAP
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_lines = _legend_lines(measure, legend, font, width - 2 * GAP)
    cell_height = TILE_TITLE_HEIGHT + tile_size + GAP
    height = HEADER_HEIGHT + len(grid) * cell_height + len(legend_lines) * LEGEND_ROW_HEIGHT + GAP
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 4), _fit_text(draw, title, title_font, width - 2 * GAP), fill=TEXT, font=title_font)
    for r, row in enumerate(grid):
        top = HEADER_HEIGHT + r * cell_height
        for c, tile in enumerate(row):
            left = GAP + c * (tile_size + GAP)
            draw.text((left, top + 1), _fit_text(draw, tile.title, font, tile_size), fill=TEXT, font=font)
            y = top + TILE_TITLE_HEIGHT
            if tile.picture is None:
                draw.rectangle((left, y, left + tile_size - 1, y + tile_size - 1), fill=EMPTY_TILE)
                draw.text((left + tile_size // 2, y + tile_size // 2), "n/a", fill=TEXT, font=title_font, anchor="mm")
            else:
                canvas.paste(Image.fromarray(letterbox(tile.picture, tile_size, tile.nearest)), (left, y))
    top = HEADER_HEIGHT + len(grid) * cell_height
    for line in legend_lines:
        x = GAP
        for name, colour, text_width in line:
            draw.rectangle((x, top + 3, x + 11, top + 14), fill=tuple(int(v) for v in colour), outline=TEXT)
            draw.text((x + 15, top + 2), name, fill=TEXT, font=font)
            x += 15 + text_width + 12
        top += LEGEND_ROW_HEIGHT
    return canvas


def _legend_lines(draw, legend, font, width: int) -> list[list[tuple[str, tuple[int, int, int], int]]]:
    """Legend entries flowed into lines of at most ``width`` pixels."""
    lines: list[list[tuple[str, tuple[int, int, int], int]]] = []
    x = width + 1
    for name, colour in legend:
        text_width = int(np.ceil(draw.textlength(name, font=font)))
        entry = 15 + text_width + 12
        if x + entry > width and (not lines or lines[-1]):
            lines.append([])
            x = 0
        lines[-1].append((name, colour, text_width))
        x += entry
    return lines


# --------------------------------------------------------------------------- maps of one image


@dataclass
class ImageMaps:
    """Everything a panel shows for one image, all at the image's size (H, W).

    ``classes`` are the shown foreground classes (1..K, C-indexing, 0 = background);
    ``cams[i]`` is the CAM of ``classes[i]``. ``points`` are the affinity query pixels
    (y, x), ``point_classes`` their class (0 = the background point), ``affinity[i]`` the
    predicted affinity of every pixel to ``points[i]``. Label maps are uint8 with 255 =
    ignore; ``gt`` is None without ground truth. ``class_names`` has C names.
    """

    image: np.ndarray  # uint8 [H, W, 3]
    class_names: list[str]
    classes: list[int]  # shown foreground classes
    classes_from: str  # "labels" (image labels of the split) or "prediction" (classifier)
    cams: np.ndarray  # float32 [len(classes), H, W] in [0, 1]
    par_label: np.ndarray  # uint8 [H, W], CAM -> PAR -> high/low pseudo label
    rw_label: np.ndarray | None  # uint8 [H, W], CAM -> random walk -> PAR -> high/low (None: no affinity)
    seg_label: np.ndarray  # uint8 [H, W], argmax of the segmentation head
    points: list[tuple[int, int]] = field(default_factory=list)
    point_classes: list[int] = field(default_factory=list)
    affinity: np.ndarray | None = None  # float32 [len(points), H, W] in [0, 1]
    gt: np.ndarray | None = None  # uint8 [H, W]
    iou: float | None = None  # per-image mIoU of seg_label against gt


def image_miou(pred: np.ndarray, gt: np.ndarray | None, num_classes: int, ignore_index: int = 255) -> float | None:
    """Mean IoU in [0, 1] of one image: int [H, W] prediction vs ground truth, over the classes present
    in either, with the conventions of :class:`wsss.engine.metrics.ConfusionMatrix` (ignored
    ground-truth pixels not counted). None without ground truth or without a counted pixel."""
    if gt is None:
        return None
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index, device="cpu")
    matrix.update(np.asarray(pred).astype(np.int64), np.asarray(gt).astype(np.int64))
    result = matrix.compute()
    if result["num_pixels"] == 0:
        return None
    return result["miou"] / 100.0


def panel_tiles(maps: ImageMaps) -> list[list[Tile]]:
    """The three rows of a panel (module docstring) as tiles."""
    names = maps.class_names
    image = maps.image
    marked = mark_points(image, maps.points) if maps.points else image
    gt_tile = Tile("ground truth", None if maps.gt is None else colorize_label(maps.gt), nearest=True)
    rw = None if maps.rw_label is None else colorize_label(maps.rw_label)
    first = [
        Tile("input" + (" + query points" if maps.points else ""), marked),
        Tile("PAR pseudo label (high/low)", colorize_label(maps.par_label), nearest=True),
        Tile("random-walk label", rw, nearest=True),
        Tile("seg prediction", colorize_label(maps.seg_label), nearest=True),
        gt_tile,
    ]
    source = "" if maps.classes_from == "labels" else " (predicted)"
    cams = [Tile(f"CAM {names[c]}{source}", heat_overlay(image, maps.cams[i])) for i, c in enumerate(maps.classes)]
    affinity = []
    if maps.affinity is not None:
        for i, ((y, x), c) in enumerate(zip(maps.points, maps.point_classes)):
            colour = POINT_COLOURS[i % len(POINT_COLOURS)]
            picture = mark_points(heat_overlay(image, maps.affinity[i]), [(y, x)], [colour])
            affinity.append(Tile(f"affinity to {names[c]} @{y},{x}", picture))
    return [row for row in (first, cams, affinity) if row]


def legend_entries(maps: ImageMaps) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of every class in the shown label maps (and the shown classes), then "ignore"."""
    labels = [m for m in (maps.par_label, maps.rw_label, maps.seg_label, maps.gt) if m is not None]
    present = set(int(v) for m in labels for v in np.unique(m))
    present.update(maps.classes)
    present.add(0)
    entries = [(maps.class_names[c], tuple(int(v) for v in VOC_PALETTE[c]))
               for c in sorted(present) if c < len(maps.class_names)]
    entries.append(("ignore", tuple(int(v) for v in VOC_PALETTE[IGNORE_VALUE])))
    return entries


def render_panel(maps: ImageMaps, title: str = "", tile_size: int = TILE_SIZE) -> Image.Image:
    """The full panel of one image (module docstring) -> RGB PIL image, ``COLUMNS`` tiles wide."""
    if not title:
        iou = "n/a" if maps.iou is None else f"{100 * maps.iou:.1f}"
        title = f"image mIoU {iou}"
    return render_tiles(panel_tiles(maps), title=title, legend=legend_entries(maps), tile_size=tile_size)


# --------------------------------------------------------------------------- computing the maps


def predicted_classes(cls_logits: Tensor, threshold: float = 0.5) -> Tensor:
    """cls_logits [K] -> multi-hot float [K]: sigmoid > threshold, and at least the top class."""
    labels = (cls_logits.sigmoid() > threshold).float()
    # scatter at the argmax tensor, not labels[argmax]: indexing with a tensor reads it on the host (a CUDA sync)
    return labels.scatter_(0, cls_logits.argmax(dim=0, keepdim=True), 1.0)


def _to_size(x: Tensor, size: Sequence[int], nearest: bool = False) -> Tensor:
    """[B, M, h, w] -> float [B, M, *size] (bilinear, or nearest-exact for label maps)."""
    if nearest and tuple(x.shape[-2:]) != tuple(size):
        return F.interpolate(x.float(), size=tuple(size), mode="nearest-exact")
    return resize(x.float(), size)


def _label_numpy(label: Tensor, size: Sequence[int]) -> np.ndarray:
    """long [1, h, w] -> uint8 [H, W] at ``size`` (nearest)."""
    return _to_size(label[:, None], size, nearest=True)[0, 0].to(torch.uint8).cpu().numpy()


@torch.no_grad()
def compute_maps(
    network: AFANetwork,
    image: np.ndarray,
    cfg: Config,
    class_names: Sequence[str],
    labels: np.ndarray | Tensor | None = None,
    gt: np.ndarray | None = None,
) -> ImageMaps:
    """Run every stage of the method on one image -> :class:`ImageMaps` at the image's size.

    image uint8 [H, W, 3]; labels float [K] multi-hot image labels, or None to use the
    classes the classifier predicts (sigmoid > 0.5, at least the top one); gt uint8 [H, W]
    or None. The image is resized so that its long side is ``cfg.eval.long_side``;
    CAMs are multi-scale (``cfg.cam.scales``, flip) as for the training pseudo labels,
    the affinity comes from the ``cfg.afa.affinity_scale`` pass; the PAR and random-walk
    labels use the training rule (high/low background thresholds, ignore in between); the
    segmentation is the single-scale argmax of ``predict_seg`` (the validation protocol).
    Uses only ``network.forward`` / ``network.cam_forward``; the network's train/eval
    mode is restored afterwards.
    """
    was_training = network.training
    network.eval()
    try:
        return _compute_maps(network, image, cfg, class_names, labels, gt)
    finally:
        network.train(was_training)


def _compute_maps(
    network: AFANetwork,
    image: np.ndarray,
    cfg: Config,
    class_names: Sequence[str],
    labels: np.ndarray | Tensor | None,
    gt: np.ndarray | None,
) -> ImageMaps:
    device = next(network.parameters()).device
    size = image.shape[:2]
    x = EvalTransform.from_config(cfg.data, cfg.eval.long_side)(image)[None].to(device)
    images01 = denormalize(x, cfg.data.mean, cfg.data.std)
    with autocast(device, cfg.train.precision):
        if labels is None:
            cls_logits = network(x, with_seg=False, with_affinity=False).cls_logits
            label_t, classes_from = predicted_classes(cls_logits[0].float())[None], "prediction"
        else:
            label_t, classes_from = torch.as_tensor(labels, dtype=torch.float32, device=device).view(1, -1), "labels"
        classes = [int(k) + 1 for k in torch.nonzero(label_t[0] > 0).flatten().tolist()]
        # the maps are display maps in the label-file convention (255 = ignore)
        params = dataclasses.replace(pseudo_label_params(cfg), ignore_index=IGNORE_VALUE)
        afa = network_method(network) == "afa"  # a ToCo network has no affinity: no random-walk tile
        maps = cam_maps(network.cam_forward, x, label_t, params, cfg.afa.affinity_scale if afa else None)
        seg = predict_seg(network, x, [1.0], flip=False, out_size=size).max(dim=0).indices
    cams = maps.cams
    labels_out = pseudo_labels(images01, maps, params, with_afa=bool(classes))
    par_label, rw_label = labels_out.label, labels_out.afa_label

    points: list[tuple[int, int]] = []
    point_classes: list[int] = []
    affinity_maps = None
    if maps.affinity is not None and classes:
        h, w = maps.grid
        # query tokens: the most confident token of each shown class, and the token where
        # the strongest shown CAM is weakest (the most confident background)
        cams_grid = _to_size(cams, (h, w))[0, [c - 1 for c in classes]].flatten(1)  # [S, N]
        tokens = [*cams_grid.argmax(dim=1).tolist(), int(cams_grid.amax(dim=0).argmin())]
        point_classes = [*classes, 0]
        rows = maps.affinity[0, tokens].float().view(len(tokens), 1, h, w)
        affinity_maps = _to_size(rows, size)[:, 0].clamp(0, 1).cpu().numpy()
        points = [(min(size[0] - 1, int((t // w + 0.5) * size[0] / h)),
                   min(size[1] - 1, int((t % w + 0.5) * size[1] / w))) for t in tokens]

    seg_label = seg.to(torch.uint8).cpu().numpy()
    num_classes = len(class_names)
    return ImageMaps(
        image=image,
        class_names=list(class_names),
        classes=classes,
        classes_from=classes_from,
        cams=_to_size(cams, size)[0, [c - 1 for c in classes]].cpu().numpy().astype(np.float32),
        par_label=_label_numpy(par_label, size),
        rw_label=None if rw_label is None else _label_numpy(rw_label, size),
        seg_label=seg_label,
        points=points,
        point_classes=point_classes,
        affinity=affinity_maps,
        gt=gt,
        iou=image_miou(seg_label, gt, num_classes, IGNORE_VALUE),
    )


# --------------------------------------------------------------------------- HTML index


@dataclass
class IndexEntry:
    """One row of the HTML index."""

    name: str
    panel: str  # file name of the panel, relative to the index
    iou: float | None
    classes: list[str]
    classes_from: str = "labels"


INDEX_TEMPLATE = "viz_index.html"  # package resource in wsss/engine/templates/, str.format fields: title, summary, rows


def _index_template() -> str:
    from importlib import resources

    return resources.files("wsss.engine").joinpath("templates", INDEX_TEMPLATE).read_text(encoding="utf-8")



def sort_entries(entries: Sequence[IndexEntry]) -> list[IndexEntry]:
    """Worst first: ascending per-image mIoU, entries without one (no ground truth) last, then by name."""
    return sorted(entries, key=lambda e: (e.iou is None, e.iou if e.iou is not None else 0.0, e.name))


def write_index(out_dir: str | Path, entries: Sequence[IndexEntry], title: str = "wsss viz", summary: str = "") -> Path:
    """Write ``out_dir/index.html``: a sortable table of the panels (relative links), worst first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ious = [e.iou for e in entries if e.iou is not None]
    if not summary:
        mean = f"{100 * float(np.mean(ious)):.1f}" if ious else "n/a"
        summary = f"{len(entries)} images; mean of the per-image mIoU: {mean} ({len(ious)} with ground truth)"
    rows = []
    for position, entry in enumerate(sort_entries(entries), start=1):
        href = html.escape(entry.panel, quote=True)
        iou_text = "n/a" if entry.iou is None else f"{100 * entry.iou:.1f}"
        iou_key = "" if entry.iou is None else f"{entry.iou:.6f}"
        classes = ", ".join(entry.classes) + (" (predicted)" if entry.classes_from == "prediction" else "")
        rows.append(
            f'<tr id="{href}"><td class="num" data-sort="{position}">{position}</td>'
            f'<td data-sort="{html.escape(entry.name, quote=True)}"><a href="{href}">{html.escape(entry.name)}</a></td>'
            f'<td class="num" data-sort="{iou_key}">{iou_text}</td>'
            f'<td data-sort="{html.escape(classes, quote=True)}">{html.escape(classes)}</td>'
            f'<td><a href="{href}"><img class="thumb" src="{href}" alt="{html.escape(entry.name, quote=True)}" '
            f'loading="lazy"></a></td></tr>'
        )
    page = _index_template().format(title=html.escape(title), summary=html.escape(summary), rows="\n".join(rows))
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    (out_dir / "index.json").write_text(
        json.dumps([asdict(e) for e in sort_entries(entries)], indent=1),
        encoding="utf-8",
    )
    return path


# --------------------------------------------------------------------------- driver (``wsss viz``)


def _file_stem(name: str, taken: set[str]) -> str:
    """A file-system-safe, unique panel file stem for an image name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"
    unique, n = stem, 1
    while unique in taken:
        n += 1
        unique = f"{stem}_{n}"
    taken.add(unique)
    return unique


def panel_title(name: str, maps: ImageMaps) -> str:
    iou = "n/a" if maps.iou is None else f"{100 * maps.iou:.1f}"
    shown = ", ".join(maps.class_names[c] for c in maps.classes) or "none"
    source = "image labels" if maps.classes_from == "labels" else "predicted"
    return f"{name}   image mIoU {iou}   classes ({source}): {shown}"


def visualize(
    checkpoint: str | Path,
    out_dir: str | Path,
    split: str | None = None,
    images: Sequence[str | Path] = (),
    limit: int = 16,
    data_root: str | Path | None = None,
    overrides: Sequence[str] = (),
    tile_size: int = TILE_SIZE,
) -> Path:
    """Panels of a checkpoint's predictions and an HTML index -> ``out_dir/index.html``.

    Either ``split`` (the first ``limit`` images of that split of ``data.root``, or of
    ``data_root``; 0 = all; image labels and ground truth from the split's masks) or
    ``images`` (image files; the classifier's predicted classes, no ground truth).
    Writes ``out_dir/<image name>.png`` per image, ``index.html`` (worst per-image mIoU
    first, sortable) and ``index.json`` (the same rows). ``overrides`` change the
    checkpoint's config (e.g. ``cam.scales=[1.0]``, ``train.device=cpu``).
    """
    from wsss.data.datasets import build_dataset
    from wsss.data.io import read_image
    from wsss.engine.checkpoint import load_network
    from wsss.engine.distributed import resolve_device
    from wsss.engine.runner import run_over_split

    images = [Path(p) for p in images]
    if (split is None) == (not images):
        raise WsssError("give either a split or one or more image files to visualize, not both")
    network, cfg, meta = load_network(checkpoint, "cpu", list(overrides))
    if data_root is not None:
        cfg.data.root = str(data_root)
    device = resolve_device(cfg.train.device)
    network.to(device).eval()
    class_names = list(meta["class_names"]) or [f"class {c}" for c in range(meta["num_classes"])]

    if split is not None:
        dataset = build_dataset(cfg.data, split, train=False)
        if dataset.num_classes != network.num_classes:
            raise WsssError(
                f"split '{split}' of '{dataset.root}' has {dataset.num_classes} classes but the checkpoint "
                f"'{checkpoint}' was trained for {network.num_classes}")
        class_names = dataset.class_names
        count = len(dataset) if limit <= 0 else min(limit, len(dataset))

        def maps_of(item: dict) -> ImageMaps:
            labels, gt = (item["label"], item["mask"].numpy()) if dataset.has_masks else (None, None)
            return compute_maps(network, np.asarray(item["raw"]), cfg, class_names, labels=labels, gt=gt)

        outputs = run_over_split(dataset, range(count), maps_of, device, cfg.train.precision,
                                 num_workers=cfg.data.num_workers, raw_image=True)
        named = ((item["name"], maps) for item, maps in outputs)
    else:
        for path in images:
            read_image(path)  # a missing or unreadable file fails now, before any work
        count = len(images)
        named = ((path.stem, compute_maps(network, read_image(path), cfg, class_names)) for path in images)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    entries = []
    for name, maps in tqdm(named, total=count, desc="viz", unit="img"):
        panel = f"{_file_stem(name, taken)}.png"
        render_panel(maps, panel_title(name, maps), tile_size).save(out_dir / panel)
        entries.append(IndexEntry(name, panel, maps.iou, [class_names[c] for c in maps.classes], maps.classes_from))
    source = f"split '{split}' of {cfg.data.root}" if split is not None else f"{len(images)} image files"
    title = f"wsss viz: {Path(checkpoint).name} (iteration {meta['iteration']}), {source}"
    return write_index(out_dir, entries, title=title)
