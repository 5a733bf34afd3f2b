"""A second synthetic dataset, independent of the digits demo: geometric shapes on other photos.

It shares no material with :mod:`wsss.data.demo`: the classes are shape families drawn as
polygons with random geometry (triangle, quad, hexagon, star, ring, cross, ellipse, crescent,
arrow, blob), the backgrounds are crops of other photos shipped with scikit-image
(Hubble deep field, immunohistochemistry, retina, the stereo motorcycle pair) or smooth
random colour fields, and the fills are random saturated colours, grey photos of scikit-image
(camera, moon, coins, clock, page, text, cell) tinted by a random colour, or colour patches cut
from the background photos. Colour never tells the class: only the outline does.

Geometry per object: a class outline in unit coordinates (its own random parameters: vertex
jitter, star points and depth, ring width, arm width, crescent bite, lobes), then a random
aspect ratio, rotation and size (``object_size``: long side as a fraction of the image side),
rasterised at 4x and averaged (anti-aliased edges; the mask is where the coverage is >= 1/2).
With ``occlusion`` > 0 an object may overlap earlier ones and hides them where it lies; an
object left with less than ``MIN_VISIBLE`` of its area visible is not placed.

``val_novel_fraction`` of the val images draw every object from geometry that never occurs in
train (more extreme aspect ratios, other vertex counts, thinner rings and arms, other bites and
lobes): a test of generalisation over the outline, recorded per object (``novel``) in meta.json.

Output, the custom VOC layout read by ``data.dataset=custom`` (as the digits demo)::

    out_dir/JPEGImages/{train,val}_NNNN.jpg, SegmentationClass/{train,val}_NNNN.png
    out_dir/ImageSets/Segmentation/{train,val}.txt, classes.txt, meta.json

NumPy, Pillow and SciPy are imported on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsss.data.demo import check_counts
from wsss.errors import WsssError
from wsss.files import atomic_dir

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

SHAPE_NAMES: tuple[str, ...] = (
    "ring", "cross", "star", "triangle", "quad", "crescent", "arrow", "ellipse", "hexagon", "blob")
FILLS = ("flat", "texture", "photo")
BACKGROUNDS = ("photo", "noise", "mixed")
CLASS_CUES = ("outline", "fill")
SUPERSAMPLE = 4  # rasterisation factor: edges are anti-aliased, the mask is coverage >= 1/2
MIN_VISIBLE = 0.5  # an occluded object keeps at least this share of its area visible
PLACEMENT_TRIES = 50
JPEG_QUALITY = 95
_META = "meta.json"


@dataclasses.dataclass(frozen=True)
class ShapesOptions:
    """What ``build_shapes_dataset`` builds; the one place for the defaults (``wsss data shapes`` shows them).

    seed: the same seed (and options) gives the same files.
    num_classes: classes K (1..10): the first K of ``SHAPE_NAMES`` ("outline"), or K hues ("fill").
    image_size, num_train, num_val: image side in pixels, images per split.
    object_size: (low, high) long side of an object as a fraction of the image side.
    objects_per_image: (low, high) objects per image (fewer when no spot is found).
    fills: the fill kinds an object draws from, uniformly ("flat", "texture", "photo").
    background: "photo" crops, "noise" (smooth random colour fields) or "mixed" (half each).
    occlusion: probability that an object may overlap (and hide part of) the earlier ones.
    val_novel_fraction: share of the val images whose objects use geometry never seen in train.
    class_cue: "outline" (the shape family tells the class) or "fill" (the hue of the fill does).
    """

    seed: int = 0
    num_classes: int = 8
    image_size: int = 128
    num_train: int = 500
    num_val: int = 150
    object_size: tuple[float, float] = (0.15, 0.6)
    objects_per_image: tuple[int, int] = (1, 3)
    fills: tuple[str, ...] = ("flat", "texture", "photo")
    background: str = "mixed"
    occlusion: float = 0.2
    val_novel_fraction: float = 1 / 3
    class_cue: str = "outline"

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= len(SHAPE_NAMES):
            raise WsssError(f"num_classes must be between 1 and {len(SHAPE_NAMES)} (shapes), got {self.num_classes}")
        if self.image_size < 32:
            raise WsssError(f"image_size must be at least 32 pixels, got {self.image_size}")
        size, count = check_counts(self.num_train, self.num_val, self.object_size, self.objects_per_image)
        fills = tuple(str(f) for f in self.fills)
        if not fills or any(f not in FILLS for f in fills):
            raise WsssError(f"fills must be a non-empty list of {', '.join(FILLS)}, got {list(self.fills)}")
        if self.background not in BACKGROUNDS:
            raise WsssError(f"background must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        if self.class_cue not in CLASS_CUES:
            raise WsssError(f"class_cue must be one of {', '.join(CLASS_CUES)}, got {self.class_cue!r}")
        if not 0 <= self.occlusion <= 1 or not 0 <= self.val_novel_fraction <= 1:
            raise WsssError(f"occlusion and val_novel_fraction must be in [0, 1], got {self.occlusion} "
                            f"and {self.val_novel_fraction}")
        object.__setattr__(self, "object_size", size)
        object.__setattr__(self, "objects_per_image", count)
        object.__setattr__(self, "fills", fills)

    @property
    def class_names(self) -> tuple[str, ...]:
        """classes.txt's names: the shape families ("outline"), or hue_0 .. hue_K-1 in hue order ("fill")."""
        if self.class_cue == "fill":
            return tuple(f"hue_{k}" for k in range(self.num_classes))
        return SHAPE_NAMES[:self.num_classes]

    def record(self) -> dict[str, Any]:
        """The options as meta.json holds them (JSON types; a rebuild compares this)."""
        out = dataclasses.asdict(self)
        out.update(object_size=list(self.object_size), objects_per_image=list(self.objects_per_image),
                   fills=list(self.fills))
        return out


