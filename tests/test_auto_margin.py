"""`mining.perc: auto` (and `margin: auto`): the value picked from the audit's hide-and-count
on the mined split, said in the mine manifest; the default where there is nothing to hide."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pytest

from posmine import pipeline, report
from posmine.config import ConfigError, load_config
from posmine.core.mining import describe_auto, rule_threshold
from posmine.io import storage
from tests.conftest import write_beir

VALUES = (0.80, 0.90, 0.95, 0.99)


def _row(fn: float, short: int) -> dict:
    return {"fn_rate": fn, "examples_short": short, "examples": 100}


def test_the_loosest_value_within_the_false_negative_limit_wins() -> None:
    rows = [_row(0.02, 0), _row(0.05, 0), _row(0.09, 10), _row(0.20, 0)]
    assert pipeline.pick_auto(rows, VALUES, 0.10)[0] == 0.95
    assert pipeline.pick_auto(rows, VALUES, 0.04)[0] == 0.80
    # too short counts against a value however few false negatives it keeps
    rows[2] = _row(0.09, 30)
    assert pipeline.pick_auto(rows, VALUES, 0.10)[0] == 0.90
    # none within the limit: the fewest false negatives among those not too short
    value, why = pipeline.pick_auto([_row(0.3, 50), _row(0.4, 0), _row(0.5, 0), _row(0.6, 0)],
                                    VALUES, 0.10)
    assert value == 0.90 and "none within" in why


def test_auto_is_a_config_value_and_nothing_else_is() -> None:
    cfg = load_config(None, ["mining.perc=auto", "mining.max_fn_rate=0.05"])
    assert cfg.mining.perc == "auto" and cfg.mining.max_fn_rate == 0.05
    with pytest.raises(ConfigError, match=r"mining\.perc='fast'"):
        load_config(None, ["mining.perc=fast"])
    with pytest.raises(ConfigError, match=r"mining.perc must be in \[0, 1\]"):
        load_config(None, ["mining.perc=1.5"])
    with pytest.raises(ValueError, match=r"mining\.perc=auto: pick the value first"):
        rule_threshold(np.array([0.5]), cfg.mining)


def test_a_rule_without_the_auto_value_keeps_the_default_and_says_so() -> None:
    cfg = load_config(None, ["mining.rule=naive_topk", "mining.perc=auto", "mining.margin=auto"])
    mining, auto = pipeline.resolve_auto(cfg, cfg.teacher, cfg.mining)
    assert (mining.perc, mining.margin) == (0.95, 0.05)
    assert describe_auto(auto) == ("mining.perc=auto, mining.margin=auto: mining.rule=naive_topk "
                                   "reads neither; the defaults")


MULTI = {"train": [(f"q{i}", f"d{(i * 3 + j) % 40}", 1) for i in range(8) for j in range(4)],
         "test": [(f"q{i}", f"d{(i * 3 + 1) % 40}", 1) for i in range(8, 12)]}


@pytest.mark.parametrize("qrels, audited", [(MULTI, True), (None, False)], ids=["multi", "single"])
def test_mine_picks_perc_from_labels_and_says_why(ray_local: None, tiny_model: str, tmp_path: Path,
                                                   qrels: dict | None, audited: bool) -> None:
    single = {"train": [(f"q{i}", f"d{i}", 1) for i in range(8)],
              "test": [("q9", "d9", 1)]}
    root = write_beir(tmp_path / "data", qrels=qrels or single)
    cfg = load_config(None, [f"data.path={root}", f"teacher.model={tiny_model}",
                             f"output.dir={tmp_path / 'out'}", "teacher.num_actors=1",
                             "mining.top_k=5", "mining.perc=auto", "data.share_positives_by_text=false"])
    manifest = pipeline.mine(cfg)
    auto = manifest["auto"]
    assert auto["param"] == "perc" and manifest["mining"]["perc"] == auto["picked"]
    page = report.mine_page(manifest["dir"])
    assert html.escape(f"mining.perc=auto picked {auto['picked']}: {auto['why']}") in page
    if audited:
        assert [r["perc"] for r in auto["audit"]] == list(pipeline.AUTO_VALUES["perc"])
        want, _ = pipeline.pick_auto([{"fn_rate": r["fn_rate"], "examples": 1,
                                       "examples_short": r["short_share"]} for r in auto["audit"]],
                                     pipeline.AUTO_VALUES["perc"], cfg.mining.max_fn_rate)
        assert auto["picked"] == want and auto["why"].startswith(("the loosest", "none", "every"))
    else:
        assert auto["picked"] == 0.95 and "one positive per query" in auto["why"]


def test_several_teachers_say_the_pick_in_the_merged_manifest(ray_local: None, tiny_model: str,
                                                              tmp_path: Path) -> None:
    """The pick is made once, with the first teacher; every teacher mines with it, and the
    merged manifest (what training and the report read) says it as the first teacher's does."""
    root = write_beir(tmp_path / "data", qrels=MULTI)
    cfg = load_config(None, [f"data.path={root}", f"teacher.model={tiny_model}",
                             f"output.dir={tmp_path / 'out'}", "teacher.num_actors=1",
                             "mining.top_k=5", "mining.perc=auto", "data.share_positives_by_text=false",
                             "extra_teachers=[{pooling: cls}]"])
    manifest = pipeline.mine(cfg)
    first = storage.read_manifest(f"{tmp_path / 'out'}/mine-t0")
    assert manifest["combine"] == "intra_sample" and manifest["auto"] == first["auto"]
    assert manifest["mining"]["perc"] == first["mining"]["perc"] == manifest["auto"]["picked"]
