"""What the benchmark scripts share: peak memory, the timed repeat loop, one case per child process, a run's
logged losses (``loss_summary``), a synthetic dataset in the VOC layout (``write_synthetic_voc``), and
the AFA training-step set-up of ``train_step.py`` / ``vs_official.py`` (config, network + optimizer, the
fixed synthetic batch, one timed iteration split by phase).

The scripts run as ``python3 bench/NAME.py``, so this folder is on ``sys.path`` and
``from _common import ...`` works in them and in their spawned children.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def load_average(minutes: int = 1) -> str:
    """The 1-minute load average (``minutes=3``: the 1, 5 and 15-minute ones), "n/a" where the OS has none."""
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return " ".join(f"{v:.2f}" for v in os.getloadavg()[: 1 if minutes == 1 else 3])


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes: Linux's VmHWM (the peak of this address space; a
    spawned child's own, where ru_maxrss keeps the parent's peak across exec), else ru_maxrss (KiB on Linux,
    bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory(cuda: bool) -> int:
    """Bytes: CUDA max allocated since the last reset, else the process's peak RSS."""
    return torch.cuda.max_memory_allocated() if cuda else peak_rss()


def time_runs(run: Callable[[], Any], warmup: int, repeats: int, cuda: bool) -> list[float]:
    """``warmup`` untimed calls, then the seconds of each of ``repeats`` calls (CUDA synchronised)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _child(queue, case: Callable[..., dict], key: dict, args: tuple) -> None:
    try:
        queue.put(case(*args))
    except Exception as exc:  # report, keep benchmarking the other cases
        queue.put({**key, "error": f"{type(exc).__name__}: {exc}"})


def run_in_child(case: Callable[..., dict], key: dict, *args: Any) -> dict:
    """``case(*args)`` in a fresh spawned process (so its peak memory is its own) -> its result dict,
    or ``{**key, "error": ...}`` if it raised."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, case, key, args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# --------------------------------------------------------------------------- AFA training step

# The phases of ``wsss.engine.trainer.train_step`` timed by its ``PhaseTimer``, in order.
TRAIN_PHASES = ("forward", "multiscale_cam", "pseudo_label_par", "affinity_random_walk", "losses", "backward",
                "optimizer")


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc; elsewhere the peak, ``peak_rss``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss()


def bench_config(config: str, backbone: str, crop: int, batch: int, precision: str, device: str,
                 overrides: Sequence[str] = ()) -> Any:
    """``wsss.config.load_config(config, ...)`` for a benchmark: random initialisation, one process whose
    forward pass holds the whole batch, the given crop / precision / device, then ``overrides``."""
    from wsss.config import load_config

    return load_config(config, [
        f"model.backbone={backbone}", "model.pretrained=none", f"data.crop_size={crop}",
        f"data.batch_size={batch}", f"data.total_batch_size={batch}", f"train.precision={precision}",
        f"train.device={device}", *overrides,
    ])


def build_training(cfg: Any, num_classes: int, device: torch.device, seed: int = 0,
                   reference_optimizer: bool = False) -> tuple[Any, Any, Any, Any]:
    """(network in train mode, optimizer, scheduler, GradScaler | None) as the trainer builds them, after
    ``torch.manual_seed(seed)``. ``reference_optimizer``: the per-parameter AdamW loop (``foreach=False``)
    instead of the trainer's fused one."""
    from wsss.engine.runtime import compile_network, keep_host_memory
    from wsss.engine.schedule import build_scheduler
    from wsss.engine.trainer import build_optimizer, build_scaler
    from wsss.models.network import build_network

    keep_host_memory(cfg.train.keep_host_memory)  # as the trainer, before anything is allocated
    torch.manual_seed(seed)
    network = compile_network(build_network(cfg, num_classes).to(device).train(), cfg.train.compile)
    optimizer = build_optimizer(network, cfg)
    if reference_optimizer:
        tc = cfg.train
        optimizer = torch.optim.AdamW(network.param_groups(tc), lr=tc.lr, betas=tuple(tc.betas),
                                      weight_decay=tc.weight_decay, foreach=False)
    return network, optimizer, build_scheduler(optimizer, cfg.train), build_scaler(cfg, device)


