"""A training run's files and output: the work dir's rules (no two runs in one, ``--resume auto``, kept
interval checkpoints) and the rank-0 logger (tqdm bar, train.log, metrics.jsonl, TensorBoard, W&B).

    <train.work_dir>/config.yaml  versions.json  train.log  metrics.jsonl  last.pt  best.pt  iter_*.pt  tb/
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from torch import Tensor

from wsss.config import Config
from wsss.engine.checkpoint import LAST_NAME
from wsss.errors import WsssError
from wsss.logs import add_log_file, remove_log_file

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"


class RunLogger:
    """Rank-0 output: tqdm bar, train.log, metrics.jsonl, and the loggers of ``train.loggers``
    (TensorBoard, Weights & Biases). A no-op on other ranks.

    metrics.jsonl holds one JSON object per line: ``{"iteration", "kind": "train", "losses", "lr",
    "seconds", "iterations_per_s", "images_per_s"}`` per log interval and ``{"iteration", "kind": "val",
    "miou": {...}, "per_class_iou": {...}, "classifier": {"loss", "prior_loss", "macro_f1", "micro_f1",
    "per_class_f1"}}`` per validation (null for classes absent from both), and at most once per run
    ``{"iteration", "kind": "stalled", "split", "cls_loss", "prior_loss", "ratio", "stall_ratio", ...}`` when the
    classification loss has not left the label prior (``train.stall_check_iter``; ratio = cls_loss / prior_loss;
    split "train": the mean over the last ``window`` iterations, "val": on ``num_images`` validation images).
    """

    def __init__(self, work_dir: Path, enabled: bool, total: int, start: int, cfg: Config | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        self.wandb = None
        self.bar = None
        self.file = None
        self.metrics_file = None
        if not enabled:
            return
        from tqdm import tqdm

        loggers = cfg.train.loggers if cfg is not None else ["tensorboard"]
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(work_dir / "tb"), purge_step=start if start > 0 else None)
        if "wandb" in loggers:
            from wsss.errors import require

            wandb = require("wandb", "wandb", "wandb")
            # one W&B run per work dir: a resumed training continues it
            self.wandb = wandb.init(project=cfg.train.wandb_project, dir=str(work_dir), config=cfg.to_dict(),
                                    id=_wandb_run_id(work_dir), resume="allow", name=work_dir.name)
        self.file = add_log_file(work_dir / "train.log")  # every "wsss" log record of the run, this line's too
        self.metrics_file = open(work_dir / METRICS_NAME, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True, file=sys.stderr)

    def metrics(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl (NaN written as null: strict JSON)."""
        from wsss.engine.metrics import to_json

        if not self.enabled:
            return
        self.metrics_file.write(to_json(record, indent=None) + "\n")
        self.metrics_file.flush()

    def line(self, text: str) -> None:
        """One line to the console and train.log (through the logging set-up of :mod:`wsss.logs`)."""
        if self.enabled:
            logger.info(text)

    def warning(self, text: str) -> None:
        """One warning to the console and train.log."""
        if self.enabled:
            logger.warning(text)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def scalars(self, values: dict[str, float], step: int, postfix: dict[str, str] | None = None) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def image(self, tag: str, grid: Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.file is not None:
            remove_log_file(self.file)
        if self.metrics_file is not None:
            self.metrics_file.close()


def _wandb_run_id(work_dir: Path) -> str:
    """A stable W&B run id per work dir (kept in it), so that a resumed run continues the same W&B run."""
    import uuid

    path = work_dir / "wandb_id.txt"
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:16] + "\n")
    return path.read_text().strip()


def write_run_files(cfg: Config, work_dir: Path, versions: dict[str, str]) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.yaml").write_text(cfg.to_yaml())
    (work_dir / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


RUN_FILES = (LAST_NAME, "config.yaml", "train.log", METRICS_NAME)
CHECKPOINT_PATTERN = "iter_*.pt"


def resolve_resume(resume: Path | str | None, work_dir: Path | str) -> Path | None:
    """``--resume``: None, "auto" (the work dir's last.pt) or a checkpoint path -> the checkpoint path."""
    if resume is None:
        return None
    if str(resume) == "auto":
        path = Path(work_dir) / LAST_NAME
        if not path.is_file():
            raise WsssError(f"--resume auto: '{Path(work_dir)}' holds no {LAST_NAME} to resume from; start a new run "
                            "without --resume, or give the checkpoint's path")
        return path
    return Path(resume)


def check_work_dir(work_dir: Path, resuming: bool) -> None:
    """Refuse to start a new run in a work dir that holds one (its checkpoints and logs would be mixed)."""
    if resuming or not work_dir.is_dir():
        return
    found = [name for name in RUN_FILES if (work_dir / name).exists()]
    if found:
        raise WsssError(f"work dir '{work_dir}' already holds a run ({', '.join(found)}); continue it with "
                        "--resume auto, or choose another --work-dir (train.work_dir)")


def keep_interval_checkpoint(work_dir: Path, iteration: int, keep: int) -> None:
    """Keep the just-written last.pt as iter_<iteration>.pt (a hard link, else a copy) and delete all
    but the newest ``keep`` of them."""
    import shutil

    last, kept = work_dir / LAST_NAME, work_dir / f"iter_{iteration:07d}.pt"
    kept.unlink(missing_ok=True)
    try:
        os.link(last, kept)  # last.pt is replaced (os.replace), never rewritten: the link keeps this state
    except OSError:
        shutil.copy2(last, kept)
    for old in sorted(work_dir.glob(CHECKPOINT_PATTERN))[:-keep]:
        old.unlink(missing_ok=True)


__all__ = [
    "CHECKPOINT_PATTERN", "METRICS_NAME", "RUN_FILES", "RunLogger", "check_work_dir", "config_differences",
    "keep_interval_checkpoint", "resolve_resume", "write_run_files",
]
