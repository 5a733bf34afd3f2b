"""The CLI shell: help, --version, python -m wsss, config show, and one-line errors without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
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


def test_eval_bg_thresholds_must_be_numbers():
    out = run_cli("eval", "--checkpoint", "x.pt", "--target", "par", "--bg-thresholds", "0.1,low")
    assert out.returncode == 2 and "--bg-thresholds takes comma-separated numbers" in out.stderr
    assert "Traceback" not in out.stderr


def run_module(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m wsss ...`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "wsss", *args], capture_output=True, text=True, cwd=cwd)


def test_python_m_wsss_prints_the_installed_version():
    from importlib import metadata

    import wsss

    out = run_module("--version")
    assert out.returncode == 0, out.stderr
    try:
        expected = metadata.version("wsss")
    except metadata.PackageNotFoundError:
        expected = wsss.__version__
    assert out.stdout.strip() == f"wsss {expected}"


def test_python_m_wsss_help_lists_predict_export_and_completion():
    out = run_module("--help")
    assert out.returncode == 0, out.stderr
    for text in ("predict", "export", "--install-completion", "--version"):
        assert text in out.stdout


@pytest.mark.slow
def test_import_wsss_is_cheap_and_load_model_is_lazy():
    code = ("import sys, wsss; assert 'torch' not in sys.modules, 'import wsss imported torch'; "
            "assert callable(wsss.load_model) and wsss.Segmenter.__name__ == 'Segmenter'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_data_demo_into_an_uncreatable_directory_is_one_error_line(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    out = run_cli("data", "demo", str(tmp_path / "a_file" / "demo"), "--num-train", "8", "--num-val", "2")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: cannot create the demo dataset directory '{tmp_path / 'a_file' / 'demo'}': Not a directory; "
        "expected a new or empty directory in a writable place"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no temporary directory left
