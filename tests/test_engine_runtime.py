"""The helpers every phase shares (wsss.engine.runtime): one precision rule, unwrap, the pipeline's settings."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from wsss.config import load_config
from wsss.engine.runtime import autocast, autocast_dtype, pseudo_label_params, unwrap


@pytest.mark.parametrize(("device", "precision", "expected"), [
    ("cpu", "fp32", None), ("cpu", "bf16", torch.bfloat16), ("cpu", "fp16", None),
    ("cuda", "fp32", None), ("cuda", "bf16", torch.bfloat16), ("cuda", "fp16", torch.float16),
])
def test_one_precision_rule_for_every_device(device, precision, expected):
    assert autocast_dtype(device, precision) == expected


def test_fp16_on_the_cpu_runs_the_network_in_float32_and_bf16_in_bfloat16():
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("cpu", "fp16"):
        assert layer(x).dtype == torch.float32
    with autocast("cpu", "bf16"):
        assert layer(x).dtype == torch.bfloat16


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module, attribute: str) -> None:
        super().__init__()
        setattr(self, attribute, inner)


def test_unwrap_finds_the_network_inside_ddp_and_compile_style_wrappers():
    net = nn.Linear(2, 2)
    assert unwrap(net) is net
    assert unwrap(_Wrapper(net, "module")) is net  # DistributedDataParallel
    assert unwrap(_Wrapper(net, "_orig_mod")) is net  # torch.compile
    assert unwrap(_Wrapper(_Wrapper(net, "_orig_mod"), "module")) is net  # DDP of a compiled network
    assert unwrap(_Wrapper(_Wrapper(net, "module"), "_orig_mod")) is net  # compiled DDP


def test_pseudo_label_params_carry_the_config_values():
    cfg = load_config("voc", ["cam.bg_threshold_high=0.6", "par.dilations=[1,2]", "afa.radius=5",
                              "data.ignore_index=254", "afa.bg_threshold_eval=0.3"])
    params = pseudo_label_params(cfg)
    assert (params.bg_high, params.bg_low, params.bg_eval, params.rw_bg_eval) == (0.6, 0.35, 0.45, 0.3)
    assert params.par.dilations == (1, 2) and params.par.iterations == cfg.par.iterations
    assert (params.radius, params.ignore_index, params.scales) == (5, 254, (1.0, 0.5, 1.5))


_FAULTS = """
import resource, sys, torch
from wsss.engine.runtime import keep_host_memory
applied = keep_host_memory(sys.argv[1] == "on")
for _ in range(8):  # 64 MiB, allocated and freed: the heap grows to hold it (it settles within ~5 rounds)
    torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(16 << 20).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow  # two interpreters
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_keep_host_memory_lets_a_loop_reuse_large_tensors_without_faulting_them_in_again():
    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        applied, count = out.stdout.split()
        return applied, int(count)

    assert faults("off")[0] == "False" and faults("on")[0] == "True"
    pages = (64 << 20) // 4096
    assert faults("off")[1] > 7 * pages  # glibc's default: each of the 8 tensors is mapped and faulted in afresh
    # kept: the loop cycles through a few heap blocks (small objects between them), each faulted in once
    assert faults("on")[1] < 3 * pages
