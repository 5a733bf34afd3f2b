"""The Python API: load a trained model and segment images with it.

    import wsss

    model = wsss.load_model("work_dirs/demo/last.pt")     # a training checkpoint, or a `wsss export` folder
    labels = model.predict(["img.jpg"])                    # list of uint8 [H, W] class-index maps
    probs = model.predict_proba(["img.jpg"])               # list of float32 [C, H, W] class probabilities
    model.class_names                                      # C names, background first

Images are file paths, PIL images or numpy uint8 arrays [H, W, 3]. Each is prepared exactly as
``wsss eval --checkpoint`` prepares a dataset image (:func:`wsss.engine.inference.evaluate_checkpoint`):
resized so its long side is ``eval.long_side``, normalized with ``data.mean`` / ``data.std``; the
probabilities come back at the image's original size. Files of any PIL mode (greyscale, RGBA,
palette, 16-bit) are converted to RGB, with the EXIF orientation applied.

Options (per model, overridable per call): ``target`` "seg" (the segmentation head) or "cam" /
"afa" (class probabilities from the CAMs, see :func:`wsss.engine.inference.predict_cam_probs`),
``msc`` (multi-scale test: ``eval.scales`` for seg, ``cam.scales`` for cam / afa), ``flip``
(None: with ``msc`` as ``eval.flip`` / ``cam.flip`` say, none without), ``crf`` (DenseCRF,
``eval.crf_*``). New images have no ground-truth image labels, so the cam / afa targets use the
classes the classifier predicts: sigmoid of the class logits of the scale-1 pass > 0.5, or the
top class if none is.

The network runs one image at a time (images of different sizes cannot be stacked);
``num_workers`` > 0 decodes and resizes the next images in DataLoader worker processes meanwhile.
``wsss predict`` is a loop over :meth:`Segmenter.iter_predictions`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from wsss.config import Config
from wsss.errors import DatasetError, WsssError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
TARGETS = ("seg", "cam", "afa")
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # integer images wider than 8 bits


# --------------------------------------------------------------------------- images


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> uint8 [H, W, 3] RGB, EXIF orientation applied.

    16-bit / 32-bit integer images are scaled from 0..65535 to 0..255; float images ("F") from
    0..1 when their maximum is at most 1, else clipped to 0..255; alpha is dropped.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in _HIGH_BIT_MODES or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            values = values * 255.0 if values.size and np.nanmax(values) <= 1.0 else values
        else:
            values = values / 257.0  # 65535 -> 255
        grey = np.clip(np.nan_to_num(np.round(values)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file -> uint8 [H, W, 3] RGB (any PIL mode, EXIF orientation applied).

    Raises DatasetError "cannot read '<path>': <reason>" for a missing, non-image or damaged file.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_rgb(img)
    except FileNotFoundError:
        reason = "no such file"
    except IsADirectoryError:
        reason = "it is a directory"
    except UnidentifiedImageError:
        reason = "not an image format Pillow can decode"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc) or type(exc).__name__
    raise DatasetError(f"cannot read '{path}': {reason}")


def to_rgb(image: ImageInput) -> np.ndarray:
    """A file path, PIL image or numpy array -> uint8 [H, W, 3] RGB.

    Arrays: uint8 [H, W, 3], or [H, W] (grey) / [H, W, 4] (alpha dropped). Anything else is a DatasetError.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise DatasetError(f"an image array must be uint8 [H, W, 3] (or [H, W], [H, W, 4]); got {image.dtype} "
                               f"{list(image.shape)}")
        if min(image.shape[:2]) < 1:
            raise DatasetError(f"an image array must have H, W >= 1; got shape {list(image.shape)}")
        rgb = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]
        return np.array(rgb, dtype=np.uint8, order="C", copy=True)  # writable, and not the caller's array
    raise DatasetError(f"an image must be a file path, a PIL image or a numpy uint8 array [H, W, 3]; got "
                       f"{type(image).__name__}")