# The shapes family bench/quality.py trains on: the changes to the defaults.
SHAPES_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "texture": {"fills": ("texture", "photo")},
    "small": {"object_size": (0.1, 0.25)},
    "crowded": {"objects_per_image": (2, 5), "occlusion": 0.6},
    "classes10": {"num_classes": 10},
    "noise": {"background": "noise", "fills": ("flat",)},
    "fill": {"class_cue": "fill"},
}


def shapes_variant(name: str, **changes: Any) -> ShapesOptions:
    """The options of a variant of ``SHAPES_VARIANTS``, with ``changes`` (ShapesOptions fields) on top."""
    if name not in SHAPES_VARIANTS:
        raise WsssError(f"unknown shapes variant '{name}'; expected one of {', '.join(SHAPES_VARIANTS)}")
    return _options(None, {**SHAPES_VARIANTS[name], **changes})


def _options(options: ShapesOptions | None, changes: dict[str, Any]) -> ShapesOptions:
    names = [f.name for f in dataclasses.fields(ShapesOptions)]
    unknown = [k for k in changes if k not in names]
    if unknown:
        raise WsssError(f"unknown shapes dataset option '{unknown[0]}'; expected one of {', '.join(names)}")
    return dataclasses.replace(options or ShapesOptions(), **changes)


# --------------------------------------------------------------------------- material


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """Colour photos of scikit-image the digits demo does not use, uint8 [H, W, 3] each."""
    import numpy as np
    from skimage import data as skdata

    photos = []
    for name in ("hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle"):
        try:
            img = getattr(skdata, name)()
        except Exception:  # missing from this scikit-image version (or needs a download): skipped
            continue
        for part in (img[:2] if isinstance(img, tuple) else (img,)):
            photos.append(np.ascontiguousarray(np.asarray(part)[..., :3], dtype=np.uint8))
    if not photos:
        raise WsssError("no background photos found in scikit-image; reinstall scikit-image")
    return tuple(photos)


@functools.lru_cache(maxsize=1)
def _grey_photos() -> tuple[np.ndarray, ...]:
    """Grey photos of scikit-image for texture fills (none of the digits demo's), float32 [H, W] in [0, 1]."""
    import numpy as np
    from skimage import data as skdata

    out = []
    for name in ("camera", "moon", "coins", "clock", "page", "text", "cell"):
        try:
            out.append(np.asarray(getattr(skdata, name)(), dtype=np.float32) / 255.0)
        except Exception:
            continue
    if not out:
        raise WsssError("no texture photos found in scikit-image; reinstall scikit-image")
    return tuple(out)


