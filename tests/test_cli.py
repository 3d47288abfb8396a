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


def test_config_show_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from posmine.config import load_config, to_dict

    assert main(["config", "show", "jobs/configs/cranfield.yaml", "mining.perc=0.9"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == to_dict(load_config("jobs/configs/cranfield.yaml", ["mining.perc=0.9"]))
    assert shown["mining"]["perc"] == 0.9 and "rows_per_part" in shown["data"]  # defaults too
    assert main(["config", "show", "jobs/configs/cranfield.yaml", "mining.nope=1"]) == 1
    assert "mining.nope" in capsys.readouterr().err
