"""Logging configured once (wsss.logs): console on stderr, a run's train.log while it is attached."""

from __future__ import annotations

import logging

from wsss.logs import add_log_file, configure_logging, remove_log_file


def test_records_of_any_wsss_module_reach_the_console_and_the_attached_log_file(tmp_path, capsys):
    configure_logging(rank=0)
    configure_logging(rank=0)  # idempotent: one console handler
    path = tmp_path / "train.log"
    handler = add_log_file(path)
    try:
        logging.getLogger("wsss.data.datasets").warning("split '%s' has %d empty images", "train", 3)
        logging.getLogger("wsss.engine.trainer").info("iter 10 loss 0.5")
    finally:
        remove_log_file(handler)
    logging.getLogger("wsss.engine.trainer").info("after the run")
    err = capsys.readouterr().err
    assert err.count("warning: split 'train' has 3 empty images") == 1
    assert "iter 10 loss 0.5" in err and "after the run" in err
    lines = path.read_text().splitlines()
    assert len(lines) == 2  # nothing after remove_log_file
    assert lines[0].endswith("warning: split 'train' has 3 empty images") and lines[1].endswith(" iter 10 loss 0.5")
    assert lines[0][:4].isdigit()  # timestamped


def test_other_ranks_show_warnings_only(capsys):
    try:
        configure_logging(rank=1)
        logging.getLogger("wsss.engine.inference").info("progress")
        logging.getLogger("wsss.engine.inference").warning("trouble")
        err = capsys.readouterr().err
        assert "trouble" in err and "progress" not in err
    finally:
        configure_logging(rank=0)
