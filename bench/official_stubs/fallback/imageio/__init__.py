"""Fallback for a missing imageio: imported by the official ``utils/camutils.py``, unused by training."""


def imsave(*args: object, **kwargs: object) -> None:
    raise NotImplementedError("imageio is not installed (stub of bench/official_stubs)")


imread = imwrite = imsave
