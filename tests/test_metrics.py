"""Our metrics equal pytrec_eval's (trec_eval semantics, as BEIR and MTEB use) on the same run."""

import numpy as np
import pytest
import pytrec_eval

from posmine.core.metrics import evaluate, ranked


def _random_case(seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    qrels, run = {}, {}
    for q in range(30):
        docs = [f"d{j}" for j in rng.choice(200, 120, replace=False)]
        rel = {d: int(rng.integers(0, 3)) for d in rng.choice([*docs, "unretrieved"], 4)}
        qrels[f"q{q}"] = rel
        # rounded scores make ties, which trec_eval breaks by doc id (descending)
        run[f"q{q}"] = {d: float(np.round(rng.random(), 1)) for d in docs}
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_pytrec_eval(seed: int) -> None:
    qrels, run = _random_case(seed)
    ks = (1, 10, 100)
    ours = evaluate(qrels, run, ks, ignore_identical_ids=False)
    measures = {f"ndcg_cut.{','.join(map(str, ks))}", f"recall.{','.join(map(str, ks))}",
                f"map_cut.{','.join(map(str, ks))}"}
    ref = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    for k in ks:
        for ours_name, ref_name in ((f"ndcg@{k}", f"ndcg_cut_{k}"), (f"recall@{k}", f"recall_{k}"),
                                    (f"map@{k}", f"map_cut_{k}")):
            want = np.mean([r[ref_name] for r in ref.values()])
            assert ours[ours_name] == pytest.approx(want, abs=1e-9), ours_name
    # MRR@10 = trec_eval's recip_rank on the run cut to its top 10 (trec order)
    cut = {q: {d: docs[d] for d in ranked(docs)[:10]} for q, docs in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    assert ours["mrr@10"] == pytest.approx(np.mean([r["recip_rank"] for r in rr.values()]), abs=1e-9)


def test_ignore_identical_ids() -> None:
    qrels = {"q1": {"d1": 1}}
    run = {"q1": {"q1": 0.9, "d1": 0.8}}
    assert evaluate(qrels, run, (1,), ignore_identical_ids=True)["ndcg@1"] == 1.0
    assert evaluate(qrels, run, (1,), ignore_identical_ids=False)["ndcg@1"] == 0.0


def test_queries_missing_from_run_are_not_averaged() -> None:
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    assert evaluate(qrels, {"q1": {"d1": 1.0}}, (10,))["ndcg@10"] == 1.0


def test_run_queries_without_judgements_are_skipped_not_the_end() -> None:
    """A run may hold queries the qrels do not judge (dev queries, typos): each is skipped, and
    every judged query after it still counts."""
    qrels = {"q2": {"d2": 1}, "q3": {"d3": 1}}
    run = {"q1": {"d1": 1.0}, "q2": {"d2": 1.0}, "q9": {"d2": 1.0}, "q3": {"d1": 1.0, "d3": 0.5}}
    got = evaluate(qrels, run, (1,))
    assert got["ndcg@1"] == 0.5 and got["recall@1"] == 0.5  # q2 right at 1, q3 wrong at 1


def test_default_cutoffs_are_beirs() -> None:
    """@1, @10 and @100 of each metric, as BEIR and MTEB report them (the README's tables)."""
    got = evaluate({"q1": {"d1": 1}}, {"q1": {"d1": 1.0}})
    assert sorted(got) == sorted(f"{m}@{k}" for m in ("ndcg", "recall", "map", "mrr")
                                 for k in (1, 10, 100))


def test_dense_scoring_equals_trec_eval_on_every_pair() -> None:
    """The evaluate stage's in-memory scoring (Tune's dev scores) against pytrec_eval on the run
    of every (query, document) dot product, written out pair by pair."""
    from posmine.config import EvaluateConfig
    from posmine.stages.evaluate import score_vectors

    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(12, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    qids, dids = [f"q{i}" for i in range(12)], [f"d{j}" for j in range(40)]
    qrels = {qid: {dids[j]: int(rng.integers(1, 3)) for j in rng.choice(40, 3, replace=False)}
             for qid in qids}
    cfg = EvaluateConfig(top_k=40, k_values=(1, 10))
    ours = score_vectors(cfg, qrels, qids, q, dids, d)
    run = {qid: {did: float(np.dot(q[i], d[j])) for j, did in enumerate(dids)}
           for i, qid in enumerate(qids)}
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1,10", "recall.1,10"}).evaluate(run)
    for k in (1, 10):
        for name, ref_name in ((f"ndcg@{k}", f"ndcg_cut_{k}"), (f"recall@{k}", f"recall_{k}")):
            want = np.mean([r[ref_name] for r in ref.values()])
            assert ours[name] == pytest.approx(want, abs=1e-6), name