def describe(image: ImageInput, index: int) -> str:
    """How an input is named in messages: the path as given, else '<image N>'."""
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"<image {index}>"


# --------------------------------------------------------------------------- loading


class _Inputs(Dataset):
    """Inputs -> {"index", "raw" uint8 [H0, W0, 3], "image" float [3, h, w] normalized, "error"}.

    A failing input gives ``raw`` / ``image`` None and the message in ``error`` (so a
    DataLoader worker never dies on one bad file).
    """

    def __init__(self, images: Sequence[ImageInput], transform: Any) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            raw = to_rgb(self.images[index])
        except WsssError as exc:
            return {"index": index, "raw": None, "image": None, "error": str(exc)}
        return {"index": index, "raw": raw, "image": self.transform(raw), "error": None}


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DataLoader collate: keep the items as they are (different sizes cannot be stacked)."""
    return batch


@dataclass
class Prediction:
    """The result for one input of :meth:`Segmenter.iter_predictions`.

    ``label`` uint8 [H, W] class indices at the image's size; ``probs`` float32 [C, H, W] (only
    when asked for); ``image`` the RGB input uint8 [H, W, 3]; ``classes``: with target cam / afa the
    class indices (1..C-1) the classifier predicted and the CAMs were computed for, else None.
    A failed input (only with ``keep_going``) has ``error`` set and the arrays None.
    """

    index: int
    name: str
    label: np.ndarray | None = None
    probs: np.ndarray | None = None
    image: np.ndarray | None = None
    classes: list[int] | None = None
    error: str | None = None


# --------------------------------------------------------------------------- the segmenter


class Segmenter:
    """A trained network ready to segment images (see the module docstring); build it with :func:`load_model`.

    ``network``: an AFANetwork (put in eval mode); ``config``: its Config; ``class_names``: C names.
    ``device`` None: ``train.device`` of the config ("auto": CUDA if available); the forward passes
    use ``train.precision`` (autocast), post-processing float32. ``msc`` / ``flip`` / ``target`` /
    ``crf``: the defaults of :meth:`predict`, :meth:`predict_proba` and :meth:`iter_predictions`.
    """

    def __init__(
        self,
        network: nn.Module,
        config: Config,
        class_names: Sequence[str],
        device: str | torch.device | None = None,
        msc: bool = False,
        flip: bool | None = None,
        target: str = "seg",
        crf: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> None:
        from wsss.engine.distributed import resolve_device

        self.network = network.eval()
        self._config = config
        self._class_names = list(class_names)
        self.meta = dict(meta or {})
        self.msc, self.flip, self.crf = msc, flip, crf
        self.target = self._check_target(target)
        self._device = torch.device("cpu")
        self.to(resolve_device(config.train.device) if device is None else device)

    # ----------------------------------------------------------------------- properties

    @property
    def class_names(self) -> list[str]:
        """C class names, index 0 the background."""
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self._class_names)

    @property
    def config(self) -> Config:
        """The resolved configuration (``eval.long_side``, ``eval.scales``, ``train.precision``, ...)."""
        return self._config

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> Segmenter:
        """Move the network to ``device`` ("cpu", "cuda", "cuda:1", a torch.device) -> self."""
        from wsss.engine.distributed import resolve_device

        device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.network.to(device)
        self._device = device
        return self

    def __repr__(self) -> str:
        m = self._config.model
        return (f"Segmenter({m.backbone} + {m.seg_head}, {self.num_classes} classes, device={self._device}, "
                f"target={self.target}, msc={self.msc}, flip={self.flip}, crf={self.crf})")

    # ----------------------------------------------------------------------- predictions

    def predict(self, images: ImageInput | Iterable[ImageInput], **options: Any) -> list[np.ndarray]:
        """Images (one or a sequence; paths, PIL images, uint8 [H, W, 3] arrays) -> uint8 [H, W] label maps.

        ``options``: msc, flip, target, crf, num_workers (see :meth:`iter_predictions`).
        An unreadable input raises DatasetError naming it.
        """
        return [p.label for p in self.iter_predictions(images, **options)]

    def predict_proba(self, images: ImageInput | Iterable[ImageInput], **options: Any) -> list[np.ndarray]:
        """Images -> float32 [C, H, W] class probabilities (summing to 1 over C) at each image's size."""
        return [p.probs for p in self.iter_predictions(images, with_probs=True, **options)]

    def iter_predictions(
        self,
        images: ImageInput | Iterable[ImageInput],
        msc: bool | None = None,
        flip: bool | None = None,
        target: str | None = None,
        crf: bool | None = None,
        with_probs: bool = False,
        keep_going: bool = False,
        num_workers: int = 0,
        batch_size: int = 1,
    ) -> Iterator[Prediction]:
        """Yield one :class:`Prediction` per input, in order (the loop behind ``wsss predict``).

        msc / flip / target / crf: None = the segmenter's defaults. with_probs: also the float32
        probabilities (else only the label map). keep_going: an unreadable input yields a
        Prediction with ``error`` set instead of raising. num_workers: DataLoader processes that
        read and resize the next images while the network runs (0 = in this process);
        batch_size: images per loader step (the network still takes them one at a time).
        """
        from wsss.data.transforms import EvalTransform

        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        images = list(images)
        if batch_size < 1:
            raise WsssError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise WsssError(f"num_workers must be 0 or more, got {num_workers}")
        target = self._check_target(self.target if target is None else target)
        msc = self.msc if msc is None else msc
        crf = self.crf if crf is None else crf
        cam_cfg, seg_flip = self._flip_settings(target, msc, self.flip if flip is None else flip)
        cfg = self._config
        dataset = _Inputs(images, EvalTransform.from_config(cfg.data, cfg.eval.long_side))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=min(num_workers, len(images)),
                            collate_fn=_as_list, persistent_workers=False)
        # the checks above run now; the images are read as the caller iterates
        return self._iterate(loader, images, target, msc, seg_flip, cam_cfg, crf, with_probs, keep_going)

    # ----------------------------------------------------------------------- internals

    def _iterate(self, loader: DataLoader, images: Sequence[ImageInput], target: str, msc: bool, seg_flip: bool,
                 cam_cfg: Any, crf: bool, with_probs: bool, keep_going: bool) -> Iterator[Prediction]:
        """The loop of :meth:`iter_predictions` over checked options."""
        cfg = self._config

        def forward() -> Iterator[tuple[dict[str, Any], np.ndarray, Tensor | np.ndarray]]:
            """(item, RGB image, probs): CrfPool.imap's (tag, image, probs) jobs."""
            for batch in loader:
                for item in batch:
                    if item["error"] is not None:
                        if not keep_going:
                            raise DatasetError(item["error"])
                        # a no-op CRF job keeps the pool's order (no class is active: nothing is computed)
                        yield item, np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1, 1), np.float32)
                        continue
                    probs = self._probs(item, target, msc, seg_flip, cam_cfg)
                    yield item, item["raw"], probs.float().cpu().numpy() if crf else probs

        if not crf:
            for item, _, probs in forward():
                yield self._prediction(item, images, probs, with_probs)
            return
        from wsss.engine.crf import CrfPool

        with CrfPool(cfg.eval.crf_workers, cfg.eval) as pool:  # DenseCRF of image i while the network runs i + 1
            for item, probs in pool.imap(forward()):
                yield self._prediction(item, images, probs, with_probs)

    @staticmethod
    def _check_target(target: str) -> str:
        if target not in TARGETS:
            raise WsssError(f"target must be one of {', '.join(TARGETS)}; got '{target}'")
        return target

    def _flip_settings(self, target: str, msc: bool, flip: bool | None) -> tuple[Any, bool]:
        """-> (cam config for cam / afa, flip for seg). None follows the config (only with msc)."""
        cfg = self._config
        if target == "seg":
            return cfg.cam, (cfg.eval.flip and msc) if flip is None else flip
        if flip is None or flip == (cfg.cam.flip and msc):
            return cfg.cam, False
        if not msc:
            raise WsssError("flip with target cam / afa needs msc: the CAM test flips within the multi-scale "
                            "pass (cam.scales); without msc it is one scale-1 pass")
        return replace(cfg.cam, flip=flip), False

    def _image_labels(self, x: Tensor) -> Tensor:
        """x [1, 3, h, w] -> multi-hot float [K] of the predicted classes (sigmoid > 0.5, at least the top one)."""
        from wsss.engine.viz import predicted_classes

        logits = self.network(x, with_seg=False, with_affinity=False).cls_logits
        return predicted_classes(logits[0].float())

    def _probs(self, item: dict[str, Any], target: str, msc: bool, seg_flip: bool, cam_cfg: Any) -> Tensor:
        """One prepared item -> probs [C, H0, W0] float32 on the device; for cam / afa also ``item["image_labels"]``,
        the predicted multi-hot [K] on the device. Reads nothing back from the device (:meth:`_prediction` does)."""
        from wsss.engine.inference import predict_cam_probs, predict_seg
        from wsss.engine.runtime import autocast

        cfg = self._config
        x = item["image"][None].to(self._device)
        out_size = tuple(item["raw"].shape[:2])
        with torch.inference_mode(), autocast(self._device, cfg.train.precision):
            if target == "seg":
                scales = cfg.eval.scales if msc else [1.0]
                return predict_seg(self.network, x, scales, flip=seg_flip, out_size=out_size)
            labels = item["image_labels"] = self._image_labels(x)
            return predict_cam_probs(self.network, x, labels, replace(cfg, cam=cam_cfg), target, msc, out_size)

    def _prediction(self, item: dict[str, Any], images: Sequence[ImageInput], probs: Tensor | np.ndarray,
                    with_probs: bool) -> Prediction:
        from wsss.engine.runner import to_label

        index = item["index"]
        name = describe(images[index], index)
        if item["error"] is not None:
            return Prediction(index, name, error=item["error"])
        array = None
        if with_probs:
            array = probs.float().cpu().numpy() if isinstance(probs, Tensor) else np.asarray(probs, np.float32)
        labels = item.get("image_labels")  # cam / afa: the predicted classes, 1..K
        classes = [int(k) + 1 for k in torch.nonzero(labels).flatten().tolist()] if labels is not None else None
        return Prediction(index, name, label=to_label(probs), probs=array, image=item["raw"], classes=classes)


