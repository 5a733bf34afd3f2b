"""Fallback ``pydensecrf.densecrf`` (see the package docstring)."""


class DenseCRF2D:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("pydensecrf is not installed (stub of bench/official_stubs)")
