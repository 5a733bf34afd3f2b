"""Seconds per AFA training iteration, split by phase, and peak memory.

    python bench/train_step.py                                  # mit_b1, batch 2, crop 320, CPU, fp32 and bf16
    python bench/train_step.py --device cuda --crop 512 --precisions fp32 bf16 fp16
    python bench/train_step.py --config demo --backbone mit_tiny --crop 128 --batch 8

Random initialisation, a fixed synthetic batch (random images, 1-2 classes per image, a
padded valid box), iteration index past ``train.afa_label_iter`` so every phase of the full
path runs: network forward, multi-scale CAM, PAR pseudo labels (CAM and AFA branch),
affinity labels + random walk, losses, backward, optimizer. Phases come from the
trainer's own step (``wsss.engine.trainer.train_step`` with a ``PhaseTimer``; CUDA is
synchronised at phase boundaries only because a timer is given). Median over
``--iters`` iterations after ``--warmup``. Each precision runs in its own process so its
peak memory (RSS on CPU, max allocated on CUDA) is its own.

``--reference`` also times a reference-style iteration, built from the same method
functions the way the published AFA training loop does it, fp32: the multi-scale CAM
runs the whole network (segmentation head and affinity head at every scale), the pseudo
labels and the random walk use all K classes, AdamW is the per-parameter loop. (The
published encoder also computes explicit attention in every block and its PAR is an
unfold-based module; neither is reproduced, so this baseline is faster than the original.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from _common import TRAIN_PHASES as PHASES

NETWORK_PHASES = ("forward", "multiscale_cam", "backward", "optimizer")


def reference_step(network, batch, cfg, optimizer, scheduler, device, timer) -> None:
    """The published loop's structure (see the module docstring), timed by phase."""
    import torch

    from wsss.data.transforms import denormalize
    from wsss.engine.runtime import pseudo_label_params
    from wsss.method.affinity import affinity_labels, label_to_grid
    from wsss.method.losses import affinity_loss, balanced_seg_loss, classification_loss
    from wsss.method.pseudo_labels import cam_maps, pseudo_labels

    images, labels, box = (batch[k].to(device) for k in ("image", "label", "valid_box"))
    params = pseudo_label_params(cfg)
    with timer.phase("forward"):
        out = network(images)

    def full_forward(x, with_affinity):  # the whole network at every scale, as the published loop
        o = network(x, with_seg=True, with_affinity=True)
        return o.cams, o.affinity

    with torch.no_grad():
        with timer.phase("multiscale_cam"):
            maps = cam_maps(full_forward, images, labels, params, cfg.afa.affinity_scale)  # all K classes
        images01 = denormalize(images, cfg.data.mean, cfg.data.std)
        labels_out = pseudo_labels(images01, maps, params, box, with_afa=True, phase=timer.phase)
        with timer.phase("affinity_random_walk"):
            grid = label_to_grid(labels_out.label, out.cams.shape[-2:])
            aff_target = affinity_labels(grid, cfg.afa.radius, cfg.data.ignore_index)
    with timer.phase("losses"):
        tc = cfg.train
        loss = (tc.cls_loss_weight * classification_loss(out.cls_logits, labels)
                + tc.seg_loss_weight * balanced_seg_loss(out.seg_logits, labels_out.afa_label, cfg.data.ignore_index)
                + tc.aff_loss_weight * affinity_loss(out.affinity, aff_target))
    with timer.phase("backward"):
        loss.backward()
    with timer.phase("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()


def run_one(args: argparse.Namespace, precision: str, reference: bool = False) -> dict:
    import torch
    from _common import bench_config, build_training, peak_rss, synthetic_batch, timed_step

    from wsss.engine.trainer import PhaseTimer, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench_config(args.config, args.backbone, args.crop, args.batch, precision, args.device, args.overrides)
    device = torch.device(args.device)
    network, optimizer, scheduler, scaler = build_training(cfg, args.classes + 1, device, 0, reference)
    batch = synthetic_batch(args.batch, args.crop, args.classes)
    iteration = max(cfg.train.afa_label_iter, cfg.train.cam_iters)
    timer = PhaseTimer(device)

    def step() -> None:
        if reference:
            reference_step(network, batch, cfg, optimizer, scheduler, device, timer)
        else:
            train_step(network, batch, iteration, cfg, optimizer, scheduler, scaler, device, timer)

    rows = []
    for i in range(args.warmup + args.iters):
        row = timed_step(step, timer, device.type == "cuda")
        if i >= args.warmup:
            rows.append({p: row.get(p, 0.0) for p in ("total", "cpu", *PHASES)})
    median = {key: statistics.median(r[key] for r in rows) for key in ("total", "cpu", *PHASES)}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        peak_kind = "GPU max allocated"
    else:
        peak = peak_rss() / 2**30
        peak_kind = "peak RSS"
    return {"precision": precision + (" reference" if reference else ""), "median": median, "peak_gib": peak,
            "peak_kind": peak_kind,
            "threads": torch.get_num_threads(), "iters": args.iters}


def report(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"AFA train step: {args.backbone}, batch {args.batch}, crop {args.crop}, {args.device}, random init, "
             f"full path (past afa_label_iter); median of {args.iters} iterations after {args.warmup} warm-up; "
             f"{results[0]['threads']} threads"]
    header = f"{'phase':<22}" + "".join(f"{r['precision']:>18}" for r in results)
    lines += [header, "-" * len(header)]
    for phase in PHASES:
        cells = "".join(f"{r['median'][phase]:>12.3f} s {100 * r['median'][phase] / r['median']['total']:>3.0f}%"
                        for r in results)
        lines.append(f"{phase:<22}{cells}")
    lines.append("-" * len(header))
    lines.append(f"{'iteration (median)':<22}" + "".join(f"{r['median']['total']:>14.3f} s    " for r in results))
    lines.append(f"{'  CPU time, all threads':<22}" + "".join(f"{r['median']['cpu']:>14.3f} s    " for r in results))
    non_net = [sum(r["median"][p] for p in PHASES if p not in NETWORK_PHASES) for r in results]
    lines.append(f"{'non-network phases':<22}" + "".join(
        f"{v:>12.3f} s {100 * v / r['median']['total']:>3.0f}%" for v, r in zip(non_net, results)))
    lines.append(f"{results[0]['peak_kind']:<22}" + "".join(f"{r['peak_gib']:>14.2f} GiB  " for r in results))
    lines.append("non-network = PAR pseudo labels + affinity labels / random walk + losses (the multi-scale CAM "
                 "phase is network passes plus resizing)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="voc")
    parser.add_argument("--backbone", default="mit_b1")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--classes", type=int, default=20, help="foreground classes K")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--reference", action="store_true", help="also time the reference-style iteration (fp32)")
    parser.add_argument("--json", action="store_true", help="(internal) run one precision, print JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. cam.scales=[1.0,0.5]")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(run_one(args, args.precisions[0], args.reference)))
        return
    results = []
    runs = [(p, False) for p in args.precisions] + ([("fp32", True)] if args.reference else [])
    for precision, reference in runs:
        cmd = [sys.executable, __file__, "--json", "--precisions", precision, "--config", args.config,
               *(["--reference"] if reference else []),
               "--backbone", args.backbone, "--batch", str(args.batch), "--crop", str(args.crop),
               "--classes", str(args.classes), "--device", args.device, "--iters", str(args.iters),
               "--warmup", str(args.warmup), "--threads", str(args.threads), *args.overrides]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{precision} run failed:\n{out.stderr}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(report(results, args))


if __name__ == "__main__":
    main()