# --------------------------------------------------------------------------- loading a model


def load_model(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    overrides: Sequence[str] = (),
    msc: bool = False,
    flip: bool | None = None,
    target: str = "seg",
    crf: bool = False,
) -> Segmenter:
    """A :class:`Segmenter` from a `wsss export` folder or a training checkpoint (.pt).

    ``device`` None: ``train.device`` of the model's config; ``overrides``: ``section.key=value``
    strings applied to the config (e.g. ``eval.long_side=1024``, ``train.precision=bf16``);
    msc / flip / target / crf: the segmenter's defaults (see the module docstring).
    """
    from wsss.engine.checkpoint import load_network
    from wsss.engine.export import is_export_dir, load_exported

    path = Path(path)
    if not path.exists():
        raise WsssError(f"model '{path}' does not exist; expected a folder written by `wsss export` or a "
                        "checkpoint file written by `wsss train` (.pt)")
    if path.is_dir():
        if not is_export_dir(path):
            raise WsssError(f"'{path}' is a directory but not an exported model (no model.safetensors, config.yaml "
                            "and classes.json); expected a `wsss export` folder or a checkpoint file")
        network, cfg, meta = load_exported(path, list(overrides))
    else:
        network, cfg, meta = load_network(path, "cpu", list(overrides))
    class_names = list(meta.get("class_names") or []) or [f"class {c}" for c in range(meta["num_classes"])]
    return Segmenter(network, cfg, class_names, device=device, msc=msc, flip=flip, target=target, crf=crf, meta=meta)


__all__ = ["ImageInput", "Prediction", "Segmenter", "load_model", "read_rgb", "to_rgb"]
