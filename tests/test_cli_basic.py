"""The CLI shell: help, config show, and one-line errors without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_the_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("train", "pseudolabel", "eval", "demo", "data", "config"):
        assert command in out.stdout


def test_config_show_prints_the_resolved_yaml_with_overrides():
    out = run_cli("config", "show", "voc", "train.lr=1e-4")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["train"]["lr"] == 1e-4 and cfg["model"]["backbone"] == "mit_b1"


def test_unknown_config_key_is_one_line_exit_2_no_traceback():
    out = run_cli("config", "show", "voc", "train.lrr=1")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'train.lrr'")
    assert "Traceback" not in out.stderr


def test_eval_needs_exactly_one_source():
    out = run_cli("eval")
    assert out.returncode == 2 and "exactly one of --pred DIR or --checkpoint FILE" in out.stderr
    assert "Traceback" not in out.stderr
