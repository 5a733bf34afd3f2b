"""``wsss predict``: segment image files with a trained model and write label PNGs.

    summary = predict_images("work_dirs/demo/last.pt", ["photos/", "more/*.jpg"], "pred/", overlay=True)

Inputs are image files, directories (their image files, sorted by name, not recursive) or glob
patterns (``**`` recurses). For each image ``<out>/<name>.png`` is written: a VOC-palette label
PNG at the image's original size (what ``wsss eval --pred`` scores); optionally
``<out>/overlay/<name>.png`` (the label's colours blended on the image, background left as is)
and ``<out>/<name>.npz`` (key ``probs``: float16 [C, H, W] class probabilities).
``<name>`` is the image's file stem; images whose stems collide keep their path relative
to the inputs' common folder (``a/x``, ``b/x``; with the extension when even that collides).

The work is :meth:`wsss.api.Segmenter.iter_predictions`, the same code as the Python API. An
unreadable image is reported on stderr as one ``error: cannot read ...`` line and skipped; the
summary counts it and the caller exits non-zero.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from wsss.errors import WsssError

logger = logging.getLogger(__name__)

OVERLAY_DIR = "overlay"
OVERLAY_ALPHA = 0.5  # weight of the class colour on a foreground pixel


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Files, directories and globs -> (image files in order, without repeats; problems, one message each).

    A directory gives its files with an image extension (``IMAGE_EXTENSIONS``), sorted; a glob its
    matches, sorted; a plain path is taken as given (a missing file fails later, when it is read).
    An empty directory or a glob without a match is a problem.
    """
    from wsss.data.datasets import IMAGE_EXTENSIONS

    files: list[Path] = []
    problems: list[str] = []
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(f"directory '{text}' holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif not path.exists() and glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                problems.append(f"no file matches '{text}'")
            files.extend(found)
        else:
            files.append(path)
    unique: dict[str, Path] = {}
    for p in files:
        unique.setdefault(os.path.abspath(p), p)
    return list(unique.values()), problems


def output_names(files: Sequence[Path]) -> list[str]:
    """One output name per file (POSIX, no extension): the stem, or where stems collide the path relative
    to the files' common folder, with the file's extension kept where even that collides."""
    stems = Counter(p.stem for p in files)
    absolute = [Path(os.path.abspath(p)) for p in files]
    root = Path(os.path.commonpath([str(a.parent) for a in absolute])) if files else Path()
    names = [p.stem if stems[p.stem] == 1 else a.relative_to(root).with_suffix("").as_posix()
             for p, a in zip(files, absolute)]
    repeated = Counter(names)
    return [a.relative_to(root).as_posix() if repeated[n] > 1 else n for n, a in zip(names, absolute)]


def _overlay_dir(out: Path, names: Sequence[str]) -> Path:
    """``<out>/overlay``, or ``_overlay``, ``__overlay``, ... when a name's folder is already called so."""
    name = OVERLAY_DIR
    tops = {n.split("/", 1)[0] for n in names if "/" in n}
    while name in tops:
        name = "_" + name
    return out / name


def overlay_image(image: np.ndarray, label: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 [H, W, 3] image, uint8 [H, W] label -> uint8 [H, W, 3]: VOC colours blended on foreground pixels."""
    from wsss.engine.colors import blend, colorize_label

    return np.where((label > 0)[:, :, None], blend(image, colorize_label(label), alpha), image)


def _write_outputs(out: Path, name: str, prediction: Any, overlay_dir: Path | None, probs: bool) -> None:
    from PIL import Image

    from wsss.engine.runner import save_label
    from wsss.files import atomic_write

    label_path = out / f"{name}.png"
    label_path.parent.mkdir(parents=True, exist_ok=True)
    if probs:
        atomic_write(out / f"{name}.npz", lambda tmp: np.savez_compressed(tmp, probs=prediction.probs.astype(np.float16)))
    if overlay_dir is not None:
        path = overlay_dir / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(overlay_image(prediction.image, prediction.label))
        atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    save_label(label_path, prediction.label)


def format_summary(summary: dict[str, Any]) -> str:
    """The lines printed at the end of ``wsss predict``."""
    n, failed, seconds = summary["written"], summary["failed"], summary["seconds"]
    extras = [what for what, on in (("overlays", summary["overlay"]), ("probabilities", summary["probs"])) if on]
    lines = [f"wrote {n} label map{'s' if n != 1 else ''}{' with ' + ' and '.join(extras) if extras else ''} to "
             f"{summary['out_dir']} in {seconds:.1f} s ({n / max(seconds, 1e-9):.2f} images/s)"
             + (f"; {failed} image{'s' if failed != 1 else ''} failed" if failed else "")]
    total = sum(summary["pixels"].values())
    if total:
        width = max(len(c) for c in summary["pixels"])
        lines.append(f"  {'class':<{width}}  {'pixels':>12}  {'share':>6}  {'images':>6}")
        for name, count in summary["pixels"].items():
            lines.append(f"  {name:<{width}}  {count:>12}  {100 * count / total:>5.1f}%  {summary['images'][name]:>6}")
    return "\n".join(lines)


def predict_images(
    model: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    overlay: bool = False,
    probs: bool = False,
    msc: bool = False,
    flip: bool | None = None,
    crf: bool = False,
    target: str = "seg",
    batch_size: int = 1,
    num_workers: int | None = None,
    overrides: Sequence[str] = (),
    progress: bool | None = None,
) -> dict[str, Any]:
    """Segment the images of ``inputs`` (module docstring) with ``model`` (a checkpoint or an export folder).

    msc / flip / crf / target: see :mod:`wsss.api`. num_workers: DataLoader processes reading the next
    images (None: ``data.num_workers``); batch_size: images per loader step (the network takes one at a
    time). progress: the tqdm bar (None: only on a terminal). Errors of single images are logged as
    ``error: ...`` lines. -> {"written", "failed", "seconds", "out_dir", "overlay", "probs", "pixels":
    class name -> predicted pixels, "images": class name -> images it appears in} (classes found only).
    """
    from wsss.api import load_model

    files, problems = collect_images(inputs)
    if not files:
        raise WsssError(problems[0] if len(problems) == 1 else f"no images to segment in {list(map(str, inputs))}")
    for message in problems:
        logger.error(message)
    segmenter = load_model(model, overrides=overrides, msc=msc, flip=flip, target=target, crf=crf)
    workers = segmenter.config.data.num_workers if num_workers is None else num_workers
    start = time.perf_counter()
    predictions = segmenter.iter_predictions(files, with_probs=probs, keep_going=True, num_workers=workers,
                                             batch_size=batch_size)  # checks the options; reads nothing yet
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsssError(f"cannot create the output directory '{out}': {exc.strerror or exc}") from None
    names = output_names(files)
    overlay_dir = _overlay_dir(out, names) if overlay else None
    class_names = segmenter.class_names
    pixels = np.zeros(len(class_names), dtype=np.int64)
    images = np.zeros(len(class_names), dtype=np.int64)
    written, failed = 0, len(problems)
    with tqdm(predictions, total=len(files), desc=f"predict {segmenter.target}", unit="img",
              disable=None if progress is None else not progress) as bar:
        for prediction in bar:
            if prediction.error is not None:
                logger.error(prediction.error)
                failed += 1
                continue
            _write_outputs(out, names[prediction.index], prediction, overlay_dir, probs)
            counts = np.bincount(prediction.label.ravel(), minlength=len(class_names))[:len(class_names)]
            pixels += counts
            images += counts > 0
            written += 1
    found = np.flatnonzero(pixels)
    summary = {
        "written": written, "failed": failed, "seconds": time.perf_counter() - start, "out_dir": str(out),
        "overlay": overlay, "probs": probs,
        "pixels": {class_names[c]: int(pixels[c]) for c in found},
        "images": {class_names[c]: int(images[c]) for c in found},
    }
    return summary


__all__ = ["collect_images", "format_summary", "output_names", "overlay_image", "predict_images"]
