"""``wsss export``: a self-contained model folder, loadable without the training state and without pickle.

    OUT_DIR/
      model.safetensors   the network's state dict (contiguous tensors, no shared storage); its
                          metadata holds the format tag, the iteration and the number of classes
      config.yaml         the resolved config of the run, model.pretrained: none
      classes.json        the C class names, background first (a JSON list)
      README.md           a model card: backbone, heads, dataset, training figures, versions, loading

    export_model("work_dirs/demo/last.pt", "models/demo")
    network, cfg, meta = load_exported("models/demo")        # what wsss.load_model uses

The folder is written next to OUT_DIR under a temporary name and renamed into place, so a killed
export leaves no half-written model. An existing OUT_DIR is replaced only when it is empty or an
earlier export (it holds nothing but the files above).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsss.config import Config
from wsss.errors import WsssError
from wsss.files import atomic_dir

EXPORT_FORMAT = "wsss-model-1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
CLASSES_FILE = "classes.json"
CARD_FILE = "README.md"
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE, CARD_FILE)


def is_export_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder holding the weights, config and class list of an export."""
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in (WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE))


def _plain_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with every tensor on the CPU, contiguous and owning its storage (what safetensors stores)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in network.state_dict().items()}


def _number(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _validation_rows(ckpt: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, value) rows of the validation figures a checkpoint holds: best_miou and any numeric entry of
    a ``val`` / ``val_miou`` / ``metrics`` dict (nested dicts flattened as a/b)."""
    rows = [("best validation seg mIoU", _number(ckpt.get("best_miou")))]

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((prefix, _number(value)))

    for key in ("val", "val_miou", "metrics"):
        if isinstance(ckpt.get(key), dict):
            walk(key, ckpt[key])
    return rows


def model_card(cfg: Config, class_names: Sequence[str], ckpt: dict[str, Any], source: str, out_name: str) -> str:
    """The README.md of an export (markdown)."""
    from wsss.engine.checkpoint import software_versions

    m, d, t = cfg.model, cfg.data, cfg.train
    iteration = int(ckpt.get("iteration", 0))
    rows = [
        ("backbone", f"`{m.backbone}`"),
        ("segmentation head", f"`{m.seg_head}`" + (f" ({m.mask_decoder.cross_attention} cross-attention)"
                                                  if m.seg_head == "mask_decoder" else "")),
        ("dataset", f"`{d.dataset}` (trained from `{d.root}`)"),
        ("classes", f"{len(class_names)}: " + ", ".join(f"`{n}`" for n in class_names)),
        ("iteration", f"{iteration} of {t.iterations}"),
        ("test input", f"RGB, long side resized to {cfg.eval.long_side}, normalized with mean {list(d.mean)} "
                       f"and std {list(d.std)}"),
        *_validation_rows(ckpt),
    ]
    trained = dict(ckpt.get("versions") or {})
    exported = software_versions()
    packages = sorted({*trained, *exported})
    lines = [
        f"# wsss model: {m.backbone} + {m.seg_head}, {d.dataset} ({len(class_names)} classes)",
        "",
        "Weakly-supervised semantic segmentation (AFA + PAR), trained from image-level labels with `wsss` "
        f"and exported by `wsss export` from `{source}`.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "mIoU figures are percentages, measured during training on the validation split "
        "(seg head, one scale, no CRF).",
        "",
        "## Software",
        "",
        "| package | training | export |",
        "|---|---|---|",
        *(f"| {p} | {trained.get(p, 'n/a')} | {exported.get(p, 'n/a')} |" for p in packages),
        "",
        "## Files",
        "",
        f"- `{WEIGHTS_FILE}`: the network's weights (safetensors, no pickle), format `{EXPORT_FORMAT}`",
        f"- `{CONFIG_FILE}`: the resolved configuration (`model.pretrained: none`)",
        f"- `{CLASSES_FILE}`: the class names, index 0 the background",
        "",
        "## Loading",
        "",
        "```python",
        "import wsss",
        "",
        f'model = wsss.load_model("{out_name}")  # on train.device of config.yaml',
        'labels = model.predict(["image.jpg"])  # uint8 [H, W] class indices per image',
        'probs = model.predict_proba(["image.jpg"])  # float32 [C, H, W] class probabilities',
        "```",
        "",
        "or from the command line: "
        f"`wsss predict --checkpoint {out_name} images/ --out predictions/`.",
        "Without wsss' loader:",
        "",
        "```python",
        "import json",
        "from safetensors.torch import load_file",
        "from wsss.config import load_config",
        "from wsss.models.network import build_network",
        "",
        f'cfg = load_config("{out_name}/{CONFIG_FILE}")',
        f'classes = json.load(open("{out_name}/{CLASSES_FILE}"))',
        "network = build_network(cfg, len(classes))",
        f'network.load_state_dict(load_file("{out_name}/{WEIGHTS_FILE}"))',
        "network.eval()",
        "```",
        "",
    ]
    return "\n".join(lines)


def _check_target_dir(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise WsssError(f"'{out_dir}' exists and is not a directory; expected a new, empty or earlier export folder")
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
    if others:
        raise WsssError(f"'{out_dir}' holds other files than an export ({', '.join(others[:3])}); choose a new or "
                        "empty directory")


def export_model(checkpoint: str | Path, out_dir: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Write the export folder of a training checkpoint (module docstring) -> ``out_dir``.

    ``overrides``: ``section.key=value`` strings applied to the stored config (e.g. ``eval.long_side=1024``);
    keys that change the architecture make the weights not fit, which is reported.
    """
    from safetensors.torch import save_file

    from wsss.engine.checkpoint import load_checkpoint, load_network
    from wsss.models.weights import RANDOM_INIT

    out_dir = Path(out_dir)
    _check_target_dir(out_dir)
    network, cfg, meta = load_network(checkpoint, "cpu", list(overrides))
    ckpt = load_checkpoint(checkpoint)  # the figures the checkpoint holds beyond load_network's meta
    ckpt.pop("model", None)
    cfg.model.pretrained = RANDOM_INIT  # the weights are in model.safetensors
    class_names = list(meta["class_names"]) or [f"class {c}" for c in range(meta["num_classes"])]
    metadata = {"format": "pt", "wsss_format": EXPORT_FORMAT, "num_classes": str(meta["num_classes"]),
                "iteration": str(meta["iteration"])}

    try:
        with atomic_dir(out_dir) as tmp:
            save_file(_plain_state_dict(network), str(tmp / WEIGHTS_FILE), metadata=metadata)
            (tmp / CONFIG_FILE).write_text(cfg.to_yaml())
            (tmp / CLASSES_FILE).write_text(json.dumps(class_names, indent=1) + "\n")
            (tmp / CARD_FILE).write_text(model_card(cfg, class_names, ckpt, Path(checkpoint).name, out_dir.name))
    except OSError as exc:
        raise WsssError(f"cannot write the export folder '{out_dir}': {exc.strerror or exc}") from None
    return out_dir


def load_exported(path: str | Path, overrides: Sequence[str] = ()) -> tuple[nn.Module, Config, dict[str, Any]]:
    """An export folder -> (network in eval mode on the CPU, cfg, meta), like ``load_network`` for checkpoints.

    meta: ``path``, ``iteration``, ``class_names``, ``num_classes``, ``format``. No pickle is read:
    safetensors, YAML and JSON only.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    from wsss.config import load_config
    from wsss.models.network import build_network
    from wsss.models.weights import RANDOM_INIT

    path = Path(path)
    if not is_export_dir(path):
        raise WsssError(f"'{path}' is not an exported model; expected a folder with {WEIGHTS_FILE}, {CONFIG_FILE} "
                        f"and {CLASSES_FILE} (written by `wsss export`)")
    try:
        class_names = json.loads((path / CLASSES_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise WsssError(f"'{path / CLASSES_FILE}' cannot be read ({exc}); expected a JSON list of class names"
                        ) from None
    if not isinstance(class_names, list) or len(class_names) < 2 or not all(isinstance(n, str) for n in class_names):
        raise WsssError(f"'{path / CLASSES_FILE}' must be a JSON list of at least two class names, background first")
    cfg = load_config(str(path / CONFIG_FILE), list(overrides))
    cfg.model.pretrained = RANDOM_INIT  # the weights come from model.safetensors
    weights = path / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WsssError(f"'{weights}' cannot be read as safetensors: {exc}") from None
    network = build_network(cfg, len(class_names))
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise WsssError(f"'{weights}' does not fit the network of '{path / CONFIG_FILE}' (model.backbone="
                        f"{cfg.model.backbone}, {len(class_names)} classes): {detail[:300]}") from None
    network.eval()
    meta = {"path": str(path), "iteration": int(metadata.get("iteration", 0)), "class_names": class_names,
            "num_classes": len(class_names), "format": metadata.get("wsss_format", "")}
    return network, cfg, meta


__all__ = ["CARD_FILE", "CLASSES_FILE", "CONFIG_FILE", "EXPORT_FILES", "EXPORT_FORMAT", "WEIGHTS_FILE",
           "export_model", "is_export_dir", "load_exported", "model_card"]
