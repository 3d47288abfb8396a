"""The straight line on a tiny dataset with a tiny model: data -> embed -> search -> mine,
writing to a real S3 server on loopback; then report and evaluate."""

import logging
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
import ray

from posmine import pipeline, report
from posmine.cli import main
from posmine.config import load_config
from posmine.core.mining import example_key
from posmine.io import export, storage
from posmine.models.encoder import Encoder
from posmine.stages import evaluate
from tests.conftest import CORPUS, QRELS, QUERIES, TRAIN_QRELS_SHARED


def _overrides(tiny_beir: Path, tiny_model: str, out: str) -> list[str]:
    return [f"data.path={tiny_beir}", f"teacher.model={tiny_model}", "teacher.cpus_per_actor=0.5",
            "teacher.torch_threads=1", "mining.rule=topk_percpos", "mining.top_k=10",
            "mining.num_negatives=3", "index.num_shards=2", f"output.dir={out}",
            "evaluate.k_values=[1,10]", "evaluate.top_k=20"]


def test_mine_to_s3_and_report(ray_local: None, tiny_beir: Path, tiny_model: str, s3_bucket: str,
                               tmp_path: Path, caplog: pytest.LogCaptureFixture,
                               capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG, logger="posmine")  # (the S3 server's own logs are not ours)
    out = f"{s3_bucket}/runs/tiny"
    cfg = load_config(None, _overrides(tiny_beir, tiny_model, out))
    manifest = pipeline.mine(cfg)
    assert manifest["rule"] == "topk_percpos"
    stats = manifest["stats"]
    assert stats["queries_in"] == 8 and stats["positives"] == TRAIN_QRELS_SHARED
    mined = storage.read_parquet(f"{out}/mine/mined.parquet")
    assert mined.num_rows == stats["examples_out"] == TRAIN_QRELS_SHARED  # anchor=pair: per positive
    assert stats["queries_out"] == 8
    # every kept negative obeys the rule against the recomputed teacher scores
    enc = Encoder(cfg.teacher)
    doc_text = {d["_id"]: f"{d['title']} {d['text']}" for d in CORPUS}
    q_text = {q["_id"]: q["text"] for q in QUERIES}
    for row in mined.to_pylist():
        q = enc.encode([q_text[row["query_id"]]])[0]
        pos = enc.encode([doc_text[p] for p in row["positive_ids"]]) @ q
        np.testing.assert_allclose(pos, row["positive_scores"], atol=1e-5)
        s_plus = pos.min()
        assert all(s < s_plus * 0.95 for s in row["negative_scores"])
        assert not set(row["negative_ids"]) & set(row["positive_ids"])
        assert row["negatives"] == [doc_text[d] for d in row["negative_ids"]]
    # rerun: every stage skipped, same manifest
    assert pipeline.mine(cfg)["finished_at"] == manifest["finished_at"]
    png = report.histogram(f"{out}/mine")
    fs, path = storage.filesystem(png)
    assert fs.cat_file(path)[:8] == b"\x89PNG\r\n\x1a\n"
    # exports read the finished stage from S3 too
    summary = export.export(f"{out}/mine", "st-n-tuple", f"{out}/export/n-tuple.parquet")
    assert summary["columns"] == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]
    # credentials (dummy keys set in the environment) never reach an output object, the
    # driver's log, or the log files of the Ray session that ran the stages
    fs, root = storage.filesystem(out)
    objects = fs.find(root)
    assert len(objects) > 5
    for path in objects:
        blob = fs.cat_file(path)
        assert b"testing-secret" not in blob and b"testing-key-id" not in blob, path
    logs = caplog.text + "".join(capfd.readouterr())
    session = ray._private.worker._global_node.get_session_dir_path()  # this test's Ray
    for f in Path(session, "logs").rglob("*"):
        if f.is_file():
            logs += f.read_text(errors="replace")
    assert "testing-secret" not in logs and "testing-key-id" not in logs


