"""User-facing errors.

Anything a user can cause (a path, a dataset layout, a config key, a label
value, a missing optional package) raises :class:`WsssError` with one message
that names the thing and what was expected. The CLI prints it on one line and
exits non-zero without a traceback; library callers can catch it.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class WsssError(Exception):
    """An error caused by user input, reported without a traceback by the CLI."""


class ConfigError(WsssError):
    """An unknown configuration key, a value of the wrong type or choice."""


class DatasetError(WsssError):
    """A dataset directory, split file, image or mask that is missing or wrong."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require(module: str, package: str | None = None, extra: str | None = None) -> ModuleType:
    """Import an optional dependency or raise a WsssError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pkg = package or module
        hint = f"pip install 'wsss[{extra}]'" if extra else f"pip install {pkg}"
        raise WsssError(
            f"this feature needs the optional package '{pkg}' (import '{module}' failed: {exc}); "
            f"install it with: {hint}"
        ) from None
