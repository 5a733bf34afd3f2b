"""The official ToCo losses and crop mask against ``wsss.method.toco``, side by side on identical inputs.

    python3 bench/toco_vs_official.py --official-dir /tmp/toco_official
    python3 bench/toco_vs_official.py --official-dir /tmp/toco_official --repeats 20 --threads 2

``--official-dir`` is a checkout of https://github.com/rulixiang/ToCo (not vendored, not a dependency: its
``model/losses.py`` and ``utils/camutils.py`` are imported from there at run time). ``model/losses.py``
imports the compiled ``bilateralfilter`` extension at module level for its dense-energy loss, which is not
compared here: an empty stand-in module is registered under that name before the import.

Compared, each on random inputs of the VOC recipe's shapes (448 crop, ViT-B/16: a 28 x 28 token grid, 768
channels, batch 2, 20 classes; CTC: 10 crops, 1024-dimensional projections, temperature 0.5) and with
seeds fixed:

- the pair labels (``label_to_aff_mask`` / ``token_pair_labels``) of an auxiliary pseudo label with
  background, two classes and ignored tokens, and the uncertain-region mask (``cam_to_roi_mask2`` /
  ``uncertain_region_mask``, thresholds 0.7 / 0.25): equal element by element;
- the 8 local crops of 96 pixels and their flags (``crop_from_roi_neg`` / ``local_crops``) at the corners the
  official code draws (its global-RNG draw replayed for ours; ``sample_crop_corners``, ours, draws the same
  distribution with another stream): crops and flags equal;
- the PTC loss (``get_masked_ptc_loss`` / ``patch_token_contrast_loss``) and its gradient for the tokens;
- the CTC loss (``CTCLoss_neg`` / ``class_token_contrast_loss``) and its gradients for student and teacher,
  with some local crops flagged negative, none, or all;
- the projection head (``CTCHead`` of ``model/model_seg_neg.py``, taken out of that file alone, against
  ``wsss.models.toco_heads.ProjectionHead`` with its weights): output and gradients, and the teacher head
  after a student step and three EMA updates (``_EMA_update_encoder_teacher`` / ``ema_update``, m = 0.9).

Losses and gradients are "same" within rtol 1e-5 / atol 1e-6 (float32); the script prints one line per
quantity with the largest absolute difference, then the median time of each side's forward + backward over
``--repeats`` runs and the load average. Exit status 1 if any quantity differs.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import warnings
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsss.models.toco_heads import ProjectionHead, ema_update  # noqa: E402

from wsss.method.toco import (  # noqa: E402
    class_token_contrast_loss,
    local_crops,
    patch_token_contrast_loss,
    token_pair_labels,
    uncertain_region_mask,
)

IGNORE = 255


def load_official_head(official_dir: Path) -> tuple[type, object]:
    """``CTCHead`` and ``network._EMA_update_encoder_teacher`` of the official ``model/model_seg_neg.py``, taken
    out of the file alone (importing it would build its ViT backbones and decoders)."""
    path = official_dir / "model" / "model_seg_neg.py"
    if not path.is_file():
        sys.exit(f"error: --official-dir {official_dir} is not a checkout of rulixiang/ToCo: missing {path}")
    tree = ast.parse(path.read_text())
    head = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CTCHead")
    network = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "network")
    ema = next(n for n in network.body if isinstance(n, ast.FunctionDef) and n.name == "_EMA_update_encoder_teacher")
    namespace = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional}
    exec(compile(ast.Module(body=[head, ema], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["CTCHead"], namespace["_EMA_update_encoder_teacher"]


def load_official(official_dir: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """The official ``model/losses.py`` and ``utils/camutils.py`` as modules; exits with a message if absent."""
    files = [official_dir / "model" / "losses.py", official_dir / "utils" / "camutils.py"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        sys.exit(f"error: --official-dir {official_dir} is not a checkout of rulixiang/ToCo: "
                 f"missing {', '.join(missing)}")
    sys.modules.setdefault("bilateralfilter", types.SimpleNamespace(bilateralfilter=None, bilateralfilter_batch=None))
    modules = []
    for name, path in zip(("toco_losses", "toco_camutils"), files):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


def official_corners(region: torch.Tensor, num_crops: int, size: int) -> torch.Tensor:
    """The official corner draw of one image, replayed: candidates in row-major order, one randperm."""
    margin = size // 2
    inner = region[margin : region.shape[0] - margin, margin : region.shape[1] - margin]
    candidates = (inner <= 1).nonzero()
    if candidates.shape[0] < num_crops:
        candidates = (inner >= 0).nonzero()
    return candidates[torch.randperm(candidates.shape[0])[:num_crops]]


def compare(name: str, a: torch.Tensor, b: torch.Tensor, exact: bool = False) -> bool:
    a, b = a.detach(), b.detach()
    if exact:
        same = a.shape == b.shape and bool((a.long() == b.long()).all())
        diff = "equal" if same else f"{int((a.long() != b.long()).sum())} elements differ"
    else:
        same = a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)
        diff = (f"max |diff| {(a.double() - b.double()).abs().max().item():.2e}" if a.shape == b.shape
                else "shapes differ")
    print(f"{name:<44} {'same' if same else 'DIFFERENT':<10} {diff}", flush=True)
    return same


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-dir", type=Path, required=True, help="checkout of rulixiang/ToCo")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    losses, camutils = load_official(args.official_dir)
    generator = torch.Generator().manual_seed(args.seed)
    ok = True

    # Pair labels from an auxiliary pseudo label: background, classes 3 and 7, ignored tokens.
    b, c, h, w, k = 2, 768, 28, 28, 20
    grid = torch.tensor([0, 3, 7, IGNORE])[torch.randint(0, 4, (b, h, w), generator=generator)]
    ok &= compare("pair labels (label_to_aff_mask)", camutils.label_to_aff_mask(grid.clone(), IGNORE),
                  token_pair_labels(grid), exact=True)

    cams = torch.rand(b, k, h * 16, w * 16, generator=generator)
    labels = (torch.rand(b, k, generator=generator) < 0.15).float()
    labels[:, 0] = 1
    ok &= compare("uncertain-region mask (cam_to_roi_mask2)",
                  camutils.cam_to_roi_mask2(cams, labels, hig_thre=0.7, low_thre=0.25),
                  uncertain_region_mask(cams, labels, high=0.7, low=0.25), exact=True)

    # Local crops: the official function draws its corners with the global RNG (one randperm per image over
    # the candidates in row-major order); the same draw, replayed, gives ours the same corners.
    # CAMs fading to 0 towards the left edge: certain background there, so some crops are negative.
    ramp = torch.linspace(0, 1, w * 16) ** 2
    region = uncertain_region_mask(cams * ramp, labels, high=0.7, low=0.25)
    view = torch.rand(b, 3, h * 16, w * 16, generator=generator)
    n_local, size, seed = 8, 96, args.seed + 1
    torch.manual_seed(seed)
    official_crops, official_flags = camutils.crop_from_roi_neg(view, region, crop_num=n_local, crop_size=size)
    torch.manual_seed(seed)
    corners = torch.stack([official_corners(region[i], n_local, size) for i in range(b)])
    crops, flags = local_crops(view, region, corners, size)
    ok &= compare("local crops (crop_from_roi_neg)", torch.stack(official_crops), crops)
    ok &= compare("local crop flags", official_flags, flags, exact=True)
    print(f"{'':<44} ({int((flags == 0).sum())} of {b * n_local} local crops negative)")

    tokens = torch.randn(b, c, h, w, generator=generator)
    pair_labels = token_pair_labels(grid)

    def ptc(fn):
        x = tokens.clone().requires_grad_(True)
        loss = fn(x, pair_labels)
        loss.backward()
        return loss, x.grad

    official_ptc, ours_ptc = ptc(losses.get_masked_ptc_loss), ptc(patch_token_contrast_loss)
    ok &= compare("PTC loss", official_ptc[0], ours_ptc[0])
    ok &= compare("PTC d loss / d tokens", official_ptc[1], ours_ptc[1])

    n_crops, dim, temperature = 10, 1024, 0.5
    student = torch.nn.functional.normalize(torch.randn(n_crops * b, dim, generator=generator), dim=-1) * 2
    teacher = torch.nn.functional.normalize(torch.randn(2 * b, dim, generator=generator), dim=-1) * 2
    some = torch.ones(b, n_crops)
    some[0, [3, 5, 6]] = 0
    some[1, [2, 9]] = 0
    none_negative = torch.ones(b, n_crops)
    all_negative = torch.ones(b, n_crops)
    all_negative[:, 2:] = 0
    official_ctc = losses.CTCLoss_neg(ncrops=n_crops, temp=temperature)

    def ctc(fn, flags):
        s, t = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
        loss = fn(s, t, flags)
        loss.backward()
        return loss, s.grad, t.grad

    for case, flags in (("some negative", some), ("no negative", none_negative), ("all local negative", all_negative)):
        a = ctc(official_ctc, flags)
        o = ctc(lambda s, t, f: class_token_contrast_loss(s, t, f, temperature), flags)
        ok &= compare(f"CTC loss, {case}", a[0], o[0])
        ok &= compare(f"CTC d loss / d student, {case}", a[1], o[1])
        ok &= compare(f"CTC d loss / d teacher, {case}", a[2], o[2])

    # The projection heads: the official CTCHead's weights loaded into ours, then forward, gradients, and
    # three EMA updates of the teacher (momentum 0.9) after a gradient step of the student.
    CTCHead, official_ema = load_official_head(args.official_dir)
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm, as the official code uses it
        official_heads = [CTCHead(in_dim=768, out_dim=1024) for _ in range(2)]
    official_heads[1].load_state_dict(official_heads[0].state_dict())
    ours_heads = [ProjectionHead(768, 1024) for _ in range(2)]
    for official_head, ours_head in zip(official_heads, ours_heads):
        state = {k: v for k, v in official_head.state_dict().items() if k.startswith("mlp.")}
        state["last_weight"] = official_head.state_dict()["last_layer.weight_v"]
        ours_head.load_state_dict(state)
    tokens_in = torch.randn(n_crops * b, 768, generator=generator)

    def head_pass(head):
        x = tokens_in.clone().requires_grad_(True)
        out = head(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out, x.grad

    a, o = head_pass(official_heads[0]), head_pass(ours_heads[0])
    ok &= compare("projection head output (CTCHead)", a[0], o[0])
    ok &= compare("projection head d out / d tokens", a[1], o[1])
    ok &= compare("projection head d out / d last layer", official_heads[0].last_layer.weight_v.grad,
                  ours_heads[0].last_weight.grad)
    for heads in (official_heads, ours_heads):
        with torch.no_grad():
            for param in heads[0].parameters():
                if param.grad is not None:
                    param.sub_(0.5 * param.grad)
    holder = types.SimpleNamespace(proj_head=official_heads[0], proj_head_t=official_heads[1], init_momentum=0.9)
    for _ in range(3):
        official_ema(holder)
        ema_update(ours_heads[1], ours_heads[0], 0.9)
    ok &= compare("teacher head after 3 EMA updates, output", official_heads[1](tokens_in), ours_heads[1](tokens_in))

    print(f"\nforward + backward, median of {args.repeats}, {args.threads} threads, CPU fp32:")
    def official_ptc_with_labels(x, _):
        return losses.get_masked_ptc_loss(x, camutils.label_to_aff_mask(grid.clone(), IGNORE))

    def ours_ptc_with_labels(x, _):
        return patch_token_contrast_loss(x, token_pair_labels(grid))

    def ours_ctc(s, t, f):
        return class_token_contrast_loss(s, t, f, temperature)

    rows = (
        ("pair labels + PTC", lambda: ptc(official_ptc_with_labels), lambda: ptc(ours_ptc_with_labels)),
        ("CTC", lambda: ctc(official_ctc, some), lambda: ctc(ours_ctc, some)),
    )
    for name, official_fn, ours_fn in rows:
        t_official, t_ours = median_seconds(official_fn, args.repeats), median_seconds(ours_fn, args.repeats)
        print(f"{name:<20} official {t_official * 1e3:8.2f} ms   ours {t_ours * 1e3:8.2f} ms   "
              f"ratio {t_official / t_ours:5.2f}x   load {os.getloadavg()[0]:.2f}", flush=True)
    print("\nall same" if ok else "\nsome quantities DIFFER")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
