"""What the benchmark scripts share: peak memory, the timed repeat loop, one case per child process.

The scripts run as ``python3 bench/NAME.py``, so this folder is on ``sys.path`` and
``from _common import ...`` works in them and in their spawned children.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory(cuda: bool) -> int:
    """Bytes: CUDA max allocated since the last reset, else the process's peak RSS."""
    return torch.cuda.max_memory_allocated() if cuda else peak_rss()


def time_runs(run: Callable[[], Any], warmup: int, repeats: int, cuda: bool) -> list[float]:
    """``warmup`` untimed calls, then the seconds of each of ``repeats`` calls (CUDA synchronised)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _child(queue, case: Callable[..., dict], key: dict, args: tuple) -> None:
    try:
        queue.put(case(*args))
    except Exception as exc:  # report, keep benchmarking the other cases
        queue.put({**key, "error": f"{type(exc).__name__}: {exc}"})


def run_in_child(case: Callable[..., dict], key: dict, *args: Any) -> dict:
    """``case(*args)`` in a fresh spawned process (so its peak memory is its own) -> its result dict,
    or ``{**key, "error": ...}`` if it raised."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, case, key, args))
    proc.start()
    result = queue.get()
    proc.join()
    return result
