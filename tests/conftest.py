"""Shared fixtures and the ``slow`` marker.

- ``one_thread``: modules that train tiny networks use ``pytestmark = pytest.mark.usefixtures("one_thread")``.
- ``wsss_here``: the ``wsss`` console entry point in this process.
- ``tiny_overrides`` / ``tiny_config``: the one definition of the tiny training run (mit_tiny from the ``demo``
  config, 64-pixel crops, 6 iterations); a test appends the keys it needs on top (a later ``key=value`` wins).
- ``demo_data`` / ``demo_data_3cls``: small demo datasets built once per session and shared: read them, never
  change them (copy first: ``shutil.copytree(demo_data, tmp_path / "data")``); a check at the end of the session
  fails if a test did.

``-m "not slow"`` leaves out the tests marked ``slow`` (they train, run the CLI end to end in a fresh
interpreter, spawn processes or DDP: each takes seconds); ``pyproject.toml`` registers the marker.

Tests marked ``cuda`` need a CUDA device: where ``torch.cuda.is_available()`` is False they are deselected
(counted as such in the summary, the header says why), never skipped, and ``-m cuda`` there is a usage error.
``bash bench/gpu.sh`` runs them on a GPU. ``small_voc_config`` / ``small_voc_batch``: the VOC recipe at
mit_tiny and 64-pixel crops and a loader batch for it, shared by tests/test_fake_cuda.py and tests/test_cuda.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# The tiny training run shared by the tests that train: mit_tiny (the demo config), 64-pixel crops, batches
# of 4 in one process without loader workers, a 32-channel seg head, two CAM scales, 6 iterations (2 of
# CAM-only warm-up, the seg head on PAR labels until 4). Tests add their own intervals, device and so on.
TINY_OVERRIDES: tuple[str, ...] = (
    "data.crop_size=64", "data.batch_size=4", "data.total_batch_size=4", "data.num_workers=0",
    "model.seg_embed_dim=32", "cam.scales=[1.0,0.5]", "afa.affinity_scale=1.0",
    "train.iterations=6", "train.cam_iters=2", "train.afa_label_iter=4", "train.warmup_iters=2",
)

def _cuda_marker_expression(config) -> bool:
    """Whether ``-m`` asks for the cuda tests alone (``-m cuda``)."""
    return (config.getoption("markexpr", "") or "").strip() == "cuda"


def pytest_report_header(config) -> str | None:
    if not torch.cuda.is_available():
        return "CUDA: none available; tests marked cuda are deselected (bash bench/gpu.sh runs them on a GPU)"
    return None


def pytest_collection_modifyitems(config, items):
    """Deselect the tests marked ``cuda`` where no CUDA device is available (module docstring)."""
    if torch.cuda.is_available():
        return
    if _cuda_marker_expression(config):
        raise pytest.UsageError("-m cuda: the tests marked cuda need a CUDA device, and torch.cuda.is_available() "
                                "is False here; run them on a GPU machine (bash bench/gpu.sh)")
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if cuda:
        config.hook.pytest_deselected(items=cuda)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP hand-offs that cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def wsss_here(capsys):
    """The ``wsss`` console entry point (``wsss.cli.main``) in this process (no interpreter start-up):
    ``wsss_here(*args)`` -> CompletedProcess with the exit code and the captured stdout / stderr."""
    from wsss.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        argv = sys.argv
        sys.argv = ["wsss", *args]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv = argv
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_overrides() -> Callable[..., list[str]]:
    """``tiny_overrides(*extras)`` -> a new list: ``TINY_OVERRIDES``, then ``extras`` (a later key wins).

    For ``load_config("demo", ...)``, ``wsss train demo ...`` or ``wsss.engine.demo.run_demo``."""

    def make(*extras: str) -> list[str]:
        return [*TINY_OVERRIDES, *extras]

    return make


@pytest.fixture(scope="session")
def tiny_config(tiny_overrides) -> Callable[..., object]:
    """``tiny_config(*extras)`` -> ``load_config("demo", tiny_overrides(*extras))``, a new Config each call.

    Name the data and the run in the extras: ``tiny_config(f"data.root={root}", f"train.work_dir={work}")``."""
    from wsss.config import load_config

    def make(*extras: str):
        return load_config("demo", tiny_overrides(*extras))

    return make


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime) of the dataset's files, without the image-label cache that wsss.data.datasets
    keeps in ``<root>/.wsss_cache`` (keyed by the masks' names, sizes and times: safe to share)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).parts[0] != ".wsss_cache"}


def _shared_demo(tmp_path_factory, name: str, **options):
    """Build a demo dataset for the session; at the end, fail if a test changed, added or removed a file."""
    from wsss.data.demo import build_demo_dataset

    root = build_demo_dataset(tmp_path_factory.mktemp(name) / "demo", **options)
    before = _files(root)
    yield root
    after = _files(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        pytest.fail(f"a test changed the shared {name} fixture ({', '.join(changed[:5])}): copy it to tmp_path "
                    "before changing it", pytrace=False)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Shared, read-only: a demo dataset of 2 digit classes ("zero", "one"), 64 x 64 images, 8 train / 4 val,
    seed 0 -> its root (``classes.txt``: background, zero, one)."""
    yield from _shared_demo(tmp_path_factory, "demo_data", num_classes=2, image_size=64, num_train=8, num_val=4)