def _crop(rng: np.random.Generator, img: np.ndarray, h: int, w: int) -> np.ndarray:
    """A random [h, w] crop of ``img`` at a random scale (the crop is resized when the image is smaller)."""
    import numpy as np
    from PIL import Image

    scale = rng.uniform(0.5, 1.0)
    ch, cw = max(1, min(img.shape[0], int(h / scale))), max(1, min(img.shape[1], int(w / scale)))
    y, x = rng.integers(0, img.shape[0] - ch + 1), rng.integers(0, img.shape[1] - cw + 1)
    patch = img[y:y + ch, x:x + cw]
    if patch.dtype != np.uint8:
        pil = Image.fromarray((patch * 255).astype(np.uint8))
        return np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return np.asarray(Image.fromarray(patch).resize((w, h), Image.Resampling.BILINEAR))


def _noise_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field -> float [size, size, 3] in 0..255 (a few octaves of upsampled noise)."""
    import numpy as np
    from PIL import Image

    out = np.zeros((size, size, 3), dtype=np.float32)
    for cells, weight in ((2, 1.0), (4, 0.6), (8, 0.35), (16, 0.2)):
        grid = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
        out += weight * np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    out /= 2.15
    return np.clip((out - out.mean()) * rng.uniform(1.0, 2.0) + rng.uniform(60, 200), 0, 255)


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """float [size, size, 3] in 0..255."""
    import numpy as np

    if kind == "noise" or (kind == "mixed" and rng.random() < 0.5):
        return _noise_field(rng, size)
    photos = _photos()
    return _crop(rng, photos[rng.integers(len(photos))], size, size).astype(np.float32)


def _random_colour(rng: np.random.Generator, hue: float | None = None) -> np.ndarray:
    """A saturated colour, float [3] in 0..255: of a random hue, or of ``hue`` (in [0, 1), wrapping)."""
    import colorsys

    import numpy as np

    h = rng.random() if hue is None else hue % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    return np.array([r, g, b], dtype=np.float32) * 255.0


def _class_hue(rng: np.random.Generator, c: int, num_classes: int) -> float:
    """Class ``c``'s hue under class_cue "fill": K evenly spaced hues, each object within a quarter of the gap."""
    return (c + 0.5 + rng.uniform(-0.25, 0.25)) / num_classes


def _fill(rng: np.random.Generator, h: int, w: int, kind: str, hue: float | None = None) -> np.ndarray:
    """Fill pixels for an object's box -> float [h, w, 3] in 0..255; ``hue``: the colour of the fill (class_cue
    "fill": flat in that hue, a texture tinted by it, a photo patch blended half with it), else random."""
    import numpy as np

    if kind == "flat":
        return np.broadcast_to(_random_colour(rng, hue), (h, w, 3))
    if kind == "texture":
        greys = _grey_photos()
        patch = _crop(rng, greys[rng.integers(len(greys))], h, w)
        return _random_colour(rng, hue) * (0.25 + 0.75 * patch[..., None])
    photos = _photos()
    patch = _crop(rng, photos[rng.integers(len(photos))], h, w).astype(np.float32)
    return patch if hue is None else 0.5 * patch + 0.5 * _random_colour(rng, hue)


# --------------------------------------------------------------------------- geometry


