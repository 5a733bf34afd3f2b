"""Running a trained network over a split: loading it for inference, the item loader, the one loop
behind ``wsss pseudolabel`` / ``eval`` / ``viz`` and validation, and the files they write."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from wsss.config import Config
from wsss.data.io import write_label_png
from wsss.engine.runtime import autocast
from wsss.files import atomic_write


def load_for_inference(checkpoint: str | Path, overrides: Sequence[str],
          data_root: str | Path | None) -> tuple[nn.Module, Config, dict]:
    """Network (on the CPU, eval mode), config (overrides and ``data_root`` applied), metadata."""
    from wsss.engine.checkpoint import load_network

    network, cfg, meta = load_network(checkpoint, torch.device("cpu"), list(overrides))
    if data_root is not None:
        cfg.data.root = str(data_root)
    network.eval()
    return network, cfg, meta


class SplitItems(Dataset):
    """The eval items of ``indices`` of a dataset, with the index and optionally the raw uint8 image."""

    def __init__(self, dataset: Any, indices: Sequence[int], raw_image: bool) -> None:
        self.dataset, self.indices, self.raw_image = dataset, list(indices), raw_image

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        item = dict(self.dataset[index])
        item["index"] = index
        if self.raw_image:
            item["raw"] = self.dataset.load_image(index)
        return item


def split_loader(dataset: Any, indices: Sequence[int], raw_image: bool, num_workers: int) -> DataLoader:
    workers = min(num_workers, len(indices))
    return DataLoader(SplitItems(dataset, indices, raw_image), batch_size=None, shuffle=False, num_workers=workers,
                      persistent_workers=False)


PredictFn = Callable[[dict[str, Any]], Tensor]


def run_over_split(
    dataset: Any,
    indices: Sequence[int],
    predict: PredictFn,
    device: torch.device,
    precision: str,
    pool: Any | None = None,
    num_workers: int = 0,
    raw_image: bool = False,
) -> Iterator[tuple[dict[str, Any], Any]]:
    """Run ``predict(item)`` over the items ``indices`` of an eval dataset (under inference mode and
    :func:`wsss.engine.runtime.autocast`), loading the next items in ``num_workers`` processes; the one
    loop behind pseudo labels, evaluation, validation and viz.

    Yields (item, output) per index, in order; ``item`` also holds "index" (and "raw", the uint8 image,
    with ``raw_image``). With a CrfPool ``pool`` the output must be probs [C, H0, W0]; they come back as a
    float32 array after DenseCRF (run in the pool's worker processes while the next images go through
    the network)."""
    loader = split_loader(dataset, indices, raw_image or pool is not None, num_workers)

    def forward() -> Iterator[tuple[dict[str, Any], Any, Any]]:
        for item in loader:
            with torch.inference_mode(), autocast(device, precision):
                probs = predict(item)
            if pool is None:
                yield item, None, probs
            else:
                yield item, np.asarray(item.pop("raw")), probs.float().cpu().numpy()

    if pool is None:
        for item, _, probs in forward():
            yield item, probs
    else:
        yield from pool.imap(((item, raw, probs) for item, raw, probs in forward()))


def to_label(probs: Tensor | np.ndarray) -> np.ndarray:
    """probs [C, H, W] -> uint8 [H, W] argmax (on the device for a tensor, then one copy)."""
    if isinstance(probs, Tensor):
        return probs.max(dim=0).indices.to(torch.uint8).cpu().numpy()  # = argmax, faster on CPU
    return probs.argmax(axis=0).astype(np.uint8)


def to_float16(probs: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(probs, Tensor):
        return probs.to(torch.float16).cpu().numpy()
    return probs.astype(np.float16)


def save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.save(tmp, array))


def save_label(path: Path, label: np.ndarray) -> None:
    """A label PNG (VOC palette), written atomically."""
    atomic_write(path, lambda tmp: write_label_png(tmp, label))


def crf_pool(cfg: Config, enabled: bool) -> contextlib.AbstractContextManager:
    """``with crf_pool(cfg, crf) as pool:`` a CrfPool of ``eval.crf_workers`` processes (closed at the end of
    the block), or None when DenseCRF is off."""
    if not enabled:
        return contextlib.nullcontext(None)
    from wsss.engine.crf import CrfPool

    return CrfPool(cfg.eval.crf_workers, cfg.eval)


__all__ = [
    "SplitItems", "crf_pool", "load_for_inference", "run_over_split", "save_label", "save_npy", "split_loader",
    "to_float16", "to_label",
]
