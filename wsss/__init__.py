"""wsss: end-to-end weakly-supervised semantic segmentation (AFA + PAR).

    import wsss

    model = wsss.load_model("work_dirs/demo/last.pt")   # or a folder written by `wsss export`
    labels = model.predict(["img.jpg"])                  # uint8 [H, W] class maps

``load_model`` and ``Segmenter`` (:mod:`wsss.api`) are imported on first use, so ``import wsss``
stays cheap (no torch import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the source checkout's version; an installed wsss reports importlib.metadata's

_LAZY = {"load_model": "wsss.api", "Segmenter": "wsss.api"}

if TYPE_CHECKING:
    from wsss.api import Segmenter, load_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wsss' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["Segmenter", "__version__", "load_model"]