@pytest.fixture(scope="session")
def demo_data_3cls(tmp_path_factory):
    """Shared, read-only: a demo dataset of 3 digit classes ("zero", "one", "four"), 64 x 64 images, 16 train /
    4 val, seed 0 -> its root. Its first images are those of any smaller 3-class build (same seed and size)."""
    yield from _shared_demo(tmp_path_factory, "demo_data_3cls", num_classes=3, image_size=64, num_train=16,
                            num_val=4)


@pytest.fixture(scope="session")
def train_tiny(tiny_config, tmp_path_factory) -> Callable[..., Path]:
    """``train_tiny(name, data_root, *extras)`` -> the last checkpoint of a tiny run (``tiny_config`` + ``extras``)
    on ``data_root``, in a fresh work dir ``name``. For module fixtures that need one trained checkpoint."""
    from wsss.engine.trainer import train

    def run(name: str, data_root: Path, *extras: str) -> Path:
        work = tmp_path_factory.mktemp(name) / "work"
        return Path(train(tiny_config(f"data.root={data_root}", f"train.work_dir={work}", *extras))["last_checkpoint"])

    return run


SMALL_CROP = 64


@pytest.fixture(scope="session")
def small_voc_config() -> Callable[..., object]:
    """``small_voc_config(precision="bf16", *extras)`` -> the VOC recipe (three CAM scales with flip, affinity
    scale 1.5, radius 8) at mit_tiny, random init, 64-pixel crops, 2 images, 2 PAR iterations (10 repeat the
    same ops), a 32-channel seg head, the dense-energy loss on, ``eval.long_side`` 128; then ``extras``."""
    from wsss.config import load_config

    def make(precision: str = "bf16", *extras: str):
        return load_config("voc", [
            "model.backbone=mit_tiny", "model.pretrained=none", "model.seg_embed_dim=32",
            f"data.crop_size={SMALL_CROP}", "data.batch_size=2", "data.total_batch_size=2",
            f"train.precision={precision}", "train.reg_loss_weight=0.1", "eval.long_side=128", "par.iterations=2",
            *extras,
        ])

    return make


@pytest.fixture
def small_voc_batch() -> dict[str, torch.Tensor]:
    """A loader batch for ``small_voc_config``, on the host: ``image`` [2, 3, 64, 64] normalized (seed 0),
    ``label`` [2, 20] (image 0 class 1, image 1 classes 1 and 2), ``valid_box`` long [2, 4] (image 0 whole,
    image 1 padded: 8 rows at the bottom, 16 columns on the right)."""
    s = SMALL_CROP
    labels = torch.zeros(2, 20)
    labels[0, 0] = labels[1, 0] = labels[1, 1] = 1.0
    return {"image": torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0)), "label": labels,
            "valid_box": torch.tensor([[0, s, 0, s], [0, s - 8, 0, s - 16]])}
