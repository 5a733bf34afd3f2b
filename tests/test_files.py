"""Atomic writes (wsss.files): a failed write leaves the old file or folder and no temporary."""

from __future__ import annotations

import numpy as np
import pytest

from wsss.files import atomic_dir, atomic_write


def test_atomic_write_keeps_the_suffix_for_the_writer_and_the_old_file_on_failure(tmp_path):
    path = tmp_path / "probs.npy"
    atomic_write(path, lambda tmp: np.save(tmp, np.arange(3)))  # np.save would append .npy to another suffix
    assert np.array_equal(np.load(path), np.arange(3))

    def dying(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dying)
    assert np.array_equal(np.load(path), np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["probs.npy"]


def test_atomic_dir_replaces_the_folder_only_when_the_block_succeeds(tmp_path):
    out = tmp_path / "export"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("failed midway")
    assert (out / "a.txt").read_text() == "1"
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
