"""Logging, configured once: every module logs to ``logging.getLogger(__name__)`` (under "wsss"); this
sends those records to the console (stderr, through tqdm so progress bars stay intact) and, while a
training runs, to its ``train.log``. Library functions log or return; only the CLI prints results.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = "wsss"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _LevelFormatter(logging.Formatter):
    """The message alone for INFO, "warning: message" / "error: message" above it."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno > logging.INFO:
            message = f"{record.levelname.lower()}: {record.getMessage()}"
            record = logging.makeLogRecord({**record.__dict__, "msg": message, "args": None})
        return super().format(record)


class _ConsoleHandler(logging.Handler):
    """tqdm.write to the current sys.stderr (looked up per record: tests and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


def configure_logging(rank: int = 0, verbose: bool = True) -> logging.Logger:
    """Console output of the "wsss" loggers: INFO and up on rank 0 (WARNING with ``verbose`` False), WARNING
    and up on the other ranks. Idempotent: a second call only updates the level."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(logging.INFO if rank == 0 and verbose else logging.WARNING)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(_LevelFormatter("%(message)s"))
        logger.addHandler(handler)
    return logger


def add_log_file(path: str | Path) -> logging.Handler:
    """Also write the "wsss" records (INFO and up) to ``path`` (appended, one timestamped line each) until
    :func:`remove_log_file`."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(_LevelFormatter("%(asctime)s %(message)s", datefmt=DATE_FORMAT))
    handler.setLevel(logging.INFO)
    logging.getLogger(ROOT).addHandler(handler)
    return handler


def remove_log_file(handler: logging.Handler) -> None:
    logging.getLogger(ROOT).removeHandler(handler)
    handler.close()


__all__ = ["add_log_file", "configure_logging", "remove_log_file"]
