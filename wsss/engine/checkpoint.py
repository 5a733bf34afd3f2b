"""Training checkpoints: atomic writes, exact-resume state, and loading a network for inference.

A checkpoint is one ``torch.save`` file holding a dict::

    config       Config.to_dict() of the run
    model        state_dict of the network (never wrapped in DistributedDataParallel)
    optimizer    optimizer.state_dict()
    scheduler    LambdaLR.state_dict()
    scaler       GradScaler.state_dict() ({} unless train.precision=fp16)
    iteration    optimizer steps done
    rng          {"torch", "cuda", "numpy", "python"} of rank 0, plus "per_rank": one such
                 dict per rank of a distributed run
    data         {"epoch", "batch": batches of that epoch consumed, "batches_per_epoch"}
    class_names, num_classes, best_miou, versions, format
    stall_warned iteration of the run's stalled-learning warning, or None (a resumed run does not repeat it)

Everything in it is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs on load). Files are
written to a temporary file in the same directory, flushed, fsynced and renamed
over the target (``os.replace``): a run killed at any moment leaves either the
previous or the new checkpoint, never a torn one.

    network, cfg, meta = load_network("work_dirs/demo/last.pt", "cpu")
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss.config import Config, apply_overrides, config_from_dict
from wsss.errors import ConfigError, WsssError, first_line
from wsss.files import atomic_write
from wsss.models.weights import RANDOM_INIT

CHECKPOINT_FORMAT = "wsss-checkpoint-1"
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"
_REQUIRED_KEYS = ("config", "model", "num_classes")


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator a training step may draw from (plain values and tensors)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only where the same GPUs exist)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------- versions


def software_versions() -> dict[str, str]:
    """python, torch, torchvision, timm, wsss versions and the git commit of the source (if any)."""
    import platform
    import subprocess
    from importlib import metadata

    versions = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for package in ("torchvision", "timm", "wsss"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    source = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            versions["git_commit"] = commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return versions


# --------------------------------------------------------------------------- files


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path`` (durable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), durable=True)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint dict (see the module docstring) atomically."""
    return atomic_torch_save({"format": CHECKPOINT_FORMAT, **state}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a wsss checkpoint; WsssError for a missing, unreadable or foreign file."""
    path = Path(path)
    if not path.exists():
        raise WsssError(f"checkpoint '{path}' does not exist")
    if not path.is_file():
        raise WsssError(f"checkpoint '{path}' is not a file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):  # a torch file, but with pickled Python objects
            reason = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
            raise WsssError(f"'{path}' is not a wsss checkpoint: it holds Python objects beyond tensors and plain "
                            f"values, which are not loaded for safety ({reason[:200]})") from None
        raise WsssError(f"checkpoint '{path}' cannot be read (truncated or not a torch file?): {exc}") from None
    except Exception as exc:  # noqa: BLE001 -- a damaged file fails in many ways inside the unpickler
        first = first_line(exc)
        raise WsssError(f"checkpoint '{path}' cannot be read (truncated or not a torch file?): {first}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED_KEYS):
        raise WsssError(
            f"'{path}' is not a wsss checkpoint (expected a dict with {', '.join(_REQUIRED_KEYS)}, as written by "
            "`wsss train`)")
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], overrides: list[str] | None = None, source: str = "") -> Config:
    """The run's Config from a checkpoint dict, with ``key=value`` overrides applied.

    A checkpoint written before ``model.seg_pyramid`` existed had no pyramid: its config reads as "none"
    (the default "auto" would add one to a ViT network and its weights would not fit)."""
    saved = ckpt["config"]
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict) and "seg_pyramid" not in saved["model"]:
        saved = {**saved, "model": {**saved["model"], "seg_pyramid": "none"}}
    try:
        cfg = config_from_dict(saved)
    except ConfigError as exc:
        raise WsssError(f"checkpoint {source or ''} holds a config this version cannot read: {exc}") from None
    return apply_overrides(cfg, list(overrides or []))


def load_network(
    path: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None,
) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """A trained network for inference -> (network in eval mode on ``device``, cfg, meta).

    ``overrides`` change the run's config (e.g. ``eval.scales=[1.0]``); model keys that change the
    architecture make the weights not fit, which is reported. ``meta`` holds ``iteration``,
    ``class_names``, ``num_classes``, ``best_miou``, ``versions`` and ``path``.
    """
    from wsss.models.network import build_network

    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, overrides, f"'{path}'")
    cfg.model.pretrained = RANDOM_INIT  # the weights come from the checkpoint: no download, no file needed
    num_classes = int(ckpt["num_classes"])
    network = build_network(cfg, num_classes)
    try:
        network.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else ""
        raise WsssError(
            f"checkpoint '{path}' does not fit the network of its config (model.backbone={cfg.model.backbone}, "
            f"model.seg_head={cfg.model.seg_head}; changed by an override?): {detail[:300]}") from None
    network.to(device).eval()
    meta = {
        "path": str(path),
        "iteration": int(ckpt.get("iteration", 0)),
        "class_names": list(ckpt.get("class_names") or []),
        "num_classes": num_classes,
        "best_miou": ckpt.get("best_miou"),
        "versions": dict(ckpt.get("versions") or {}),
    }
    return network, cfg, meta


__all__ = [
    "BEST_NAME", "CHECKPOINT_FORMAT", "LAST_NAME", "atomic_torch_save", "capture_rng_state", "checkpoint_config",
    "load_checkpoint", "load_network", "restore_rng_state", "save_checkpoint", "software_versions",
]
