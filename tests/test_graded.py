"""Graded qrels (`data.min_positive_score`): judgements at or above it are positives, those
under it are never negatives (hard or in the batch) and never anchors; both are counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from posmine.config import DataConfig, MiningConfig
from posmine.core.mining import MiningStats, QueryCandidates, mine, text_key
from posmine.io import prepared, storage
from posmine.stages import data
from tests.conftest import write_beir

GRADED = {"train": [("q0", "d0", 3), ("q0", "d1", 1), ("q0", "d2", 2), ("q1", "d3", 1),
                    ("q2", "d4", 2), ("q2", "d5", 0)],
          "test": [("q8", "d6", 1), ("q8", "d7", 3)]}


def test_the_data_stage_moves_judgements_under_the_grade_out_of_the_positives(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "graded", qrels=GRADED)
    m = data.run(DataConfig(path=str(root), min_positive_score=2), str(tmp_path / "out"))
    d = data.stage_dir(str(tmp_path / "out"))
    train = storage.read_parquet(f"{d}/qrels/train.parquet").to_pylist()
    assert {(r["query_id"], r["doc_id"]) for r in train} == {("q0", "d0"), ("q0", "d2"), ("q2", "d4"),
                                                             ("q2", "d5")}
    assert prepared.judged_by_query(d, "train") == {"q0": ["d1"], "q1": ["d3"]}
    assert m["stats"]["graded"] == {"min_positive_score": 2, "split": "train", "positives": 3,
                                    "judged_below": 2, "queries_left_without_positive": 1}
    test = storage.read_parquet(f"{d}/qrels/test.parquet")
    assert test.num_rows == 2  # the evaluated split keeps its grades
    # 1 (the default): every judged document is a positive, nothing is written apart
    m1 = data.run(DataConfig(path=str(root)), str(tmp_path / "out"))
    assert m1["stats"]["graded"] == {} and prepared.judged_by_query(d, "train") == {}
    assert storage.read_parquet(f"{d}/qrels/train.parquet").num_rows == 6


@pytest.mark.parametrize("by_keys", [False, True])
def test_judged_documents_are_neither_negatives_nor_anchors(by_keys: bool) -> None:
    """The judged candidate 'w' outscores the others: naive top-k would take it first."""
    texts = {d: f"text {d}" for d in ("p", "w", "a", "b", "c")}
    keys = {d: text_key(t, "normalized") for d, t in texts.items()}
    cands = ["p", "w", "a", "b", "c"]
    q = QueryCandidates("q", cands, np.array([0.9, 0.8, 0.7, 0.6, 0.5]), ["p"], np.array([0.9]),
                        judged_ids=["w"])
    if by_keys:
        q = QueryCandidates(q.query_id, cands, q.cand_scores, ["p"], q.pos_scores,
                            cand_keys=np.array([keys[d] for d in cands]),
                            banned_keys=np.array([keys["p"], text_key("query", "normalized")]),
                            judged_ids=["w"])
    cfg = MiningConfig(rule="naive_topk", num_negatives=2)
    rows, stats = mine([q], cfg, texts, {"q": "query"}, MiningStats())
    assert [r["negative_ids"] for r in rows] == [["a", "b"]]
    assert [r["positive_ids"] for r in rows] == [["p"]]  # one example: 'w' anchors none
    assert rows[0]["query_positive_ids"] == ["p", "w"]  # masked in training as a known positive
    assert (stats.removed_judged, stats.judged_below_min, stats.removed_positive) == (1, 1, 1)