def synthetic_batch(batch: int, crop: int, classes: int, generator: torch.Generator | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    toco_views: bool = False) -> dict[str, torch.Tensor]:
    """The benchmarks' fixed training batch: ``label`` [B, K] with 1 + i % 2 random classes for image i,
    ``image`` [B, 3, S, S] normalized, ``valid_box`` long [B, 4] = (0, S, 0, S - S // 8): the last S // 8
    columns are padding, as random crops have. Random numbers from ``generator`` (default: torch's global one).

    Without ``mean`` / ``std`` the images are standard normal. With them (RGB in [0, 1]) they are random 8-bit
    pixels normalized as the data pipeline does, ``(rgb / 255 - mean) / std``, with black padding (the official
    pad colour), so that de-normalizing gives back 8-bit images, as with real data. ``toco_views``: also
    ``global_view2`` and ``local_image`` (ToCo's other views, ``wsss.data.transforms.ToCoViews``), made alike.
    """
    labels = torch.zeros(batch, classes)
    for i in range(batch):
        labels[i, torch.randperm(classes, generator=generator)[: 1 + i % 2]] = 1

    def images() -> torch.Tensor:
        if mean is None or std is None:
            return torch.randn(batch, 3, crop, crop, generator=generator)
        rgb = torch.randint(0, 256, (batch, 3, crop, crop), generator=generator).float()
        rgb[..., crop - crop // 8 :] = 0
        return (rgb / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)

    out = {"image": images(), "label": labels, "valid_box": torch.tensor([[0, crop, 0, crop - crop // 8]] * batch)}
    if toco_views:
        out.update(global_view2=images(), local_image=images())
    return out


def exact_uint8_round_trip(images: torch.Tensor, denormalize_uint8: Callable[[torch.Tensor], torch.Tensor],
                           mean: Sequence[float] = (123.675, 116.28, 103.53),
                           std: Sequence[float] = (58.395, 57.12, 57.375)) -> torch.Tensor:
    """Normalized 8-bit images -> the same images with pixels nudged up by an ulp until
    ``denormalize_uint8`` (the official AFA / ToCo ``denormalize_img``: de-normalize, truncate to uint8) gives
    back the 8-bit value they were made from, so that both sides de-normalize to the same image."""
    s = torch.tensor(std).view(3, 1, 1)
    m = torch.tensor(mean).view(3, 1, 1)
    target = (images * s + m).round()
    for _ in range(8):
        bad = denormalize_uint8(images).float() != target
        if not bad.any():
            return images
        images = torch.where(bad, torch.nextafter(images, torch.tensor(float("inf"))), images)
    raise RuntimeError("could not make the synthetic images survive the official uint8 round trip")


def timed_step(step: Callable[[], Any], timer: Any, cuda: bool = False) -> dict[str, float]:
    """Run ``step()`` once -> {"total": wall seconds, "cpu": CPU seconds of all threads, phase: seconds} with
    the phases ``timer`` (reset first; ``PhaseTimer`` interface: ``reset()``, ``totals``) collected."""
    timer.reset()
    if cuda:
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    if cuda:
        torch.cuda.synchronize()
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"total": total, "cpu": cpu, **dict(timer.totals)}


def loss_summary(work_dir: Path) -> dict[str, Any]:
    """The run's metrics.jsonl "train" records -> per loss name {first, min, last} of the logged means,
    each as [iteration, value]; {} when nothing was logged."""
    path = work_dir / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == "train" and isinstance(record.get("losses"), dict):
                records.append(record)
    summary: dict[str, Any] = {}
    for name in records[0]["losses"] if records else ():
        points = [(r["iteration"], r["losses"][name]) for r in records
                  if isinstance(r["losses"].get(name), (int, float))]
        if points:
            summary[name] = {"first": list(points[0]), "min": list(min(points, key=lambda p: p[1])),
                             "last": list(points[-1])}
    return summary


# --------------------------------------------------------------------------- synthetic VOC layout

VOC_BOUNDARY = 5  # pixels of ignore (255) around each object, as VOC's masks have


def write_synthetic_voc(root: Path, num_train: int, num_val: int, size: Sequence[int] = (375, 500),
                        seed: int = 0) -> Path:
    """A dataset in the VOC 2012 layout for runs of the code, not of learning -> ``root``::

        root/JPEGImages/{train,val}_NNNN.jpg   RGB [H, W] = ``size`` (VOC's most common 375 x 500)
        root/SegmentationClass/{train,val}_NNNN.png   VOC-palette masks, 0 = background, 1..20, 255 = ignore
        root/ImageSets/Segmentation/{train,val}.txt

    Per image: a smooth random background and 1 to 3 objects (ellipses or rectangles, 1/8 to 1/2 of the image
    side), each of a random class of the 20 and a random colour with noise, with a ``VOC_BOUNDARY``-pixel
    ignore band around it. Read with ``data.dataset=voc data.train_split=train``.
    """
    import numpy as np
    from PIL import Image
    from scipy.ndimage import binary_dilation

    from wsss.data.io import write_label_png

    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in size)
    ys, xs = np.mgrid[0:h, 0:w]
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        names = [f"{split}_{i:04d}" for i in range(count)]
        for name in names:
            coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
            image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)
            mask = np.zeros((h, w), np.uint8)
            for _ in range(int(rng.integers(1, 4))):
                ry, rx = (rng.uniform(1 / 16, 1 / 4) * min(h, w) for _ in range(2))
                cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
                dy, dx = (ys - cy) / ry, (xs - cx) / rx
                shape = dy**2 + dx**2 <= 1 if rng.random() < 0.5 else (np.abs(dy) <= 1) & (np.abs(dx) <= 1)
                image[shape] = rng.uniform(0, 255, 3) + rng.normal(0, 12, (int(shape.sum()), 3))
                band = binary_dilation(shape, iterations=VOC_BOUNDARY) & ~shape
                mask[band] = 255
                mask[shape] = int(rng.integers(1, 21))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
            write_label_png(root / "SegmentationClass" / f"{name}.png", mask)
        (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


if __name__ == "__main__":  # python3 bench/_common.py voc ROOT NUM_TRAIN NUM_VAL HEIGHT WIDTH (bench/gpu.sh)
    if len(sys.argv) != 7 or sys.argv[1] != "voc":
        sys.exit("usage: python3 bench/_common.py voc ROOT NUM_TRAIN NUM_VAL HEIGHT WIDTH")
    _root, _train, _val, _h, _w = Path(sys.argv[2]), *(int(v) for v in sys.argv[3:])
    print(write_synthetic_voc(_root, _train, _val, (_h, _w)))
