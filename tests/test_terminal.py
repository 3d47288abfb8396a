"""The terminal's pieces: short summaries instead of manifests, progress that reaches the driver
from a file a worker writes, and a line every so often when stderr is not a terminal."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from posmine import terminal
from posmine.io import storage


def test_summaries_say_what_a_stage_made_in_a_few_lines() -> None:
    mine = terminal.summary("mine", {"rows": {"examples": 1060}, "dir": "/o/mine",
                                     "stats": {"negatives_kept": 4240, "queries_out": 151,
                                               "dropped_by_rule": 147408, "examples_too_few": 0}})
    assert mine.splitlines() == ["mined 1,060 examples (4,240 negatives) for 151 queries",
                                 "passed over as too close to the positive: 147,408 (once per "
                                 "candidate per example)", "in: /o/mine"]
    train = terminal.summary("train", {"rows": {"steps": 20}, "model_dir": "/o/train/model",
                                       "stats": {"loss_curve": [[5, 1.5], [20, 0.75]]}})
    assert train == "trained 20 steps, last loss 0.7500\nin: /o/train/model"
    scored = terminal.summary("evaluate", {"split": "test", "metrics": {"ndcg@10": 0.5}})
    assert scored.splitlines() == ["scored on the test split", "ndcg@10     0.5000"]


def test_progress_from_a_workers_file_is_a_line_every_so_often_off_a_terminal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="posmine")
    url = str(tmp_path / "_progress.json")
    storage.write_json(url, {"step": 99, "loss": 9.0})  # an earlier attempt's: removed first

    def worker() -> None:
        for step in (5, 10):
            time.sleep(0.3)
            storage.write_json(url, {"step": step, "loss": 1.0 / step, "steps": 10})

    with terminal.watch(url, 10, "train", "step", poll=0.1, every=0.0):  # a line per new step
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        time.sleep(0.4)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train:")]
    assert lines == ["train: 5/10, loss 0.2000", "train: 10/10, loss 0.1000"]


