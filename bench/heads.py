"""Segmentation-head cost: forward + backward time and peak memory per head and precision.

Compares the SegFormer head with the mask decoder's four cross-attention variants
(standard | masked | kmeans | soft) on a batch of 2 x 3 x 320 x 320 through
``build_network`` (``cfg.model.seg_head`` / ``cfg.model.mask_decoder.cross_attention`` set),
in fp32 and bf16 autocast; median over several timed runs after warm-up. Every case runs in
a fresh child process so its peak memory is its own (CUDA: max_memory_allocated; CPU: peak
resident set size of the child, which includes the Python / torch baseline).

    python3 bench/heads.py                      # full network (backbone mit_b1), all cases
    python3 bench/heads.py --head-only          # the heads alone on mit_b1-shaped features
    python3 bench/heads.py --heads soft masked --precisions bf16 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from _common import peak_memory, run_in_child, time_runs

HEADS = ["segformer", "standard", "masked", "kmeans", "soft"]
# mit_b1 stage widths and the AFA strides 4, 2, 2, 1 (stage 4 stays at 1/16)
MIT_B1_CHANNELS = [64, 128, 320, 512]
FEATURE_STRIDES = [4, 8, 16, 16]


def _configure(head: str, backbone: str):
    from wsss.config import load_config

    overrides = [f"model.backbone={backbone}"]
    if head == "segformer":
        overrides.append("model.seg_head=segformer")
    else:
        overrides += ["model.seg_head=mask_decoder", f"model.mask_decoder.cross_attention={head}"]
    return load_config(None, overrides)


def _build(head: str, args, device: torch.device):
    """-> (module, make_inputs() -> args tuple, run(module, inputs) -> list of output tensors)."""
    cfg = _configure(head, args.backbone)
    num_classes = args.num_classes
    b, s = args.batch, args.size
    if args.head_only:
        from wsss.models.network import build_seg_head

        module = build_seg_head(cfg, MIT_B1_CHANNELS, num_classes)

        def make_inputs():
            return ([torch.randn(b, c, s // r, s // r, device=device, requires_grad=True)
                     for c, r in zip(MIT_B1_CHANNELS, FEATURE_STRIDES)],)

        def run(m, inputs):
            out = m(*inputs)
            seg, aux = out if isinstance(out, tuple) else (out, [])
            return [seg, *aux]
    else:
        from wsss.models.network import build_network

        module = build_network(cfg, num_classes)

        def make_inputs():
            return (torch.randn(b, 3, s, s, device=device),)

        def run(m, inputs):
            out = m(inputs[0], with_seg=True, with_affinity=False)
            return [out.seg_logits, *out.seg_aux, out.cls_logits]
    return module.to(device).train(), make_inputs, run


def _case(head: str, precision: str, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    module, make_inputs, run = _build(head, args, device)
    inputs = make_inputs()
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = run(module, inputs)
            loss = sum(t.float().mean() for t in outputs)
        loss.backward()
        module.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = time_runs(step, 0, args.repeats, cuda)
    peak = peak_memory(cuda)
    params = sum(p.numel() for p in module.parameters())
    return {"head": head, "precision": precision, "median_ms": 1000 * statistics.median(times),
            "min_ms": 1000 * min(times), "peak_mib": peak / 2**20, "params_m": params / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", nargs="+", default=HEADS, choices=HEADS)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--backbone", default="mit_b1")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--head-only", action="store_true", help="time the heads on mit_b1-shaped features")
    parser.add_argument("--json", action="store_true", help="print one JSON object per case")
    args = parser.parse_args()

    where = "heads only, mit_b1-shaped features" if args.head_only else f"network {args.backbone}"
    print(f"# {where}; batch {args.batch}x3x{args.size}x{args.size}; device {args.device}; "
          f"median of {args.repeats} after {args.warmup} warm-up; torch {torch.__version__}")
    if not args.json:
        print(f"{'head':<10} {'precision':<9} {'median ms':>10} {'min ms':>9} {'peak MiB':>9} {'params M':>9}")
    for head in args.heads:
        for precision in args.precisions:
            result = run_in_child(_case, {"head": head, "precision": precision}, head, precision, args)
            if args.json:
                print(json.dumps(result))
            elif "error" in result:
                print(f"{head:<10} {precision:<9} error: {result['error']}")
            else:
                print(f"{head:<10} {precision:<9} {result['median_ms']:>10.1f} {result['min_ms']:>9.1f} "
                      f"{result['peak_mib']:>9.0f} {result['params_m']:>9.2f}")


if __name__ == "__main__":
    main()
