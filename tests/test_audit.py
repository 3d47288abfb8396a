"""`posmine audit`: hidden positives and every count against plain reference loops, then the
stage through the CLI on a small BEIR dataset (its table, CSV, plots and one-page report)."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from posmine import cli
from posmine.config import AuditConfig, ConfigError, MiningConfig, load_config
from posmine.core.mining import QueryCandidates
from posmine.stages.audit import Counts, audit_batch, hide_positives, settings

# One query, positives p1..p4; p2 and p4 are hidden from the miner.
IDS = ["p1", "a", "p2", "b", "c", "p3", "d", "p4", "e", "f"]
SCORES = np.array([0.90, 0.88, 0.86, 0.80, 0.70, 0.66, 0.60, 0.55, 0.50, 0.40])
VISIBLE = QueryCandidates("q", IDS, SCORES, ["p1", "p3"], np.array([0.90, 0.66]))
HIDDEN = {"q": {"p2", "p4"}}


def test_hand_computed_counts() -> None:
    """PercPos 0.95, pair, rank window of 4, 2 negatives. Example p1 (bound 0.855): window a, p2,
    b, c; keeps b, c; drops a and the hidden p2. Example p3 (bound 0.627): same window, drops all
    four."""
    cfg = MiningConfig(rule="topk_percpos", anchor="pair", top_k=4, num_negatives=2, window="rank")
    c = audit_batch([VISIBLE], HIDDEN, cfg)
    assert c == Counts(examples=2, examples_short=1, negatives_kept=2, hidden_in_window=2,
                       hidden_kept=0, hidden_dropped=2, dropped=6, kept_score_sum=0.80 + 0.70)
    # survivors: p3's window holds d, p4, e, f (first four under 0.627); it keeps d and the
    # hidden p4, a false negative; a, p2, b, c before them are dropped.
    s = audit_batch([VISIBLE], HIDDEN, replace(cfg, window="survivors"))
    assert s == Counts(examples=2, examples_short=0, negatives_kept=4, hidden_in_window=4,
                       hidden_kept=1, hidden_dropped=2, dropped=6,
                       kept_score_sum=(0.80 + 0.70) + (0.60 + 0.55))  # summed per example
    assert s.row()["fn_rate"] == 0.25 and s.row()["filter_recall"] == 0.5
    naive = audit_batch([VISIBLE], HIDDEN, replace(cfg, rule="naive_topk"))
    assert naive.hidden_kept == 2 and naive.row()["fn_rate"] == 0.5  # both examples keep a, p2


def reference(q: QueryCandidates, hidden: set[str], cfg: MiningConfig) -> Counts:
    """The audit of one query by plain loops: the window, the rule, the first k survivors."""
    if cfg.anchor == "pair":
        examples = [float(s) for s in q.pos_scores]
    else:
        s = [float(x) for x in q.pos_scores]
        examples = [{"min": min(s), "max": max(s), "mean": sum(s) / len(s)}[cfg.anchor]]
    out = Counts()
    for s_plus in examples:
        bound = {"topk_abs": cfg.threshold, "topk_marginpos": s_plus - cfg.margin,
                 "topk_percpos": s_plus - abs(s_plus) * (1 - cfg.perc)}.get(cfg.rule, np.inf)
        survivors_only = cfg.window == "survivors" and cfg.rule != "naive_topk" \
            and cfg.rule != "topk_shifted"
        kept, in_window, rank = [], 0, 0
        for d, s in zip(q.cand_ids, q.cand_scores, strict=True):
            if d in q.pos_ids or in_window >= cfg.top_k:
                continue
            passes = (rank >= cfg.shift) if cfg.rule == "topk_shifted" else s < bound
            if survivors_only and not passes:
                out.dropped += 1
                out.hidden_dropped += d in hidden
                out.hidden_in_window += d in hidden
                continue
            in_window += 1
            rank += 1
            out.hidden_in_window += d in hidden
            if passes:
                kept.append(d)
            else:
                out.dropped += 1
                out.hidden_dropped += d in hidden
        chosen = kept[:cfg.num_negatives]
        out.examples += 1
        out.examples_short += len(chosen) < cfg.num_negatives
        out.negatives_kept += len(chosen)
        out.hidden_kept += sum(d in hidden for d in chosen)
        out.kept_score_sum += sum(float(q.cand_scores[q.cand_ids.index(d)]) for d in chosen)
    return out


@pytest.mark.parametrize("window", ["rank", "survivors"])
def test_counts_equal_the_reference_on_random_queries(window: str) -> None:
    rng = np.random.default_rng(3)
    base = MiningConfig(top_k=8, num_negatives=3, window=window)  # type: ignore[arg-type]
    grid = settings(base, AuditConfig())
    assert len(grid) == 3 + 6 * 4  # naive, shifted, abs; MarginPos and 5 PercPos x 4 anchors
    for label, cfg in grid:
        total, ref = Counts(), Counts()
        for i in range(20):
            n = 40
            scores = np.sort(rng.uniform(-0.1, 1.0, n))[::-1]
            ids = [f"d{j}" for j in range(n)]
            pos = sorted(rng.choice(n, size=6, replace=False))
            visible, hidden = [ids[j] for j in pos[::2]], {ids[j] for j in pos[1::2]}
            q = QueryCandidates(f"q{i}", ids, scores, visible, scores[pos[::2]])
            audit_batch([q], {q.query_id: hidden}, cfg, counts=total)
            r = reference(q, hidden, cfg)
            for f in vars(ref):
                setattr(ref, f, getattr(ref, f) + getattr(r, f))
        assert replace(total, kept_score_sum=0.0) == replace(ref, kept_score_sum=0.0), label
        assert total.kept_score_sum == pytest.approx(ref.kept_score_sum), label


def test_hide_positives_is_seeded_and_keeps_one_visible() -> None:
    positives = {"q1": ["a"], "q2": ["a", "b"], "q3": [f"d{i}" for i in range(41)]}
    split = hide_positives(positives, 0.5, seed=1)
    assert "q1" not in split  # nothing to hide
    assert len(split["q2"][1]) == 1 and len(split["q2"][0]) == 1
    visible, hidden = split["q3"]
    assert len(hidden) == 20 and len(visible) == 21 and not set(visible) & hidden  # round(20.5)
    assert split == hide_positives(dict(reversed(positives.items())), 0.5, seed=1)
    assert split != hide_positives(positives, 0.5, seed=2)
    assert len(hide_positives(positives, 0.99, 0)["q2"][0]) == 1  # never all hidden


def test_audit_config_refuses_bad_grids() -> None:
    with pytest.raises(ConfigError, match=r"audit.grid\[0\].*perc"):
        load_config(None, ["audit.grid=[{rule: topk_percpos, perc: 1.5}]"])
    with pytest.raises(ConfigError, match=r"audit.grid\[1\]: fixed values only"):
        load_config(None, ["audit.grid=[{rule: naive_topk}, {perc: {uniform: [0.8, 1.0]}}]"])
    with pytest.raises(ConfigError, match=r"audit\.hide_fraction"):
        load_config(None, ["audit.hide_fraction=1.0"])


def test_cli_audit_on_a_small_beir_dataset(ray_local: None, tiny_beir: str, tiny_model: str,
                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["audit", "jobs/configs/scifact.yaml", f"data.path={tiny_beir}", f"teacher.model={tiny_model}",
            f"output.dir={out}", "teacher.num_actors=1", "mining.top_k=5", "audit.anchors=[pair, max]"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    [folder] = list((out / "audit").iterdir())
    summary = json.loads((folder / "audit.json").read_text())
    rows = list(csv.DictReader((folder / "audit.csv").open()))
    assert len(rows) == len(summary["settings"]) == 3 + 6 * 2
    assert summary["queries_audited"] > 0 and summary["hidden_positives"] > 0
    for r in summary["settings"]:
        assert r["hidden_kept"] <= min(r["negatives_kept"], r["hidden_in_window"])
        assert r["hidden_dropped"] <= r["dropped"] and r["setting"] in printed
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and not re.search(r'src="(?!data:)', page)
    assert (folder / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((folder / "_manifest.json").read_text())["rows"]["settings"] == len(rows)
    assert cli.main(args) == 0  # current: skipped, same folder
    assert list((out / "audit").iterdir()) == [folder]
    (folder / "report.html").unlink()
    assert cli.main(["report", str(folder)]) == 0  # the page again, from the audit's files
    assert (folder / "report.html").read_text() == page


@pytest.mark.parametrize("pool", [False, True], ids=["here", "pool"])
def test_the_stage_on_shards_equals_the_one_process_reference(
        ray_local: None, tiny_model: str, tmp_path_factory: pytest.TempPathFactory, pool: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Cranfield (graded, 7 positives per query) with a random teacher: the stage, shard by
    shard (here, and on the actor pool), counts what `audit_rows` counts reading every
    candidate and text in one process."""
    from posmine import pipeline
    from posmine.config import default_beir_dir
    from posmine.io import prepared
    from posmine.io.candidates import candidate_shards, read_candidates
    from posmine.io.vectors import positive_scores
    from posmine.stages import audit as audit_stage
    from posmine.stages import remote

    out = tmp_path_factory.mktemp("audit-scale")
    cfg = load_config(None, [f"data.path={default_beir_dir('cranfield')}", f"teacher.model={tiny_model}",
                             "teacher.max_length=32", "teacher.cpus_per_actor=0.5",
                             "teacher.torch_threads=1", "index.query_batch_size=40",
                             "mining.max_depth=256", "audit.anchors=[pair, max]",
                             f"output.dir={out}"])
    if pool:
        monkeypatch.setattr(remote, "LOCAL_CANDIDATES", 0)
    got = pipeline.audit(cfg)["stats"]
    grid = settings(cfg.mining, cfg.audit)
    data_dir, _ = pipeline.prepare(cfg)
    cand_dirs, _, _ = pipeline.candidates(cfg, cfg.teacher, [m for _, m in grid])
    assert len([u for d in cand_dirs for u in candidate_shards(d)]) > 2  # several shards
    positives = prepared.positives_by_query(prepared.read_prepared_qrels(data_dir, "train"))
    split = hide_positives(positives, cfg.audit.hide_fraction, cfg.audit.seed)
    scores = positive_scores(pipeline.embed(cfg)["dir"], positives)
    pos_score = {q: dict(zip(positives[q], map(float, scores[q]), strict=True)) for q in split}
    cands = read_candidates(cand_dirs)
    texts = prepared.read_texts(f"{data_dir}/corpus")
    qtexts = prepared.read_texts(f"{data_dir}/{prepared.QUERIES}")
    want = audit_stage.audit_rows(grid, cands, split, pos_score, texts, qtexts)
    assert got["queries_audited"] == len(split) and got["hidden_positives"] == sum(
        len(h) for _, h in split.values())
    assert len(got["settings"]) == len(want) == 15
    for g, w in zip(got["settings"], want, strict=True):
        assert {k: v for k, v in g.items() if "score" not in k} == {
            k: v for k, v in w.items() if "score" not in k}, w["setting"]
        assert g["kept_score_sum"] == pytest.approx(w["kept_score_sum"])
    assert sum(r["hidden_kept"] for r in want) > 0  # the random teacher keeps some: a real count
