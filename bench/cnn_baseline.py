"""A plain CNN classifier from scratch on a dataset: is the dataset learnable from its images in a budget at all?

Independent of the recipe (no transformer, no CAM, no WSSS): an eight-conv network (four blocks of two 3x3
conv + BatchNorm + ReLU, then 2x2 max pooling; 32, 64, 128, 256 channels), global max pooling and a linear
layer, trained for N iterations on the image-level labels with the recipe's loss (multilabel soft margin),
AdamW (lr 1e-3, weight decay 1e-4), batch 16 drawn at random, a random horizontal flip and a random multiple
of 90 degrees of rotation per batch (``--no-augment``: neither), bf16 autocast on CPU. Images are read by the
project's dataset code (``data.dataset=custom``, the split files, normalization) and resized to ``--size``
squared.

Every ``--every`` iterations and at the end it prints the mean training loss since the last line, and on val
the classification loss, the label prior's loss there (the training frequencies predicted for every image),
the macro F1 at sigmoid > 0.5 (``wsss.engine.metrics.ImageScores``) and the load. If this network does not
get the val loss below the prior within a budget, the dataset is not learnable from scratch in that budget by
a model with a convolution's inductive bias either: the recipe is not what holds it back.

    python3 bench/cnn_baseline.py DATA 2300
    python3 bench/cnn_baseline.py /tmp/shapes 2300 --every 500
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def load_split(data: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images [N, 3, size, size] (network-normalized), labels [N, K] multi-hot float."""
    from wsss.config import load_config
    from wsss.data.datasets import build_dataset

    cfg = load_config("demo", [f"data.root={data}"])
    dataset = build_dataset(cfg.data, split, train=False, long_side=None)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.cat([F.interpolate(it["image"][None].float(), size=(size, size), mode="bilinear",
                                      align_corners=False) for it in items])
    return images, torch.stack([it["label"].float() for it in items])


def network(num_classes: int) -> nn.Sequential:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.MaxPool2d(2)]

    widths = [3, 32, 64, 128, 256]
    layers = [m for c_in, c_out in zip(widths, widths[1:]) for m in block(c_in, c_out)]
    return nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(256, num_classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="dataset root (custom VOC layout, e.g. from wsss data shapes)")
    parser.add_argument("iterations", type=int)
    parser.add_argument("--size", type=int, default=128, help="image side fed to the network")
    parser.add_argument("--every", type=int, default=500, help="iterations between printed lines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="the random flip and multiple of 90 degrees per batch (--no-augment: none)")
    args = parser.parse_args()

    from wsss.engine.metrics import ImageScores
    from wsss.method.losses import classification_loss

    torch.manual_seed(args.seed)
    train_x, train_y = load_split(args.data, "train", args.size)
    val_x, val_y = load_split(args.data, "val", args.size)
    frequencies = train_y.mean(dim=0).tolist()
    model = network(train_y.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)

    def report(iteration: int, train_loss: float, seconds: float) -> None:
        model.eval()
        scores = ImageScores(val_y.shape[1])
        with torch.no_grad():
            for start in range(0, len(val_x), 50):
                scores.update(model(val_x[start:start + 50]), val_y[start:start + 50])
        model.train()
        val = scores.compute(prior_frequencies=frequencies)
        print(f"{iteration:>6}  train loss {train_loss:.3f}  val loss {val['loss']:.3f} (prior {val['prior_loss']:.3f})"
              f"  F1 {val['macro_f1']:.3f}  {seconds:.0f} s  load {os.getloadavg()[0]:.2f}", flush=True)

    print(f"{args.data}: {len(train_x)} train / {len(val_x)} val images, {train_y.shape[1]} classes, "
          f"{args.iterations} iterations of batch 16", flush=True)
    start, total, count = time.perf_counter(), 0.0, 0
    for iteration in range(1, args.iterations + 1):
        index = torch.randint(0, len(train_x), (16,))
        x, y = train_x[index], train_y[index]
        if args.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            x = torch.rot90(x, int(torch.randint(0, 4, ())), dims=(-2, -1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = classification_loss(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, count = total + loss.item(), count + 1
        if iteration % args.every == 0 or iteration == args.iterations:
            report(iteration, total / count, time.perf_counter() - start)
            total, count = 0.0, 0


if __name__ == "__main__":
    main()
