"""Shared fixtures. Modules that train tiny networks use ``pytestmark = pytest.mark.usefixtures("one_thread")``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


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
