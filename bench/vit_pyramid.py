"""The seg head on a plain ViT with and without the feature pyramid (model.seg_pyramid), on the demo data.

No registry package here ships ViT weights, so the script makes some: it pretrains
``timm:deit_tiny_patch16_224`` as an image classifier on *another* demo variant (classes10: ten
digit classes, classification only), writes the backbone's timm state dict to a file, then runs the
demo (``wsss.engine.demo.run_demo``, what ``wsss demo`` runs) on the default demo data from that
file, once per ``model.seg_pyramid`` value, with the same seed. It prints, per run, the CAM / PAR /
AFA pseudo-label mIoU (train), the seg head's mIoU (val), seg / PAR, the classifier's F1, the affinity
loss at the end and the wall time, each with the load average.

    python3 bench/vit_pyramid.py                         # ~20 min on 2 cores: pretrain, then none and auto
    python3 bench/vit_pyramid.py --out /tmp/vp --pretrain-iters 300 --iterations 200   # a quick look

Trailing ``key=value`` arguments are config overrides of both demo runs.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from _common import load_average, loss_summary

BACKBONE = "timm:deit_tiny_patch16_224"


def pretrain(data_dir: Path, work_dir: Path, iterations: int) -> tuple[Path, dict]:
    """Classification-only training of BACKBONE on ``data_dir`` -> (timm state-dict file, facts)."""
    import torch

    from wsss.config import load_config
    from wsss.engine.checkpoint import load_network
    from wsss.engine.demo import classifier_f1
    from wsss.engine.trainer import train

    shutil.rmtree(work_dir, ignore_errors=True)
    cfg = load_config("demo", [f"data.root={data_dir}", f"train.work_dir={work_dir}", f"model.backbone={BACKBONE}",
                               "model.conv_stem=0",  # the demo's stem is MiT-only
                               f"train.iterations={iterations}", f"train.cam_iters={iterations}",
                               f"train.afa_label_iter={iterations}", "train.val_interval=0",
                               f"train.ckpt_interval={iterations}", "train.image_log_interval=0",
                               "train.precision=bf16"])
    start = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - start
    checkpoint = Path(summary["last_checkpoint"])
    network, _, _ = load_network(checkpoint)
    weights = work_dir / "deit_tiny_pretrained.pth"
    torch.save(network.backbone.model.state_dict(), weights)  # timm's own key names
    f1 = classifier_f1(checkpoint, cfg, "val")["macro_f1"]
    return weights, {"seconds": seconds, "val_macro_f1": f1, "load": load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("work_dirs/vit_pyramid"))
    parser.add_argument("--pretrain-iters", type=int, default=1500)
    parser.add_argument("--iterations", type=int, default=1300, help="train.iterations of the demo runs")
    parser.add_argument("--lr", type=float, default=1e-4, help="train.lr of the demo runs (fine-tuning)")
    parser.add_argument("--pyramids", nargs="+", default=["none", "auto"], choices=["none", "auto", "vit"])
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    from wsss.data.demo import build_demo_dataset, demo_variant
    from wsss.engine.demo import run_demo

    print(f"building data in {args.out / 'data'} (load average {load_average()})", flush=True)
    source = build_demo_dataset(args.out / "data" / "classes10", demo_variant("classes10"))
    target = build_demo_dataset(args.out / "data" / "default", demo_variant("default"))
    weights, facts = pretrain(source, args.out / "pretrain", args.pretrain_iters)
    print(f"pretrained {BACKBONE} on classes10, classification only: {args.pretrain_iters} iterations in "
          f"{facts['seconds']:.0f} s, val macro F1 {facts['val_macro_f1']:.3f} (load average {facts['load']}); "
          f"weights {weights}", flush=True)
    rows = []
    for pyramid in args.pyramids:
        work_dir = args.out / f"demo_{pyramid}"
        shutil.rmtree(work_dir, ignore_errors=True)
        before = load_average()
        start = time.perf_counter()
        result = run_demo(work_dir=work_dir, data_dir=target, pretrained=str(weights),
                          overrides=[f"model.backbone={BACKBONE}", f"model.seg_pyramid={pyramid}",
                                     f"train.iterations={args.iterations}", f"train.lr={args.lr}",
                                     "train.precision=bf16", *args.overrides])
        r = result["rows"]
        aff = loss_summary(work_dir).get("aff")
        rows.append((pyramid, r["cam"], r["par"], r["afa"], r["seg"], r["seg"] / r["par"],
                     result["classifier"]["macro_f1"], aff["last"][1] if aff else None, time.perf_counter() - start,
                     f"{before} -> {load_average()}"))
        print(f"model.seg_pyramid={pyramid}: done in {rows[-1][8]:.0f} s", flush=True)
    print(f"\n{BACKBONE} from our classes10 weights on the default demo data; mIoU %: CAM / PAR / AFA on train, "
          "seg on val")
    print(f"{'seg_pyramid':<12}{'CAM':>7}{'PAR':>7}{'AFA':>7}{'seg':>7}{'seg/PAR':>9}{'F1':>7}{'aff loss':>10}"
          f"{'wall s':>8}  load average")
    for name, cam, par, afa, seg, ratio, f1, aff, wall, load in rows:
        aff_text = f"{aff:.4f}" if aff is not None else "-"
        print(f"{name:<12}{cam:>7.1f}{par:>7.1f}{afa:>7.1f}{seg:>7.1f}{ratio:>9.2f}{f1:>7.3f}{aff_text:>10}"
              f"{wall:>8.0f}  {load}")


if __name__ == "__main__":
    main()
