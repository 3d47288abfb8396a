"""`mining.window`: which top_k candidates an example chooses from, and the deeper search it needs.

`survivors` (the default) fills an example's window with the first top_k candidates that pass
the rule, so a weak positive still gets negatives; the batched rule is checked against the
per-query reference, the cut of deep lists (`window_end`) against mining the uncut list; the
real-CISI check (deepened search against one search of the whole corpus) is in
test_multi_positive.py, which embeds CISI once.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from posmine.config import RULES, MiningConfig
from posmine.core.mining import (
    QueryCandidates,
    cut_to_window,
    mine,
    rule_keep,
    rule_keep_reference,
    window_end,
)

# One query, a strong positive (rank 0) and a weak one (rank 6) among 12 candidates.
IDS = ["p1", "a", "b", "c", "d", "e", "p2", "f", "g", "h", "i", "j"]
SCORES = np.array([0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.50, 0.49, 0.45, 0.40, 0.35, 0.30])
Q = QueryCandidates("q", IDS, SCORES, ["p1", "p2"], np.array([0.90, 0.50]))


def negatives(cfg: MiningConfig) -> dict[str, list[str]]:
    rows, _ = mine([Q], cfg)
    return {r["positive_ids"][0]: r["negative_ids"] for r in rows}


def test_a_weak_positive_gets_the_candidates_below_it() -> None:
    """PercPos 0.95, pair, window of 5: p2's bound is 0.475. The rank window (a..e) holds
    nothing under it; its survivors are g..j; p1 is the same either way."""
    cfg = MiningConfig(rule="topk_percpos", anchor="pair", top_k=5, num_negatives=3)
    assert negatives(replace(cfg, window="rank")) == {"p1": ["a", "b", "c"], "p2": []}
    assert negatives(cfg) == {"p1": ["a", "b", "c"], "p2": ["g", "h", "i"]}  # f 0.49 >= 0.475
    _, stats = mine([Q], cfg)
    # p1 drops nothing; p2 drops a..e (they outscore it) and f, all before its window closes
    assert stats.dropped_by_rule == 6 and stats.examples_too_few == 0


@pytest.mark.parametrize("rule", ["naive_topk", "topk_shifted"])
def test_rules_without_a_bound_ignore_the_window(rule: str) -> None:
    cfg = MiningConfig(rule=rule, anchor="pair", top_k=5, shift=2)  # type: ignore[arg-type]
    assert negatives(cfg) == negatives(replace(cfg, window="rank"))


def test_topk_abs_survivors() -> None:
    """Abs 0.7, window of 3: the rank window (a, b, c) scores above 0.7; survivors: e, f, g."""
    cfg = MiningConfig(rule="topk_abs", threshold=0.7, anchor="min", top_k=3, num_negatives=4)
    assert negatives(replace(cfg, window="rank")) == {"p1": []}  # anchor=min: one example
    assert negatives(cfg) == {"p1": ["e", "f", "g"]}


@pytest.mark.parametrize("rule", RULES)
def test_batched_survivors_equals_reference(rule: str) -> None:
    rng = np.random.default_rng(1)
    scores = -np.sort(-rng.uniform(-1, 1, (64, 60)), axis=1)  # (nq, K)
    eligible = rng.random((64, 60)) > 0.15
    anchor = rng.uniform(-0.5, 1, 64)
    cfg = MiningConfig(rule=rule, top_k=12, shift=3, window="survivors")  # type: ignore[arg-type]
    keep, dropped = rule_keep(scores, eligible, anchor, cfg)
    ref = [rule_keep_reference(scores[i].tolist(), eligible[i].tolist(), float(anchor[i]), cfg)
           for i in range(64)]
    np.testing.assert_array_equal(keep, np.array(ref))
    assert not (keep & dropped).any() and not (dropped & ~eligible).any()


def test_window_end_counts_strictly_below_the_bound() -> None:
    """Abs 0.5, top_k 2: candidates at exactly 0.5 are not under the bound; the second one
    under it is at position 4, so the lists is cut after it plus top_k places of slack."""
    q = QueryCandidates("q", ["p", "a", "b", "c", "d", "e", "f", "g", "h"],
                        np.array([0.9, 0.5, 0.5, 0.25, 0.125, 0.1, 0.05, 0.0, -0.1]), ["p"], np.array([0.9]))
    cfg = MiningConfig(rule="topk_abs", threshold=0.5, top_k=2)
    assert window_end(q, cfg) == 4 + 1 + 2
    assert window_end(q, replace(cfg, top_k=9)) is None  # fewer than 9 under it: search deeper
    assert window_end(q, replace(cfg, top_k=5)) == len(q.cand_ids)  # never past the list


def random_query(rng: np.random.Generator, i: int, n: int = 200) -> QueryCandidates:
    scores = np.sort(rng.uniform(-0.2, 1.0, n))[::-1]  # (K,)
    ids = [f"q{i}-d{j}" for j in range(n)]
    pos = sorted(rng.choice(n - 50, size=int(rng.integers(1, 8)), replace=False))  # 50+ below
    return QueryCandidates(f"q{i}", ids, scores, [ids[j] for j in pos], scores[pos])


@pytest.mark.parametrize("anchor", ["pair", "min", "max", "mean"])
def test_cut_lists_mine_the_same_as_whole_lists(anchor: str) -> None:
    """mine.mine_rows cuts each list at `window_end` before mining: the mined examples equal
    those of the whole lists, and a list with too few candidates below the anchor asks for more."""
    rng = np.random.default_rng(7)
    cfg = MiningConfig(anchor=anchor, top_k=10, num_negatives=4,  # type: ignore[arg-type]
                       sampling="sample", sample_from=8)
    whole = [random_query(rng, i) for i in range(40)]
    assert all(window_end(q, cfg) is not None for q in whole)
    cut = [cut_to_window(q, cfg) for q in whole]
    assert mine(cut, cfg)[0] == mine(whole, cfg)[0]
    assert cut_to_window(whole[0], replace(cfg, window="rank")) is whole[0]  # rank: never cut
    assert any(len(c.cand_ids) < len(w.cand_ids) for c, w in zip(cut, whole, strict=True))
    short = QueryCandidates("s", ["x", "p", "y"], np.array([0.9, 0.5, 0.1]), ["p"], np.array([0.5]))
    assert window_end(short, cfg) is None
