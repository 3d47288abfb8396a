"""Retrieval metrics with trec_eval / pytrec_eval semantics (what BEIR and MTEB report).

Pure Python over `run = {query_id: {doc_id: score}}` and `qrels = {query_id: {doc_id: rel}}`:
- ranking: score descending, ties broken by doc id descending (trec_eval's order);
- relevant: rel >= 1; nDCG uses linear gain rel / log2(rank + 1);
- each metric is the mean over the queries present in both qrels and run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def ranked(docs: Mapping[str, float]) -> list[str]:
    """Doc ids in trec_eval order: score desc, then doc id desc."""
    return [d for d, _ in sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)]


def _query_metrics(ranking: list[str], rels: Mapping[str, int], ks: Iterable[int]) -> dict[str, float]:
    relevant = {d for d, r in rels.items() if r >= 1}
    ideal = sorted((r for r in rels.values() if r >= 1), reverse=True)
    out: dict[str, float] = {}
    for k in ks:
        top = ranking[:k]
        dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(top) if rels.get(d, 0) > 0)
        idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal[:k]))
        hits = [i for i, d in enumerate(top) if d in relevant]
        out[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
        out[f"recall@{k}"] = len(hits) / len(relevant) if relevant else 0.0
        out[f"map@{k}"] = (sum((n + 1) / (i + 1) for n, i in enumerate(hits)) / len(relevant)
                           if relevant else 0.0)
        out[f"mrr@{k}"] = 1.0 / (hits[0] + 1) if hits else 0.0
    return out


def totals(qrels: Qrels, run: Run, ks: Iterable[int] = (1, 10, 100),
           ignore_identical_ids: bool = True) -> tuple[dict[str, float], int]:
    """The sums of every metric over the queries in both `qrels` and `run`, and their number:
    shards of a run are scored apart and added (`evaluate` is their mean)."""
    ks = sorted(set(ks))
    sums: dict[str, float] = {}
    n = 0
    for q, docs in run.items():
        if q not in qrels:
            continue
        if ignore_identical_ids:
            docs = {d: s for d, s in docs.items() if d != q}
        for name, v in _query_metrics(ranked(docs), qrels[q], ks).items():
            sums[name] = sums.get(name, 0.0) + v
        n += 1
    return sums, n


def evaluate(qrels: Qrels, run: Run, ks: Iterable[int] = (1, 10, 100),
             ignore_identical_ids: bool = True) -> dict[str, float]:
    """Mean nDCG@k, Recall@k, MAP@k and MRR@k over the queries in both `qrels` and `run`.

    `ignore_identical_ids` drops a hit whose doc id equals its query id (BEIR's default).
    """
    return mean(*totals(qrels, run, ks, ignore_identical_ids))


def mean(sums: Mapping[str, float], n: int) -> dict[str, float]:
    """Each metric's sum over `n` queries (`totals`, added over shards) as their mean."""
    return {name: v / n for name, v in sorted(sums.items())} if n else {}
