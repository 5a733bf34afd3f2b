"""Fallback ``matplotlib.pyplot``: the official ``utils/imutils.py`` only uses it for TensorBoard images."""


def get_cmap(*args: object, **kwargs: object) -> None:
    raise NotImplementedError("matplotlib is not installed (stub of bench/official_stubs)")
