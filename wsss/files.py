"""Atomic file and folder writes: a killed process leaves the old file (or folder) or the new one, never half.

Everything the project writes that a later run reads back (checkpoints, pseudo labels, predictions,
split and label caches, the demo dataset, exports) goes through these two functions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    try:  # make a rename durable (not possible on every platform / file system)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write(path: str | Path, write: Callable[[Path], None], durable: bool = False) -> Path:
    """``write(tmp)`` writes a temporary file next to ``path`` (same suffix, so numpy / PIL pick the same
    format), which is then renamed over ``path``. durable: fsync the file and the rename (checkpoints)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if durable:
        _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp:`` fill the empty folder ``tmp``; at the end of the block it replaces
    ``out`` (an existing ``out`` is removed first); on an error ``tmp`` is removed and ``out`` is kept."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["atomic_dir", "atomic_write"]
