"""Candidates per second per core of the mine stage's pure core, at SciFact-like and CISI-like
shapes: the batched rule alone (`mining.rule_keep`), the whole miner with duplicate texts
checked by precomputed keys (the stage's path), and the same with every candidate's text
normalised (`mining.eligible_mask`, the reference and the stage before the text store).

Pinned to one core (`sched_setaffinity`); synthetic scores, ids and 30-word texts.

    python benchmarks/mine_rule.py [--queries 4096] [--json benchmarks/results/mine_rule.json]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np

from _common import emit
from posmine.config import MiningConfig
from posmine.core.mining import QueryCandidates, mine, rule_keep, text_key

WORDS = ("cell protein gene cancer virus brain heart blood drug trial mouse human risk dose study "
         "effect level rate high low increase decrease patients treatment therapy").split()


def make(nq: int, k: int, p: int, seed: int = 0) -> tuple[list[QueryCandidates], dict[str, str],
                                                          dict[str, str]]:
    """`nq` queries of `k` candidates and `p` positives each, over a corpus of 20k texts."""
    rng = np.random.default_rng(seed)
    n_docs = 20_000
    texts = {f"d{j}": " ".join(WORDS[(j * 7 + i * 3 + j // 25) % len(WORDS)] for i in range(30))
             for j in range(n_docs)}
    queries = []
    for i in range(nq):
        ids = [f"d{j}" for j in rng.choice(n_docs, size=k + p, replace=False)]
        scores = np.sort(rng.uniform(0.2, 0.9, k + p))[::-1]
        pos = rng.choice(k + p, size=p, replace=False)
        queries.append(QueryCandidates(f"q{i}", ids, scores, [ids[j] for j in pos], scores[pos]))
    return queries, texts, {q.query_id: "cell protein gene" for q in queries}


def with_keys(queries: list[QueryCandidates], keys: dict[str, int], qkey: int) -> list[QueryCandidates]:
    return [replace(q, cand_keys=np.array([keys[d] for d in q.cand_ids], np.int64),
                    banned_keys=np.array([*(keys[d] for d in q.pos_ids), qkey], np.int64))
            for q in queries]


def rate(fn, candidates: int, repeat: int = 3) -> float:
    best = min(_timed(fn) for _ in range(repeat))
    return candidates / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(name: str, k: int, npos: int, nq: int, cfg: MiningConfig) -> dict[str, object]:
    queries, texts, qtexts = make(nq, k, npos)
    keys = {d: text_key(t, "normalized") for d, t in texts.items()}
    fast = with_keys(queries, keys, text_key("cell protein gene", "normalized"))
    cands = nq * (k + npos)
    ne = nq * (npos if cfg.anchor == "pair" else 1)
    scores = np.stack([q.cand_scores for q in queries])  # (nq, K)
    rows = np.repeat(np.arange(nq), ne // nq)  # (ne,) example -> query
    anchor = np.concatenate([q.pos_scores for q in queries])  # (ne,)
    eligible = np.ones_like(scores, bool)
    rule_rate = rate(lambda: rule_keep(scores[rows], eligible[rows], anchor, cfg), ne * scores.shape[1])
    fast_rate = rate(lambda: mine(fast, cfg), cands)
    slow_rate = rate(lambda: mine(queries, cfg, texts, qtexts), cands, repeat=1)
    assert mine(fast, cfg)[0] == mine(queries, cfg, texts, qtexts)[0]  # the same examples
    return {"shape": name, "queries": nq, "candidates": cands, "examples": ne,
            "rule_candidates_per_s": round(rule_rate),  # per (example, candidate) cell
            "miner_keys_candidates_per_s": round(fast_rate),
            "miner_normalise_candidates_per_s": round(slow_rate),
            "keys_over_normalise": round(fast_rate / slow_rate, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    cfg = MiningConfig()  # the paper's defaults: TopK-PercPos 95%, 4 negatives, anchor=pair
    out = {"cores": 1, "rule": cfg.rule, "anchor": cfg.anchor, "shapes": []}
    # SciFact-like: 1 positive, top_k 30 + 2; CISI-like: 41 positives, lists ~350 deep
    # SciFact-like: 1 positive, top_k 30 + 2; CISI-like: 41 positives, lists ~350 deep
    for name, k, npos, nq in (("one positive, K=32", 32, 1, a.queries),
                              ("41 positives, K=350", 350, 41, max(1, a.queries // 8))):
        out["shapes"].append(measure(name, k, npos, nq, cfg))
        print(out["shapes"][-1], flush=True)
    emit(out, a.json)


if __name__ == "__main__":
    main()