def test_cli_mine_and_evaluate_local(ray_local: None, tiny_beir: Path, tiny_model: str,
                                     tiny_cross_encoder: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    args = [*_overrides(tiny_beir, tiny_model, out), "mining.rule=naive_topk"]
    assert main(["mine", "jobs/configs/scifact.yaml", *args]) == 0
    mined = storage.read_parquet(f"{out}/mine/mined.parquet")
    assert all(len(n) == 3 for n in mined.column("negative_ids").to_pylist())
    assert main(["evaluate", "jobs/configs/scifact.yaml", *args]) == 0
    doc = storage.read_json(next(str(p) for p in Path(out, "evaluate").rglob("metrics.json")))
    assert doc["split"] == "test"
    # the stored metrics are pytrec_eval's on the candidates this evaluation ranked
    [test_cands] = [p.parent for p in Path(out, "candidates").rglob("_manifest.json")
                    if storage.read_manifest(str(p.parent))["stage"] == "search"
                    and storage.read_manifest(str(p.parent))["split"] == "test"]
    run = evaluate.run_from_candidates(str(test_cands / "candidates.parquet"))
    qrels = {q: {d: s} for q, d, s in QRELS["test"]}
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10"}).evaluate(run)
    for ours, theirs in (("ndcg@10", "ndcg_cut_10"), ("recall@10", "recall_10")):
        assert doc["metrics"][ours] == pytest.approx(np.mean([r[theirs] for r in ref.values()]))
    [ev_manifest] = [storage.read_manifest(str(p.parent))
                     for p in Path(out, "evaluate").rglob("_manifest.json")]
    assert ev_manifest["rows"]["queries"] == len({q for q, _, _ in QRELS["test"]})  # not 0
    assert set(doc["metrics"]) == {f"{m}@{k}" for m in ("ndcg", "recall", "map", "mrr") for k in (1, 10)}
    rescored = [*args, f"mining.cross_encoder={tiny_cross_encoder}"]
    assert main(["mine", "jobs/configs/scifact.yaml", *rescored]) == 0
    assert storage.read_manifest(f"{out}/mine")["mining"]["cross_encoder"] == tiny_cross_encoder
    assert main(["report", f"{out}/mine"]) == 0
    assert Path(out, "mine", "scores.png").exists()


def test_mine_with_two_teachers_combines_their_negatives(ray_local: None, tiny_beir: Path,
                                                         tiny_model: str, tmp_path: Path) -> None:
    """extra_teachers: each teacher mines into mine-t<i>, intra_sample merges them into mine/."""
    out = str(tmp_path / "out")
    cfg = load_config(None, [*_overrides(tiny_beir, tiny_model, out), "mining.rule=naive_topk",
                             "extra_teachers=[{model: default}]"])  # the packaged MiniLM: ranks differently
    manifest = pipeline.mine(cfg)
    assert manifest["combine"] == "intra_sample" and len(manifest["teacher_dirs"]) == 2
    per_teacher = [{example_key(r): r for r in storage.read_parquet(
        f"{out}/mine-t{i}/mined.parquet").to_pylist()} for i in (0, 1)]
    assert any(per_teacher[0][q]["negative_ids"] != per_teacher[1][q]["negative_ids"]
               for q in per_teacher[0])  # the two teachers disagree somewhere
    combined = storage.read_parquet(f"{out}/mine/mined.parquet").to_pylist()
    assert len(combined) == manifest["stats"]["examples_out"] == len(per_teacher[0])
    for row in combined:
        t0, t1 = per_teacher[0][example_key(row)], per_teacher[1][example_key(row)]
        assert len(set(row["negative_ids"])) == len(row["negative_ids"]) == 3
        assert row["negative_ids"][0] == t0["negative_ids"][0]  # the primary teacher leads
        assert row["positive_scores"] == t0["positive_scores"]
        for d, s in zip(row["negative_ids"], row["negative_scores"], strict=True):
            assert any(d in t["negative_ids"] and s == t["negative_scores"][t["negative_ids"].index(d)]
                       for t in (t0, t1)), (row["query_id"], d)
    assert manifest["stats"]["negatives_in_teacher"][1] > 0
    assert pipeline.mine(cfg)["finished_at"] == manifest["finished_at"]  # rerun: skipped


def test_report_needs_a_finished_stage(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no finished mine stage"):
        report.histogram(str(tmp_path))
