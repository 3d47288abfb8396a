"""The command line's own promises: a version, overrides wherever they stand, and a missing
model refused before any stage runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from posmine import __version__
from posmine.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"posmine {__version__}"


def test_evaluate_takes_overrides_after_the_model_and_refuses_a_missing_one_before_any_work(
        tiny_beir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["evaluate", "jobs/configs/scifact.yaml", "--model", str(tmp_path / "nope"),
                 f"data.path={tiny_beir}", f"output.dir={out}"])
    err = capsys.readouterr().err
    assert code == 1 and f"posmine: error: model '{tmp_path / 'nope'}': no such directory" in err, err
    assert not (out / "data").exists()  # refused before the data stage
    with pytest.raises(SystemExit):  # anything else after the option is still an error
        main(["evaluate", "jobs/configs/scifact.yaml", "--model", "m", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_call_leaves_the_loggers_as_it_found_them(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A program that calls the CLI twice: the first call's terminal handler and log file are
    gone once it returns, so nothing writes to a stream that has closed since."""
    import logging

    from posmine import terminal

    root = logging.getLogger()
    before = root.handlers[:]
    args = ["mine", "jobs/configs/scifact.yaml", f"data.path={tmp_path / 'nope'}",
            f"output.dir={tmp_path / 'out'}"]
    assert main(args) == 1  # after the lease and the log file: the data stage finds no dataset
    assert "posmine: error: " in capsys.readouterr().err
    log_file = tmp_path / "out" / "posmine.log"
    assert log_file.exists() and root.handlers == before
    assert not [h for name in terminal.RAY_LOGGERS for h in logging.getLogger(name).handlers
                if isinstance(h, logging.FileHandler) and h.baseFilename == str(log_file)]
    assert main(args) == 1
    assert log_file.read_text().count("log: ") == 2  # each call wrote its own lines once


def test_config_show_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from posmine.config import load_config, to_dict

    assert main(["config", "show", "jobs/configs/cranfield.yaml", "mining.perc=0.9"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == to_dict(load_config("jobs/configs/cranfield.yaml", ["mining.perc=0.9"]))
    assert shown["mining"]["perc"] == 0.9 and "rows_per_part" in shown["data"]  # defaults too
    assert main(["config", "show", "jobs/configs/cranfield.yaml", "mining.nope=1"]) == 1
    assert "mining.nope" in capsys.readouterr().err


def test_a_small_mine_is_quiet_and_a_current_rerun_starts_no_ray(tiny_beir: Path, tiny_model: str,
                                                                 tmp_path: Path) -> None:
    """A fresh process, as a user runs it: a few lines of posmine's own (no Ray, no library
    warnings, no manifest JSON), everything in the log file, and a rerun that answers from the
    manifests."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "posmine"), "mine", "jobs/configs/scifact.yaml",
           f"data.path={tiny_beir}", f"teacher.model={tiny_model}", f"output.dir={out}",
           "teacher.num_actors=1"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    # lines as a terminal shows them: a progress bar redraws its own line, however often (text
    # mode reads each redraw's \r as a line end, so the bar's lines are counted once)
    lines = [x for x in (first.stdout + first.stderr).split("\n") if x.strip()]
    bars = {x.split(":")[0] for x in lines if "%|" in x}
    lines = [x for x in lines if "%|" not in x] + sorted(bars)
    assert len(lines) <= 25, "\n".join(lines)
    assert not [x for x in lines if "ray" in x.lower() or x.lstrip().startswith(("{", "WARNING"))], lines
    assert first.stdout.startswith("mined ") and f"in: {out / 'mine'}" in first.stdout
    assert "mine: ran in" in first.stderr and f"log: {out / 'posmine.log'}" in first.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "mine: current" in again.stderr, again.stderr[-3000:]
    assert "running" not in again.stderr and again.stdout == first.stdout


def test_config_init_writes_a_commented_config_equal_to_the_defaults(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from posmine.config import load_config, to_dict

    out = tmp_path / "posmine.yaml"
    assert main(["config", "init", str(out)]) == 0
    text = out.read_text()
    assert text.count("\n  # ") > 100  # every key's meaning above it
    written, defaults = to_dict(load_config(out)), to_dict(load_config(None))
    assert written["data"].pop("path") == "beir:scifact"  # the default, by its name
    defaults["data"].pop("path")
    assert written == defaults
    assert main(["config", "init", str(out)]) == 1  # never overwritten
    assert "exists" in capsys.readouterr().err and out.read_text() == text
    assert main(["config", "init", str(tmp_path / "cisi.yaml"), "--preset", "cisi"]) == 0
    cisi = yaml.safe_load((tmp_path / "cisi.yaml").read_text())
    assert cisi["data"]["path"] == "beir:cisi" and load_config(tmp_path / "cisi.yaml").mining.anchor == "pair"