def _circle(n: int = 48, r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    import numpy as np

    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _regular(rng: np.random.Generator, n: int, angle_jitter: float, radius_jitter: float) -> np.ndarray:
    import numpy as np

    t = np.arange(n) * 2 * np.pi / n + rng.uniform(-angle_jitter, angle_jitter, n)
    r = 1.0 - rng.uniform(0, radius_jitter, n)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _outline(rng: np.random.Generator, name: str, novel: bool) -> list[tuple[np.ndarray, int]]:
    """The unit outline of class ``name`` -> [(polygon [P, 2] in about [-1, 1]^2, 1 = fill | 0 = cut)].

    ``novel``: the geometry range held out of train (module docstring)."""
    import numpy as np

    u = rng.uniform
    if name == "ring":
        inner = u(0.72, 0.8) if novel else u(0.42, 0.62)
        return [(_circle(), 1), (_circle(r=inner), 0)]
    if name == "cross":
        a = u(0.12, 0.17) if novel else u(0.22, 0.34)
        pts = [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a),
               (-a, 1)]
        return [(np.array(pts, dtype=np.float64), 1)]
    if name == "star":
        points = int(rng.integers(6, 8)) if novel else 5
        depth = u(0.5, 0.6) if novel else u(0.36, 0.48)
        t = np.arange(2 * points) * np.pi / points
        r = np.where(np.arange(2 * points) % 2 == 0, 1.0, depth)
        return [(np.stack([r * np.sin(t), -r * np.cos(t)], 1), 1)]
    if name == "triangle":
        return [(_regular(rng, 3, 0.5 if novel else 0.2, 0.0), 1)]
    if name == "quad":
        if novel:  # a parallelogram: strongly skewed
            s = u(0.5, 0.8) * rng.choice([-1, 1])
            return [(np.array([(-1 + s, -0.6), (1 + s, -0.6), (1 - s, 0.6), (-1 - s, 0.6)]) / 1.6, 1)]
        return [(_regular(rng, 4, 0.1, 0.0), 1)]
    if name == "crescent":
        bite = u(0.25, 0.35) if novel else u(0.45, 0.65)
        return [(_circle(), 1), (_circle(r=u(0.8, 0.95), cx=bite), 0)]
    if name == "arrow":
        shaft, head = (u(0.08, 0.13), u(0.6, 0.8)) if novel else (u(0.18, 0.28), u(0.4, 0.55))
        neck = 1 - 2 * head if not novel else 0.1
        pts = [(-1, shaft), (neck, shaft), (neck, 0.75), (1, 0), (neck, -0.75), (neck, -shaft), (-1, -shaft)]
        return [(np.array(pts, dtype=np.float64), 1)]
    if name == "ellipse":
        return [(_circle(), 1)]
    if name == "hexagon":
        n = int(rng.choice([7, 8])) if novel else 6
        return [(_regular(rng, n, 0.08, 0.05), 1)]
    if name == "blob":
        lobes = int(rng.integers(5, 7)) if novel else int(rng.integers(2, 4))
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        r = 0.72 + 0.28 * np.cos(lobes * t + u(0, 2 * np.pi)) * (u(0.6, 1.0) if novel else u(0.5, 0.9))
        return [(np.stack([r * np.cos(t), r * np.sin(t)], 1), 1)]
    raise AssertionError(name)


def _rasterise(rng: np.random.Generator, name: str, long_side: int, novel: bool) -> np.ndarray:
    """An object of class ``name`` -> float coverage [h, w] in [0, 1], long side about ``long_side`` pixels."""
    import numpy as np
    from PIL import Image, ImageDraw

    parts = _outline(rng, name, novel)
    aspect = rng.uniform(0.35, 0.55) if novel else rng.uniform(0.7, 1.0)
    if name == "ellipse" and not novel:
        aspect = rng.uniform(0.55, 0.8)  # not a circle: other classes cover rounder outlines
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = [(p * np.array([1.0, aspect])) @ rot.T for p, _ in parts]
    lo, hi = np.min([p.min(0) for p in pts], 0), np.max([p.max(0) for p in pts], 0)
    scale = long_side * SUPERSAMPLE / max(hi - lo)
    size = np.maximum(1, np.ceil((hi - lo) * scale / SUPERSAMPLE)).astype(int)  # (w, h) in pixels
    canvas = Image.new("L", (int(size[0]) * SUPERSAMPLE, int(size[1]) * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for p, (_, value) in zip(pts, parts):
        draw.polygon([tuple(v) for v in (p - lo) * scale], fill=255 * value)
    big = np.asarray(canvas, dtype=np.float32) / 255.0
    return big.reshape(size[1], SUPERSAMPLE, size[0], SUPERSAMPLE).mean((1, 3))


# --------------------------------------------------------------------------- images


def _place(rng: np.random.Generator, owner: np.ndarray, areas: list[int], shape: np.ndarray, overlap: bool,
           ) -> tuple[int, int] | None:
    """A top-left (y, x) for the bool ``shape`` on the object-index map ``owner`` (-1 = free): without
    ``overlap`` on free pixels only; with it, where every object it covers keeps ``MIN_VISIBLE`` of its area."""
    import numpy as np

    size = owner.shape[0]
    h, w = shape.shape
    if h > size or w > size:
        return None
    for _ in range(PLACEMENT_TRIES):
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        covered = owner[y:y + h, x:x + w][shape]
        hit = covered[covered >= 0]
        if not len(hit):
            return y, x
        if not overlap:
            continue
        lost = np.bincount(hit, minlength=len(areas))
        visible = np.bincount(owner[owner >= 0], minlength=len(areas)) - lost
        if (visible >= MIN_VISIBLE * np.asarray(areas)).all():
            return y, x
    return None


def _draw_image(rng: np.random.Generator, o: ShapesOptions, index: int, novel: bool,
                ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One image -> (uint8 image [S, S, 3], uint8 mask [S, S] of 1-based classes, the objects' records)."""
    import numpy as np

    from wsss.data.demo import _image_classes

    size = o.image_size
    image = _background(rng, size, o.background)
    owner = np.full((size, size), -1, dtype=np.int64)
    n = int(rng.integers(o.objects_per_image[0], o.objects_per_image[1] + 1))
    objects, areas = [], []
    by_fill = o.class_cue == "fill"
    for c in _image_classes(rng, o.num_classes, n, index):
        long_side = max(6, int(round(rng.uniform(*o.object_size) * size)))
        shape_name = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))] if by_fill else SHAPE_NAMES[c]
        alpha = _rasterise(rng, shape_name, long_side, novel)
        shape = alpha >= 0.5
        spot = _place(rng, owner, areas, shape, rng.random() < o.occlusion)
        if spot is None or not shape.any():
            continue
        (y, x), (h, w) = spot, shape.shape
        fill = _fill(rng, h, w, str(rng.choice(o.fills)), _class_hue(rng, c, o.num_classes) if by_fill else None)
        box = image[y:y + h, x:x + w]
        box[...] = box * (1 - alpha[..., None]) + fill * alpha[..., None]
        owner[y:y + h, x:x + w][shape] = len(objects)
        areas.append(int(shape.sum()))
        objects.append({"shape": shape_name, "class": c + 1, "box": [y, y + h, x, x + w], "novel": novel})
    classes = np.array([obj["class"] for obj in objects] + [0], dtype=np.uint8)
    mask = classes[owner]  # owner -1 -> the appended 0: background
    for i, obj in enumerate(objects):
        obj["visible"] = round(float((owner == i).sum()) / areas[i], 3)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), mask, objects


