"""What every phase (train, validate, pseudo-label, evaluate, predict, viz) shares: the precision rule,
the bare network inside its wrappers, the pipeline's settings from the config, RNG isolation."""

from __future__ import annotations

import contextlib
import ctypes
import sys

import torch
from torch import nn

from wsss.config import Config
from wsss.method.par import ParParams
from wsss.method.pseudo_labels import PseudoLabelParams

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device: torch.device | str, precision: str) -> torch.dtype | None:
    """The one precision rule, for every phase: ``train.precision`` bf16 -> bfloat16 autocast on any
    device; fp16 -> float16 autocast on CUDA only (on the CPU fp16 autocast is slow and some kernels lack
    it, so fp16 runs as fp32 there, in training as in validation); fp32 -> none."""
    device = torch.device(device)
    if precision == "fp16" and device.type != "cuda":
        return None
    return _DTYPES.get(precision)


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast by :func:`autocast_dtype`, or a no-op."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel and / or torch.compile wrapper."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def network_method(model: nn.Module) -> str:
    """The training method a network implements ("afa" or "toco"), through any DDP / compile wrapper."""
    return getattr(unwrap(model), "method", "afa")


def compile_network(network: nn.Module, enabled: bool) -> nn.Module:
    """``train.compile``: the backbone compiled in place (``nn.Module.compile``, static shapes: one graph per
    input shape and grad mode), so parameter names and checkpoints stay those of the eager network -> network."""
    if enabled:
        unwrap(network).backbone.compile(dynamic=False)
    return network


# glibc's mallopt parameters (malloc.h) and the value given to both: above any tensor of a training step
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def keep_host_memory(enabled: bool) -> bool:
    """``train.keep_host_memory``: glibc serves large allocations from the heap and keeps what is freed
    (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD), so that a training loop reuses its host memory
    instead of mapping, faulting in and unmapping it on every iteration. Process-wide. -> whether applied
    (False when disabled or off glibc, where nothing changes)."""
    if not enabled or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # no glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1


def fork_rng(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Leave the CPU (and this CUDA device's) random state as it was after the block."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def pseudo_label_params(cfg: Config) -> PseudoLabelParams:
    """The pipeline's settings (:class:`wsss.method.pseudo_labels.PseudoLabelParams`) from the config."""
    par = cfg.par
    return PseudoLabelParams(
        scales=tuple(float(s) for s in cfg.cam.scales), flip=cfg.cam.flip,
        bg_high=cfg.cam.bg_threshold_high, bg_low=cfg.cam.bg_threshold_low, bg_eval=cfg.cam.bg_threshold_eval,
        rw_bg_eval=cfg.afa.bg_threshold_eval, affinity_scale=cfg.afa.affinity_scale,
        radius=cfg.afa.radius, rw_power=cfg.afa.rw_power, rw_eps=cfg.afa.rw_eps,
        par=ParParams(tuple(int(d) for d in par.dilations), par.w1, par.w2, par.iterations, par.scale),
        ignore_index=cfg.data.ignore_index,
    )


__all__ = ["autocast", "autocast_dtype", "fork_rng", "pseudo_label_params", "unwrap"]
