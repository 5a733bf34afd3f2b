"""`wsss train` under torchrun: two Gloo processes on the CPU (DistributedDataParallel,
DistributedSampler, rank-0 files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # torchrun with two processes

TINY = [
    "data.crop_size=64", "data.num_workers=0", "model.seg_embed_dim=32", "model.drop_path_rate=0.0",
    "cam.scales=[1.0,0.5]", "afa.affinity_scale=1.0", "afa.radius=2", "eval.long_side=64", "train.warmup_iters=1",
    "train.log_interval=1", "train.image_log_interval=0",
]


def run(work: Path, data: Path, *overrides: str, processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    cmd = [*launcher, "-m", "wsss.cli", "train", "demo", "--data-root", str(data), "--work-dir", str(work),
           *TINY, *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def data(demo_data_3cls):
    return demo_data_3cls


def test_two_processes_of_batch_2_take_the_same_steps_as_one_process_of_batch_4(data, tmp_path):
    """In the CAM-only warm-up the loss is a per-image mean, so averaging the two ranks' gradients
    equals the gradient of the double batch (the sampler gives the two ranks the halves of it). Without the
    demo's conv stem: its BatchNorm keeps per-process statistics on the CPU (no SyncBatchNorm there)."""
    warmup_only = ["train.iterations=3", "train.cam_iters=3", "train.afa_label_iter=3", "train.val_interval=0",
                   "model.conv_stem=0"]
    run(tmp_path / "ddp", data, "data.batch_size=2", "data.total_batch_size=4", *warmup_only, processes=2)
    run(tmp_path / "single", data, "data.batch_size=4", "data.total_batch_size=4", *warmup_only)
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    single = torch.load(tmp_path / "single" / "last.pt", weights_only=True)
    assert ddp["iteration"] == single["iteration"] == 3
    assert len(ddp["rng"]["per_rank"]) == 2
    for name, value in single["model"].items():
        assert torch.allclose(ddp["model"][name], value, atol=1e-5, rtol=1e-4), name


def test_two_process_run_through_warmup_validation_and_checkpoints(data, tmp_path):
    """The full path after the warm-up (DDP re-wrapped without find_unused_parameters), validation
    sharded over the ranks, checkpoints and logs from rank 0 only."""
    work = tmp_path / "run"
    run(work, data, "data.batch_size=2", "data.total_batch_size=4", "train.iterations=4", "train.cam_iters=2",
        "train.afa_label_iter=3",
        "train.val_interval=2", "train.ckpt_interval=2", processes=2)
    last = torch.load(work / "last.pt", weights_only=True)
    assert last["iteration"] == 4 and (work / "best.pt").is_file()
    log = (work / "train.log").read_text()
    assert "2 process(es)" in log and "val mIoU" in log
    assert sorted(p.name for p in work.iterdir() if p.suffix == ".pt") == ["best.pt", "last.pt"]
