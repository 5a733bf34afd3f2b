"""Reading weight files and loading them with one clear error when they do not fit.

Used by every backbone: a local ``.pth`` / ``.bin`` / ``.safetensors`` file, or a
file fetched from the Hugging Face hub by repository name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from wsss.errors import WsssError, first_line, require

# Containers some training scripts wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state")
_MAX_LISTED = 12


RANDOM_INIT = "none"  # model.pretrained value for random initialisation


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` or a torch file (unwrapping ``{"state_dict": ...}``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WsssError(f"weight file '{path}' does not exist (model.pretrained must be 'hub', 'none' or a file path)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any reader failure means the file is not a weight file
        raise WsssError(f"weight file '{path}' could not be read as a state dict: {exc}") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WsssError(f"weight file '{path}' does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def _listing(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return f"{title} ({len(keys)}): {shown}{more}"


def load_state_dict_checked(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module`` strictly; on any mismatch raise one WsssError listing
    the missing keys, the unexpected keys and the shape mismatches."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = [f"weights from {source} do not fit {type(module).__name__}"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if shapes:
            parts.append(_listing("shape mismatches (file vs model)", shapes))
        raise WsssError("; ".join(parts))
    module.load_state_dict(state, strict=True)


def download_from_hf(repo_id: str, filenames: tuple[str, ...]) -> Path:
    """Download the first of ``filenames`` that ``repo_id`` holds (or take it from the cache); one WsssError
    naming what to download and which key to set when that is impossible (offline, no access)."""
    import logging

    hub = require("huggingface_hub")
    errors = require("huggingface_hub.errors", "huggingface_hub")
    remote_missing = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    how = (f"download {filenames[0]} from https://huggingface.co/{repo_id} and set model.pretrained to its path, "
           "or model.pretrained=none to train from random weights")
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry warnings would bury our one line
    try:
        for filename in filenames:
            try:
                return Path(hub.hf_hub_download(repo_id, filename))
            except errors.LocalEntryNotFoundError:  # offline and not cached (checked before its base class)
                raise WsssError(f"could not get '{filename}' of '{repo_id}' from the Hugging Face hub (offline and "
                                f"not in the cache); {how}") from None
            except remote_missing:
                continue
            except Exception as exc:  # noqa: BLE001 -- network, auth, HTTP errors: all mean "no weights"
                first = first_line(exc)
                raise WsssError(f"could not get '{filename}' of '{repo_id}' from the Hugging Face hub ({first}); "
                                f"{how}") from None
    finally:
        hub_logger.setLevel(level)
    raise WsssError(f"Hugging Face repository '{repo_id}' holds none of {', '.join(filenames)}; {how}")
