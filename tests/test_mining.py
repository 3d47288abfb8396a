"""The paper's rules on hand-computed scores, the batched rule against its per-query twin,
sampling, and properties over random inputs."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posmine.config import RULES, MiningConfig, load_config
from posmine.core.mining import (
    MiningStats,
    QueryCandidates,
    combine_mined,
    combine_teachers,
    example_key,
    mine,
    normalize_text,
    query_rng,
    rule_keep,
    rule_keep_reference,
    short_share,
    text_key,
)

# One query, two positives (p1 0.80, p2 0.70): s+ = 0.70, the weakest positive.
CANDS = ["p1", "a", "b", "p2", "c", "d", "e", "f"]
SCORES = np.array([0.80, 0.75, 0.69, 0.70, 0.665, 0.60, 0.50, 0.40])
Q = QueryCandidates("q", CANDS, SCORES, ["p1", "p2"], np.array([0.80, 0.70]))


def negs(cfg: MiningConfig, q: QueryCandidates = Q) -> list[str]:
    rows, _ = mine([q], cfg)
    return rows[0]["negative_ids"] if rows else []


@pytest.mark.parametrize("rule, params, expected", [
    ("naive_topk", {}, ["a", "b", "c", "d"]),
    ("topk_shifted", {"shift": 2}, ["c", "d", "e", "f"]),
    # s < 0.7 (absolute)
    ("topk_abs", {"threshold": 0.7}, ["b", "c", "d", "e"]),
    # s < s+ - margin = 0.70 - 0.05 = 0.65
    ("topk_marginpos", {"margin": 0.05}, ["d", "e", "f"]),
    # s < s+ * perc = 0.70 * 0.95 = 0.665 (exclusive: c at exactly 0.665 is dropped)
    ("topk_percpos", {"perc": 0.95}, ["d", "e", "f"]),
    ("topk_percpos", {"perc": 1.0}, ["b", "c", "d", "e"]),
])
def test_rules_on_hand_computed_scores(rule: str, params: dict, expected: list[str]) -> None:
    # loaded as a user's config is: its strings are made at run time, not interned literals
    keys = [f"mining.rule={rule}", "mining.num_negatives=4", "mining.anchor=min",
            *(f"mining.{k}={v}" for k, v in params.items())]
    assert negs(load_config(None, keys).mining) == expected


def test_anchor_is_the_weakest_positive_and_positives_never_return() -> None:
    # a (0.75) outscores p2 (0.70): a single-positive anchor at p1 (0.80) would keep it.
    got = negs(MiningConfig(rule="topk_marginpos", margin=0.0, num_negatives=8, anchor="min"))
    assert "a" not in got and not {"p1", "p2"} & set(got)
    assert got == ["b", "c", "d", "e", "f"]


def test_percpos_with_negative_scores_stays_below_the_positive() -> None:
    # s+ = -0.2: s+ * 0.95 = -0.19 would be ABOVE s+; the rule uses s+ - |s+| * 0.05 = -0.21.
    q = QueryCandidates("q", ["x", "y", "z"], np.array([-0.195, -0.205, -0.3]), ["p"], np.array([-0.2]))
    assert negs(MiningConfig(rule="topk_percpos", perc=0.95), q) == ["z"]
    assert negs(MiningConfig(rule="topk_marginpos", margin=0.05), q) == ["z"]


def test_ties_keep_candidate_order() -> None:
    q = QueryCandidates("q", ["t1", "t2", "t3", "t4"], np.array([0.5, 0.5, 0.5, 0.4]), ["p"],
                        np.array([0.9]))
    assert negs(MiningConfig(rule="naive_topk", num_negatives=2), q) == ["t1", "t2"]


def test_k_larger_than_window_does_not_crash() -> None:
    cfg = MiningConfig(rule="naive_topk", num_negatives=50, top_k=3)
    rows, stats = mine([Q], cfg)
    assert rows[0]["negative_ids"] == ["a", "b", "c"]
    assert stats.queries_too_few == 1
    rows, stats = mine([Q], replace(cfg, too_few="drop"))
    assert rows == [] and stats.queries_dropped_too_few == 1
    assert (stats.examples, stats.examples_too_few, stats.examples_dropped_too_few,
            stats.examples_out, stats.negatives_kept) == (2, 2, 2, 0, 0)  # pair: one per positive
    assert short_share(MiningStats()) == 0.0  # no examples: nothing short, no division by zero


def test_stats_count_what_the_rule_dropped() -> None:
    _, stats = mine([Q], MiningConfig(rule="topk_percpos", top_k=30, anchor="min"))
    assert (stats.queries_in, stats.examples, stats.negatives_kept) == (1, 1, 3)  # d, e, f
    assert stats.removed_positive == 2
    assert stats.dropped_by_rule == 3  # a 0.75, b 0.69, c 0.665 >= 0.665
    assert stats.positives_not_in_topk == 0 and stats.queries_out == 1
    assert stats.hist_dropped.sum() == 3 and stats.hist_positive.sum() == 2


def test_self_hit_duplicates_and_no_positive() -> None:
    q = QueryCandidates("q7", ["q7", "dup", "dupq", "ok"], np.array([0.9, 0.5, 0.45, 0.4]),
                        ["p"], np.array([0.8]))
    texts = {"p": "The  Cell, divides.", "dup": "the cell divides", "dupq": "What divides?",
             "ok": "other", "q7": "x"}
    rows, stats = mine([q, QueryCandidates("empty", ["a"], np.array([0.1]), [], np.zeros(0))],
                       MiningConfig(rule="naive_topk"), texts, {"q7": "what divides"})
    assert rows[0]["negative_ids"] == ["ok"]
    assert (stats.removed_self, stats.removed_duplicate_text, stats.queries_no_positive) == (1, 2, 1)
    rows, _ = mine([q], MiningConfig(rule="naive_topk", dedup_text="exact"), texts, {"q7": "x"})
    assert rows[0]["negative_ids"] == ["dup", "dupq", "ok"]
    exact = {**texts, "dup": "The  Cell, divides."}  # the positive's text, byte for byte
    exact_cfg = load_config(None, ["mining.rule=naive_topk", "mining.dedup_text=exact"]).mining
    rows, _ = mine([q], exact_cfg, exact, {"q7": "x"})
    assert rows[0]["negative_ids"] == ["dupq", "ok"]
    # a query whose text is its positive's: documents with that text are still removed
    rows, _ = mine([q], MiningConfig(rule="naive_topk"), exact, {"q7": "the cell divides"})
    assert rows[0]["negative_ids"] == ["dupq", "ok"]
    assert normalize_text(" A-b  C. ") == "a b c"


@pytest.mark.parametrize("dedup", ["normalized", "exact", "none"])
def test_eligibility_by_precomputed_keys_equals_the_per_candidate_texts(dedup: str) -> None:
    """The fast path (keys from the text store) removes the same candidates, and counts them
    the same, as normalising every candidate's text: positives, self-hits and duplicate texts
    of the query or of any positive, in every mix."""
    rng = np.random.default_rng(3)
    spellings = ["The cell divides.", "the  cell divides", "THE CELL, DIVIDES", "other text",
                 "another", "x"]
    cfg = MiningConfig(rule="naive_topk", top_k=50, num_negatives=50, dedup_text=dedup)  # type: ignore[arg-type]
    batch, texts, qtexts = [], {}, {}
    for i in range(60):
        ids = [f"d{j}" for j in rng.choice(40, size=25, replace=False)] + [f"q{i}"]
        pos = [ids[j] for j in rng.choice(len(ids) - 1, size=int(rng.integers(1, 4)), replace=False)]
        batch.append(QueryCandidates(f"q{i}", ids, np.sort(rng.uniform(0, 1, len(ids)))[::-1],
                                     pos, rng.uniform(0.5, 1, len(pos))))
        qtexts[f"q{i}"] = spellings[int(rng.integers(len(spellings)))]
    for j in range(40):
        texts[f"d{j}"] = spellings[int(rng.integers(len(spellings)))]
    for i in range(60):
        texts[f"q{i}"] = qtexts[f"q{i}"]
    key = {d: text_key(t, "exact" if dedup == "exact" else "normalized") for d, t in texts.items()}
    fast = [replace(q, cand_keys=np.array([key[d] for d in q.cand_ids]),
                    banned_keys=np.array([] if dedup == "none" else
                                         [key[p] for p in q.pos_ids] + [key[q.query_id]], np.int64))
            for q in batch]
    ref_rows, ref = mine(batch, cfg, texts if dedup != "none" else None, qtexts)
    rows, got = mine(fast, cfg)
    assert rows == ref_rows
    assert got.to_dict() == ref.to_dict()
    assert ref.removed_self > 0 and ref.removed_positive > 0
    assert (ref.removed_duplicate_text > 0) == (dedup != "none")


def test_self_hit_by_value_not_identity() -> None:
    qid = "".join(["q", "7"])  # equal to the candidate id "q7", another object (as ids read from files)
    q = QueryCandidates(qid, ["q7", "ok"], np.array([0.9, 0.4]), ["p"], np.array([0.8]))
    rows, stats = mine([q], MiningConfig(rule="naive_topk"))
    assert rows[0]["negative_ids"] == ["ok"] and stats.removed_self == 1


def test_histograms_keep_negative_scores() -> None:
    q = QueryCandidates("q", ["a", "b"], np.array([-0.31, -0.61]), ["p"], np.array([-0.21]))
    _, stats = mine([q], MiningConfig(rule="naive_topk"))
    bins = stats.to_dict()["histograms"]["bins"]
    assert len(bins) == 81 and bins[0] == -1.0 and bins[-1] == 1.0  # 0.025 wide
    assert stats.hist_kept[np.searchsorted(bins, -0.61) - 1] == 1  # not clipped to 0
    assert stats.hist_positive[np.searchsorted(bins, -0.21) - 1] == 1
    _, pos = mine([QueryCandidates("q", ["a"], np.array([0.81]), ["p"], np.array([0.91]))],
                  MiningConfig(rule="naive_topk"))
    assert pos.hist_kept[np.searchsorted(bins, 0.81) - 1] == 1  # nor positive ones to 0
    assert pos.hist_positive[np.searchsorted(bins, 0.91) - 1] == 1


def test_positive_outside_top_k_is_counted() -> None:
    q = QueryCandidates("q", ["a", "b"], np.array([0.5, 0.4]), ["far"], np.array([0.3]))
    rows, stats = mine([q], MiningConfig(rule="naive_topk"))
    assert stats.positives_not_in_topk == 1 and rows[0]["negative_ids"] == ["a", "b"]


def test_sampling_is_seeded_and_from_the_top_n() -> None:
    cands = [f"c{i}" for i in range(20)]
    q = QueryCandidates("q", cands, np.linspace(0.6, 0.2, 20), ["p"], np.array([0.9]))
    cfg = MiningConfig(rule="naive_topk", sampling="sample", sample_from=8, num_negatives=4)
    a, b = negs(cfg, q), negs(cfg, q)
    assert a == b and len(a) == 4 and set(a) <= set(cands[:8])
    assert negs(replace(cfg, seed=7), q) != a or negs(replace(cfg, seed=8), q) != a
    top1 = negs(replace(cfg, sampling="top1_sample"), q)
    assert top1[0] == "c0" and set(top1[1:]) <= set(cands[1:8]) and len(top1) == 4
    soft = negs(replace(cfg, sample_weights="softmax", sample_temperature=0.01), q)
    assert set(soft) <= set(cands[:8])
    # order is by score, best first
    assert [cands.index(c) for c in a] == sorted(cands.index(c) for c in a)
    # plain sampling does not always take the best survivor (top1_sample does)
    firsts = {negs(replace(cfg, seed=s), q)[0] for s in range(12)}
    assert firsts - {"c0"}


def test_softmax_sampling_prefers_high_scores() -> None:
    cands = [f"c{i}" for i in range(10)]
    q_scores = np.array([0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    cfg = MiningConfig(rule="naive_topk", sampling="sample", sample_from=10, num_negatives=1,
                       sample_weights="softmax", sample_temperature=0.05)
    picks = [mine([QueryCandidates(f"q{i}", cands, q_scores, ["p"], np.array([1.0]))], cfg)[0][0]
             ["negative_ids"][0] for i in range(50)]
    assert sum(p in ("c0", "c1") for p in picks) >= 48


def test_combine_teachers() -> None:
    t1 = [("a", 0.9), ("b", 0.8), ("c", 0.7)]
    t2 = [("b", 0.85), ("d", 0.6), ("e", 0.5)]
    intra = combine_teachers([t1, t2], "intra_sample", 4, query_rng(0, "q"))
    assert [d for d, _ in intra] == ["a", "b", "d", "c"]
    kept = combine_teachers([t1, t2], "intra_sample", 4, query_rng(0, "q"), dedup=False)
    assert [d for d, _ in kept] == ["a", "b", "b", "d"]
    cross = combine_teachers([t1, t2], "cross_sample", 2, query_rng(0, "q"))
    assert cross in (t1[:2], t2[:2])
    # lists of different lengths: the short one runs out, the long one goes on
    uneven = combine_teachers([t1[:1], t2], "intra_sample", 4, query_rng(0, "q"))
    assert [d for d, _ in uneven] == ["a", "b", "d", "e"]
    with pytest.raises(ValueError, match="allowed"):
        combine_teachers([t1], "mix", 2, query_rng(0, "q"))


def _mined(qid: str, negs: list[tuple[str, float]], pos_score: float) -> dict:
    return {"query_id": qid, "query": f"text {qid}", "positive_ids": ["p"], "positives": ["pos"],
            "positive_scores": [pos_score], "negative_ids": [d for d, _ in negs],
            "negative_scores": [s for _, s in negs], "negatives": [f"doc {d}" for d, _ in negs]}


def test_combine_mined_rows_of_two_teachers() -> None:
    t1 = [_mined("q1", [("a", 0.9), ("b", 0.8), ("c", 0.7)], 0.95), _mined("q2", [("x", 0.5)], 0.6)]
    t2 = [_mined("q1", [("b", 0.6), ("d", 0.5)], 0.7), _mined("q3", [("y", 0.4), ("z", 0.3)], 0.5)]
    cfg = MiningConfig(num_negatives=3, combine="intra_sample")
    rows, stats = combine_mined([t1, t2], cfg)
    assert [r["query_id"] for r in rows] == ["q1", "q2", "q3"]  # first teacher's order first
    q1 = rows[0]
    # round-robin by rank: a (t1), b (t2's first); t1's b is then skipped, d (t2)
    assert q1["negative_ids"] == ["a", "b", "d"]
    assert q1["negative_scores"] == [0.9, 0.6, 0.5]  # each from the teacher it was taken from
    assert q1["negatives"] == ["doc a", "doc b", "doc d"]
    assert q1["positive_scores"] == [0.95]  # the primary teacher's s+
    assert rows[2]["positive_scores"] == [0.5]  # q3: only teacher 2 kept it
    assert stats["negatives_in_teacher"] == [3, 4]  # a, b, x | b, d, y, z
    assert stats["negatives_in_several_teachers"] == 1  # b
    assert (stats["queries_out"], stats["negatives_kept"], stats["queries_too_few"]) == (3, 6, 2)
    assert (stats["examples"], stats["examples_too_few"], stats["examples_out"]) == (3, 2, 3)
    dropped, dstats = combine_mined([t1, t2], replace(cfg, too_few="drop"))
    assert [r["query_id"] for r in dropped] == ["q1"] and dstats["queries_dropped_too_few"] == 2
    assert (dstats["examples_too_few"], dstats["examples_dropped_too_few"]) == (2, 2)
    cross, _ = combine_mined([t1, t2], replace(cfg, combine="cross_sample"))
    assert cross[0]["negative_ids"] in (["a", "b", "c"], ["b", "d"])
    assert cross == combine_mined([t1, t2], replace(cfg, combine="cross_sample"))[0]  # seeded
    # the teacher is drawn per example: by the (query, positive) key with anchor=pair, by the
    # query with one example per query (12 queries: a wrong key cannot match them all by chance)
    a = [_mined(f"q{i}", [("a", 0.9), ("b", 0.8)], 0.95) for i in range(12)]
    b = [_mined(f"q{i}", [("c", 0.7), ("d", 0.6)], 0.9) for i in range(12)]
    for anchor in ("pair", "max"):
        c = replace(cfg, combine="cross_sample", anchor=anchor, num_negatives=2)
        want = [[a[i], b[i]][int(query_rng(c.seed, example_key(a[i]) if anchor == "pair" else f"q{i}")
                                 .integers(2))]["negative_ids"] for i in range(12)]
        assert [r["negative_ids"] for r in combine_mined([a, b], c)[0]] == want, anchor


# ---------------------------------------------------------------- batched == per-query


@pytest.mark.parametrize("bounds", [{}, {"max_score": 0.6, "min_score": -0.4, "range_min": 2},
                                    {"range_min": 5}, {"max_score": 0.3}])
@pytest.mark.parametrize("rule", RULES)
def test_batched_rule_equals_reference(rule: str, bounds: dict) -> None:
    rng = np.random.default_rng(0)
    scores = -np.sort(-rng.uniform(-1, 1, (64, 40)), axis=1)
    scores[:, 5] = scores[:, 4]  # ties
    scores[:3, 7] = bounds.get("max_score", 0.0)  # on a bound
    scores = -np.sort(-scores, axis=1)
    eligible = rng.random((64, 40)) > 0.15
    anchor = rng.uniform(-0.5, 1, 64)
    cfg = MiningConfig(rule=rule, top_k=25, shift=3, **bounds)  # type: ignore[arg-type]
    keep, _ = rule_keep(scores, eligible, anchor, cfg)
    ref = [rule_keep_reference(scores[i].tolist(), eligible[i].tolist(), float(anchor[i]), cfg)
           for i in range(64)]
    np.testing.assert_array_equal(keep, np.array(ref))


@settings(max_examples=150, deadline=None)
@given(
    scores=st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=40),
    n_pos=st.integers(1, 3),
    rule=st.sampled_from(RULES),
    k=st.integers(1, 8),
    sampling=st.sampled_from(["topk", "sample", "top1_sample"]),
    seed=st.integers(0, 10),
    anchor=st.sampled_from(["pair", "min", "max", "mean"]),
)
def test_rule_invariants(scores: list[float], n_pos: int, rule: str, k: int, sampling: str,
                         seed: int, anchor: str) -> None:
    s = np.sort(np.array(scores))[::-1]
    ids = [f"d{i}" for i in range(len(s))]
    pos = ids[:: max(1, len(ids) // n_pos)][:n_pos]
    pos_scores = np.array([s[ids.index(p)] for p in pos])
    q = QueryCandidates("q", ids, s, pos, pos_scores)
    cfg = MiningConfig(rule=rule, num_negatives=k, sampling=sampling, seed=seed,  # type: ignore[arg-type]
                       sample_from=5, anchor=anchor)  # type: ignore[arg-type]
    rows, _ = mine([q], cfg)
    again, _ = mine([q], cfg)
    assert rows == again  # deterministic for a seed
    assert len(rows) == (len(pos) if anchor == "pair" else 1)
    for got in rows:
        assert not set(got["negative_ids"]) & set(pos)
        assert got["query_positive_ids"] == pos
        assert len(got["negative_ids"]) <= k
        assert len(set(got["negative_ids"])) == len(got["negative_ids"])
        s_plus = float(getattr(np, anchor if anchor != "pair" else "min")(got["positive_scores"]))
        bound = {"topk_abs": cfg.threshold, "topk_marginpos": s_plus - cfg.margin,
                 "topk_percpos": s_plus - abs(s_plus) * (1 - cfg.perc)}.get(rule, np.inf)
        assert all(x < bound for x in got["negative_scores"])


@pytest.mark.parametrize("rule, params", [
    ("topk_abs", {"threshold": 0.5}),      # bound 0.5
    ("topk_marginpos", {"margin": 0.25}),  # bound 0.75 - 0.25 = 0.5
    ("topk_percpos", {"perc": 0.5}),       # bound 0.75 - 0.75 * 0.5 = 0.375
])
def test_bounds_are_exclusive_on_exact_floats(rule: str, params: dict) -> None:
    """Each bound is a binary fraction, so a candidate can sit exactly on it: it is dropped (the
    rules keep s < bound), and one just below it is kept."""
    cfg = replace(MiningConfig(rule=rule, num_negatives=8), **params)  # type: ignore[arg-type]
    bound = {"topk_abs": 0.5, "topk_marginpos": 0.5, "topk_percpos": 0.375}[rule]
    below = np.nextafter(bound, -1.0)
    q = QueryCandidates("q", ["p", "on", "below"], np.array([0.75, bound, below]), ["p"],
                        np.array([0.75]))
    assert negs(cfg, q) == ["below"]
    # the per-query reference twin draws the same exclusive bound
    assert rule_keep_reference([0.75, bound, below], [False, True, True], 0.75, cfg) == [False, False, True]


def test_join_candidates_equals_a_sorted_union() -> None:
    """The file's negatives join a query's list: each id once, best first, the search's own
    candidates ahead on ties; against a plain sort of the union."""
    from posmine.core.mining import QueryCandidates, join_candidates

    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = [f"d{i}" for i in rng.permutation(12)[:6]]
        scores = np.sort(rng.choice([0.1, 0.2, 0.3, 0.5], 6))[::-1].astype(np.float64)
        q = QueryCandidates("q", ids, scores, ["p"], np.array([0.9]))
        extra = [f"d{i}" for i in rng.integers(0, 14, 4)]  # may repeat, may be listed already
        extra_scores = rng.choice([0.1, 0.2, 0.3, 0.5], 4)
        joined, added = join_candidates(q, extra, extra_scores)
        union = dict(zip(ids, scores, strict=True))
        for d, s in zip(extra, extra_scores, strict=True):
            union.setdefault(d, s)
        ref = sorted(union.items(), key=lambda kv: -kv[1])  # stable: insertion order on ties
        assert list(joined.cand_ids) == [d for d, _ in ref]
        np.testing.assert_array_equal(joined.cand_scores, [s for _, s in ref])
        assert added == len(union) - len(ids)


def test_each_rule_is_described_by_the_parameters_it_uses_alone() -> None:
    from dataclasses import fields

    from posmine.config import RULES, MiningConfig
    from posmine.core.mining import RULE_PARAMS, describe_rule

    names = {f.name for f in fields(MiningConfig)}
    assert set(RULE_PARAMS) == set(RULES) and all(set(p) <= names for p in RULE_PARAMS.values())
    m = {"perc": 0.95, "margin": 0.05, "threshold": 0.7, "shift": 10}
    assert describe_rule({**m, "rule": "topk_percpos"}) == "topk_percpos (perc=0.95)"
    assert describe_rule({**m, "rule": "topk_marginpos"}) == "topk_marginpos (margin=0.05)"
    assert describe_rule({**m, "rule": "naive_topk"}) == "naive_topk"
    assert (describe_rule({**m, "rule": "topk_percpos", "max_score": 0.8, "range_min": 0})
            == "topk_percpos (perc=0.95, max_score=0.8)")
