"""Classification-phase learning curve of the demo recipe on a dataset, with config overrides (issue 24).

Trains configs/demo.yaml from scratch for N iterations of classification only (``train.cam_iters`` = N, so
no seg / affinity work: about a minute for 600 iterations on 2 cores), then prints one line: the logged
training classification loss every few log intervals, the label prior's loss on train (predicting each
class's training frequency), and on val the classification loss, the prior's loss there, the macro mAP of
the image scores (chance: the positive rate) and the macro F1 at sigmoid > 0.5. A training loss that falls
while the val loss stays at or above the prior and the mAP at chance is memorisation, not learning.

    python3 bench/learning_curve.py DATA NAME 600 [key=value ...]
    python3 bench/learning_curve.py /tmp/shapes base 600 train.head_lr_mult=1

Each run appends a JSON line (name, overrides, the whole curve, the val figures) to OUT/curves.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def val_scores(checkpoint: str, cfg, split: str = "val") -> dict[str, float]:
    """Image-level scores of ``checkpoint`` on ``split`` -> {"loss", "prior_loss", "map", "positive_rate"}."""
    from sklearn.metrics import average_precision_score

    from wsss.data.datasets import build_dataset
    from wsss.engine.checkpoint import load_network
    from wsss.method.losses import classification_loss, label_prior_loss

    network, _, _ = load_network(checkpoint, "cpu")
    dataset = build_dataset(cfg.data, split, train=False, long_side=cfg.eval.long_side)
    logits, labels = [], []
    with torch.inference_mode():
        for i in range(len(dataset)):
            item = dataset[i]
            logits.append(network(item["image"][None], with_seg=False, with_affinity=False).cls_logits[0].float())
            labels.append(item["label"].float())
    x, y = torch.stack(logits), torch.stack(labels)
    ap = [average_precision_score(y[:, k].numpy(), x[:, k].numpy()) for k in range(y.shape[1]) if 0 < y[:, k].sum()]
    return {"loss": classification_loss(x, y).item(), "prior_loss": label_prior_loss(y), "map": float(np.mean(ap)),
            "positive_rate": float(y.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="dataset root (custom VOC layout, e.g. from wsss data shapes)")
    parser.add_argument("name", help="run name (OUT/NAME)")
    parser.add_argument("iterations", type=int)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--out", type=Path, default=Path("work_dirs/learning_curve"))
    args = parser.parse_args()

    from wsss.config import load_config
    from wsss.engine.demo import classifier_f1
    from wsss.engine.trainer import train
    from wsss.method.losses import label_prior_loss

    work_dir = args.out / args.name
    shutil.rmtree(work_dir, ignore_errors=True)
    n = args.iterations
    cfg = load_config("demo", [f"data.root={args.data}", f"train.work_dir={work_dir}", f"train.iterations={n}",
                               f"train.cam_iters={n}", f"train.afa_label_iter={n}", "train.val_interval=0",
                               "train.precision=fp32", "train.loggers=[]", *args.overrides])
    start = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["iteration"], r["losses"]["cls"]) for r in records if r.get("kind") == "train"]
    from wsss.data.datasets import build_dataset

    prior = label_prior_loss(build_dataset(cfg.data, cfg.data.train_split, train=False, long_side=None).image_labels)
    val = val_scores(summary["last_checkpoint"], cfg)
    f1 = classifier_f1(summary["last_checkpoint"], cfg, "val")["macro_f1"]
    shown = curve[:: max(1, len(curve) // 6)] + curve[-1:]
    print(f"{args.name}: train cls loss {' '.join(f'{i}:{v:.3f}' for i, v in shown)} (prior {prior:.3f}) | "
          f"val loss {val['loss']:.3f} (prior {val['prior_loss']:.3f}) mAP {val['map']:.3f} "
          f"(chance {val['positive_rate']:.3f}) F1 {f1:.3f} | {seconds:.0f} s, load {os.getloadavg()[0]:.2f} | "
          f"{' '.join(args.overrides) or 'recipe'}", flush=True)
    with open(args.out / "curves.jsonl", "a") as f:
        f.write(json.dumps({"name": args.name, "data": str(args.data), "overrides": args.overrides,
                            "curve": curve, "train_prior": prior, "val": val, "macro_f1": f1,
                            "seconds": seconds}) + "\n")


if __name__ == "__main__":
    main()
