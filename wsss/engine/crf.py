"""DenseCRF post-processing (Krahenbuhl & Koltun, NIPS 2011) with pydensecrf2.

The AFA test protocol (docs/method.md sec. 10): 10 mean-field iterations, a Gaussian
kernel (sxy 3, compat 3) and a bilateral kernel (sxy 64, srgb 5, compat 4) on the
original image, unary = -log(probability). The numbers live in ``EvalConfig``
(``eval.crf_*``).

    refined = crf_refine(image_uint8_hw3, probs_chw, cfg.eval)
    with CrfPool(cfg.eval.crf_workers, cfg.eval) as pool:     # parallel worker processes
        for tag, refined in pool.imap((tag, image, probs) for ...):
            ...

DenseCRF is CPU-only and slow (about 0.2-1 s per VOC image), so ``CrfPool`` runs it
in worker processes while the caller keeps the GPU busy; at most ``max_in_flight``
jobs are queued, so memory stays flat on a split of any length. This module imports
numpy only (no torch), so the workers start fast; they are started with
"forkserver" (Linux) or "spawn", never "fork", which is unsafe once CUDA is
initialized in the parent.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsss.config import EvalConfig
from wsss.errors import require

UNARY_CLIP = 1e-5  # probabilities are clipped here before -log (pydensecrf's unary_from_softmax default)


@dataclass(frozen=True)
class CrfParams:
    """The DenseCRF settings of ``EvalConfig`` (picklable, sent to the workers)."""

    iterations: int
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float

    @classmethod
    def from_config(cls, eval_cfg: EvalConfig | None = None) -> CrfParams:
        e = eval_cfg if eval_cfg is not None else EvalConfig()
        return cls(e.crf_iterations, e.crf_gaussian_sxy, e.crf_gaussian_compat,
                   e.crf_bilateral_sxy, e.crf_bilateral_srgb, e.crf_bilateral_compat)


def require_crf() -> Any:
    """Import pydensecrf's densecrf module or raise WsssError saying to install pydensecrf2."""
    require("pydensecrf", package="pydensecrf2", extra="crf")
    return require("pydensecrf.densecrf", package="pydensecrf2", extra="crf")


def crf_refine(image: np.ndarray, probs: np.ndarray, params: EvalConfig | CrfParams | None = None) -> np.ndarray:
    """image uint8 [H, W, 3] (RGB), probs float [C, H, W] (class probabilities) -> float32 [C, H, W].

    Channels whose probability is zero everywhere (e.g. classes absent from an image's
    label in CAM probabilities) are left out of the CRF and stay zero: they could not
    win anyway, and the CRF's cost grows with the number of labels.
    """
    dcrf = require_crf()
    p = params if isinstance(params, CrfParams) else CrfParams.from_config(params)
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"crf_refine: image must be [H, W, 3], got shape {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"crf_refine: probs must be [C, {image.shape[0]}, {image.shape[1]}], got {probs.shape}")
    c, h, w = probs.shape
    active = np.flatnonzero(probs.reshape(c, -1).max(1) > 0)
    out = np.zeros((c, h, w), dtype=np.float32)
    if len(active) == 0:
        return out
    if len(active) == 1:  # a single label: nothing to decide
        out[active[0]] = 1.0
        return out
    sub = probs[active].astype(np.float32, copy=False)
    unary = np.ascontiguousarray(-np.log(np.clip(sub, UNARY_CLIP, None)).reshape(len(active), -1))
    crf = dcrf.DenseCRF2D(w, h, len(active))
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=p.gaussian_sxy, compat=p.gaussian_compat)
    crf.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=p.bilateral_compat)
    q = np.asarray(crf.inference(p.iterations), dtype=np.float32).reshape(len(active), h, w)
    out[active] = q
    return out


def _crf_job(image: np.ndarray, probs: np.ndarray, params: CrfParams) -> np.ndarray:
    """Top-level (picklable) worker function."""
    return crf_refine(image, probs, params)


def _start_method() -> str:
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


class CrfPool:
    """DenseCRF over many images in ``workers`` processes (0 = inline in this process).

    ``imap(jobs)`` takes an iterable of ``(tag, image, probs)`` and yields
    ``(tag, refined_probs)`` in the same order; it pulls a new job only while fewer
    than ``max_in_flight`` (default 2 x workers) are pending, so a lazy generator of
    jobs (e.g. one running the network) is consumed at the pace of the CRF.
    """

    def __init__(self, workers: int, params: EvalConfig | CrfParams | None = None,
                 max_in_flight: int | None = None) -> None:
        require_crf()  # fail here, in the parent, with the install hint
        self.workers = max(0, int(workers))
        self.params = params if isinstance(params, CrfParams) else CrfParams.from_config(params)
        self.max_in_flight = max_in_flight or max(1, 2 * self.workers)
        self._executor: ProcessPoolExecutor | None = None
        if self.workers > 0:
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context(_start_method()))

    def imap(self, jobs: Iterable[tuple[Any, np.ndarray, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray]]:
        if self._executor is None:
            for tag, image, probs in jobs:
                yield tag, crf_refine(image, probs, self.params)
            return
        pending: deque[tuple[Any, Future]] = deque()
        try:
            for tag, image, probs in jobs:
                pending.append((tag, self._executor.submit(_crf_job, image, probs, self.params)))
                if len(pending) >= self.max_in_flight:
                    done_tag, future = pending.popleft()
                    yield done_tag, future.result()
            while pending:
                done_tag, future = pending.popleft()
                yield done_tag, future.result()
        finally:
            for _, future in pending:
                future.cancel()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> CrfPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CrfParams", "CrfPool", "crf_refine", "require_crf"]