def _generate_split(split: str, count: int, o: ShapesOptions, out: Path) -> dict[str, list[dict]]:
    import numpy as np
    from PIL import Image

    from wsss.data.io import write_label_png

    rng = np.random.default_rng([o.seed, 0 if split == "train" else 1, 7])
    novel_count = int(round(o.val_novel_fraction * count)) if split == "val" else 0
    width = max(4, len(str(count - 1)))
    names, records = [], {}
    for i in range(count):
        name = f"{split}_{i:0{width}d}"
        image, mask, records[name] = _draw_image(rng, o, i, novel=i >= count - novel_count)
        Image.fromarray(image).save(out / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY, subsampling=0)
        write_label_png(out / "SegmentationClass" / f"{name}.png", mask)
        names.append(name)
    (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return records


def build_shapes_dataset(out_dir: str | Path, options: ShapesOptions | None = None, **changes: Any) -> Path:
    """Build the shapes dataset (module docstring) in ``out_dir`` -> ``out_dir``. Deterministic in the options.

    An ``out_dir`` holding a shapes dataset of the same options is returned as is; one of other options
    (or a digits demo dataset) is replaced; any other non-empty directory is an error.
    """
    from wsss.data.demo import _check_classes, _unwritable, _up_to_date

    out_dir = Path(out_dir)
    o = _options(options, changes)
    if _up_to_date(out_dir, o):
        logger.info("shapes dataset in '%s' is up to date", out_dir)
        return out_dir
    try:
        with atomic_dir(out_dir) as tmp:
            for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
                (tmp / sub).mkdir(parents=True)
            records = {split: _generate_split(split, count, o, tmp)
                       for split, count in (("train", o.num_train), ("val", o.num_val))}
            _check_classes(records["train"], o.num_classes, o.num_train)
            class_names = ["background", *o.class_names]
            (tmp / "classes.txt").write_text("".join(f"{n}\n" for n in class_names))
            meta = {"generator": "wsss.data.shapes.build_shapes_dataset", "options": o.record(),
                    "classes": class_names, "objects": records}
            (tmp / _META).write_text(json.dumps(meta, indent=1))
    except OSError as exc:
        raise WsssError(_unwritable(out_dir, exc)) from None
    return out_dir


__all__ = ["SHAPES_VARIANTS", "SHAPE_NAMES", "ShapesOptions", "build_shapes_dataset", "shapes_variant"]
