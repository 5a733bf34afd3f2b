"""Fallback ``pydensecrf.utils`` (see the package docstring)."""


def unary_from_softmax(*args: object, **kwargs: object) -> None:
    raise NotImplementedError("pydensecrf is not installed (stub of bench/official_stubs)")


unary_from_labels = unary_from_softmax
