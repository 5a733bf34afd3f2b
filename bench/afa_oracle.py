"""Where the AFA row loses to the PAR row: the learned affinity, or the random walk itself?

    python3 bench/afa_oracle.py CHECKPOINT [--split train] [--limit N] [section.key=value ...]

For every image of the split (ground-truth image labels, the image at its own size) one multi-scale
CAM pass (``wsss.method.pseudo_labels.cam_maps``) feeds four label maps, scored against the masks:

- PAR: the CAM probabilities refined by PAR (the `wsss pseudolabel --method par` row);
- AFA, learned affinity: the random walk with the network's affinity, then PAR (``--method afa``);
- AFA, oracle affinity: the same walk with the affinity the masks give on the same token grid
  (1 for token pairs of the same class, 0 otherwise, 0.5 where a token is ignored), then PAR;
- grid, no walk: the CAM probabilities taken to the same token grid and back with an identity
  affinity, then PAR (what the grid's resolution alone costs).

If the oracle row stays below PAR, no affinity the head could learn lets the AFA row pass PAR on this
data; if the learned row is far below the oracle, the head is the limit. Overrides change the
checkpoint's config for inference only (e.g. ``afa.radius=1``, ``cam.scales=[1.0,0.5,1.5,2.0]
afa.affinity_scale=2.0``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import load_average

ROWS = {"par": "PAR (CAM + PAR)", "afa": "AFA, learned affinity (+ PAR)", "oracle": "AFA, oracle affinity (+ PAR)",
        "grid": "grid, no walk (+ PAR)"}


def oracle_affinity(mask: torch.Tensor, grid: tuple[int, int], ignore_index: int) -> torch.Tensor:
    """mask long [H, W] -> [1, N, N]: 1 where two tokens (nearest-downsampled mask) share a class, else 0;
    0.5 for pairs with an ignored token."""
    tokens = F.interpolate(mask[None, None].float(), size=grid, mode="nearest").flatten().long()
    same = (tokens[:, None] == tokens[None, :]).float()
    ignored = tokens == ignore_index
    same[ignored, :] = 0.5
    same[:, ignored] = 0.5
    return same[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--split", default=None, help="default: the run's data.train_split")
    parser.add_argument("--limit", type=int, default=0, help="first N images (0 = all)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from wsss.data.datasets import build_dataset
    from wsss.data.transforms import denormalize
    from wsss.engine.metrics import ConfusionMatrix
    from wsss.engine.runner import load_for_inference
    from wsss.engine.runtime import autocast, pseudo_label_params
    from wsss.method.pseudo_labels import cam_maps, cam_probabilities

    network, cfg, _ = load_for_inference(args.checkpoint, args.overrides, None)
    split = args.split or cfg.data.train_split
    dataset = build_dataset(cfg.data, split, train=False, long_side=None)
    params = pseudo_label_params(cfg)
    count = len(dataset) if args.limit <= 0 else min(args.limit, len(dataset))
    matrices = {k: ConfusionMatrix(dataset.num_classes) for k in ROWS}

    def cam_fn(x: torch.Tensor, with_affinity: bool):
        cams, affinity = network.cam_forward(x, with_affinity)
        return cams.float(), None if affinity is None else affinity.float()

    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(count):
            item = dataset[i]
            image, label, mask = item["image"][None], item["label"][None].float(), item["mask"]
            with autocast("cpu", cfg.train.precision):
                maps = cam_maps(cam_fn, image, label, params, cfg.afa.affinity_scale)
            images01 = denormalize(image.float(), cfg.data.mean, cfg.data.std)
            n = maps.grid[0] * maps.grid[1]
            variants = {
                "par": (maps, "par"), "afa": (maps, "afa"),
                "oracle": (maps._replace(affinity=oracle_affinity(mask, maps.grid, params.ignore_index)), "afa"),
                "grid": (maps._replace(affinity=torch.eye(n)[None]), "afa"),
            }
            for key, (variant, output) in variants.items():
                probs = cam_probabilities(images01, variant, params, (output,), mask.shape)[output]
                matrices[key].update(probs[0].max(dim=0).indices, mask)
    seconds = time.perf_counter() - start
    h, w = maps.grid
    print(f"{args.checkpoint}: split '{split}', {count} images, affinity of the x{cfg.afa.affinity_scale} pass on "
          f"{h}x{w} tokens (last image), radius {cfg.afa.radius}, CAM scales {list(cfg.cam.scales)}; "
          f"{seconds:.0f} s, load average {load_average()}")
    for key, name in ROWS.items():
        print(f"  {name:<34}{matrices[key].compute()['miou']:>7.2f}")


if __name__ == "__main__":
    main()
