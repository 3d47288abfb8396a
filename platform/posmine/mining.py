"""The positive-aware mining rules of NV-Retriever, as pure numpy functions (no Ray, no I/O).

Notation: `s(q, d)` is the teacher score, `P(q)` the positives and `s+ = min_{p in P(q)} s(q, p)`
(the weakest positive is the anchor, so a kept negative never outscores any positive).
Candidates are the teacher's top-K with positives, the query itself and texts equal to a
positive's or the query's removed; only the first `top_k` such eligible candidates count.

| rule             | keeps eligible candidate d (0-based eligible rank r) when |
| naive_topk       | always                                                     |
| topk_shifted     | r >= shift                                                 |
| topk_abs         | s(q,d) < threshold                                         |
| topk_marginpos   | s(q,d) < s+ - margin                                       |
| topk_percpos     | s(q,d) < s+ - |s+| (1 - perc)   (= s+ * perc when s+ >= 0)  |

TopK-PercPos subtracts a share of |s+| rather than multiplying by `perc`: for a negative s+,
`s+ * perc` would lie *above* s+ and keep candidates that outscore the positive.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from posmine.config import MiningConfig

HIST_BINS = np.linspace(-1.0, 1.0, 81)  # cosine scores; values outside are clipped in


@dataclass(frozen=True)
class QueryCandidates:
    """One query's teacher candidates (best first) and its positives with their scores."""

    query_id: str
    cand_ids: Sequence[str]
    cand_scores: np.ndarray  # (K,)
    pos_ids: Sequence[str]
    pos_scores: np.ndarray  # (P,)


@dataclass
class MiningStats:
    """What the filter did; every count is a number of queries or of candidates."""

    queries_in: int = 0
    queries_out: int = 0
    queries_no_positive: int = 0
    queries_too_few: int = 0
    queries_dropped_too_few: int = 0
    candidates: int = 0
    removed_positive: int = 0
    removed_self: int = 0
    removed_duplicate_text: int = 0
    dropped_by_rule: int = 0  # the likely false negatives
    negatives_kept: int = 0
    positives: int = 0
    positives_not_in_topk: int = 0
    hist_positive: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_BINS) - 1, np.int64))
    hist_kept: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_BINS) - 1, np.int64))
    hist_dropped: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_BINS) - 1, np.int64))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in vars(self).items() if not k.startswith("hist_")}
        out["histograms"] = {"bins": HIST_BINS.round(4).tolist(),
                             "positive": self.hist_positive.tolist(),
                             "kept": self.hist_kept.tolist(),
                             "dropped": self.hist_dropped.tolist()}
        return out


def _hist(scores: np.ndarray) -> np.ndarray:
    return np.histogram(np.clip(scores, -1.0, 1.0), HIST_BINS)[0]


def normalize_text(text: str) -> str:
    """Casefold, drop punctuation, collapse whitespace: near-identical texts compare equal."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def rule_threshold(anchor: np.ndarray, cfg: MiningConfig) -> np.ndarray:
    """Per-query exclusive upper bound on kept scores: (nq,) -> (nq,); +inf for rank rules."""
    if cfg.rule == "topk_abs":
        return np.full_like(anchor, cfg.threshold)
    if cfg.rule == "topk_marginpos":
        return anchor - cfg.margin
    if cfg.rule == "topk_percpos":
        return anchor - np.abs(anchor) * (1.0 - cfg.perc)
    return np.full_like(anchor, np.inf)


def rule_keep(scores: np.ndarray, eligible: np.ndarray, anchor: np.ndarray,
              cfg: MiningConfig) -> tuple[np.ndarray, np.ndarray]:
    """Batched rule: which candidates survive, and which the rule dropped.

    Args:
        scores: (nq, K) teacher scores, best first per row.
        eligible: (nq, K) bool, False for positives, self-hits, duplicate texts, padding.
        anchor: (nq,) s+ per query.

    Returns:
        keep (nq, K) and dropped (nq, K) bool masks; both lie inside the top_k window.
    """
    rank = np.cumsum(eligible, axis=1) - 1  # (nq, K) rank among eligible candidates
    window = eligible & (rank < cfg.top_k)
    passes = scores < rule_threshold(anchor, cfg)[:, None]
    if cfg.rule == "topk_shifted":
        passes = rank >= cfg.shift
    return window & passes, window & ~passes


def rule_keep_reference(scores: Sequence[float], eligible: Sequence[bool], anchor: float,
                        cfg: MiningConfig) -> list[bool]:
    """One query, plain Python: the slow twin `rule_keep` is tested against."""
    keep, rank = [], 0
    for s, ok in zip(scores, eligible, strict=True):
        if not ok:
            keep.append(False)
            continue
        if rank >= cfg.top_k:
            keep.append(False)
        elif cfg.rule == "naive_topk":
            keep.append(True)
        elif cfg.rule == "topk_shifted":
            keep.append(rank >= cfg.shift)
        elif cfg.rule == "topk_abs":
            keep.append(s < cfg.threshold)
        elif cfg.rule == "topk_marginpos":
            keep.append(s < anchor - cfg.margin)
        else:
            keep.append(s < anchor - abs(anchor) * (1 - cfg.perc))
        rank += 1
    return keep


def query_rng(seed: int, query_id: str) -> np.random.Generator:
    """A generator per query: the same draw whatever the batch or worker order."""
    return np.random.default_rng([seed, zlib.crc32(query_id.encode())])


def select(survivors: np.ndarray, scores: np.ndarray, cfg: MiningConfig,
           rng: np.random.Generator) -> np.ndarray:
    """Pick up to `num_negatives` of the survivor positions (best first in, best first out).

    topk: the first k. sample: k of the first `sample_from`, uniform or softmax(s / T).
    top1_sample: the best one plus k-1 sampled from the next `sample_from` - 1.
    """
    k = cfg.num_negatives
    if cfg.sampling == "topk" or len(survivors) <= k:
        return survivors[:k]
    head = survivors[:1] if cfg.sampling == "top1_sample" else survivors[:0]
    pool = survivors[len(head):max(cfg.sample_from, k)]
    need = min(k - len(head), len(pool))
    if cfg.sample_weights == "softmax":
        logits = scores[pool] / cfg.sample_temperature
        p = np.exp(logits - logits.max())
        picked = rng.choice(pool, size=need, replace=False, p=p / p.sum())
    else:
        picked = rng.choice(pool, size=need, replace=False)
    return np.concatenate([head, np.sort(picked)])  # positions ascend = scores descend


def eligible_mask(q: QueryCandidates, texts: Mapping[str, str] | None, query_text: str,
                  cfg: MiningConfig, stats: MiningStats) -> np.ndarray:
    """(K,) bool: candidates that may be negatives at all (counts what it removes)."""
    pos = set(q.pos_ids)
    norm = (lambda t: t) if cfg.dedup_text == "exact" else normalize_text
    texts = texts or {}
    banned = set()
    if texts and cfg.dedup_text != "none":
        banned = {norm(texts[p]) for p in q.pos_ids if p in texts} | {norm(query_text)}
    out = np.ones(len(q.cand_ids), dtype=bool)
    for i, d in enumerate(q.cand_ids):
        if d in pos:
            stats.removed_positive += 1
        elif d == q.query_id:
            stats.removed_self += 1  # BEIR datasets where queries are also documents
        elif banned and d in texts and norm(texts[d]) in banned:
            stats.removed_duplicate_text += 1
        else:
            continue
        out[i] = False
    return out


def mine(batch: Sequence[QueryCandidates], cfg: MiningConfig,
         texts: Mapping[str, str] | None = None,
         query_texts: Mapping[str, str] | None = None,
         stats: MiningStats | None = None) -> tuple[list[dict[str, Any]], MiningStats]:
    """Apply the rule and the sampling to a batch of queries.

    Returns one dict per kept query (`query_id, positive_ids, positive_scores, negative_ids,
    negative_scores`) and the stats, updated in place when given.
    """
    stats = stats or MiningStats()
    with_pos = [q for q in batch if len(q.pos_ids) > 0]
    stats.queries_in += len(batch)
    stats.queries_no_positive += len(batch) - len(with_pos)
    if not with_pos:
        return [], stats
    width = max(len(q.cand_ids) for q in with_pos)
    scores = np.full((len(with_pos), width), -np.inf, dtype=np.float64)  # (nq, K)
    eligible = np.zeros((len(with_pos), width), dtype=bool)
    for i, q in enumerate(with_pos):
        n = len(q.cand_ids)
        scores[i, :n] = q.cand_scores
        qtext = (query_texts or {}).get(q.query_id, "")
        eligible[i, :n] = eligible_mask(q, texts, qtext, cfg, stats)
        stats.candidates += n
        stats.positives += len(q.pos_ids)
        stats.positives_not_in_topk += len(set(q.pos_ids) - set(q.cand_ids))
        stats.hist_positive += _hist(np.asarray(q.pos_scores))
    anchor = np.array([float(np.min(q.pos_scores)) for q in with_pos])  # (nq,) s+
    keep, dropped = rule_keep(scores, eligible, anchor, cfg)
    stats.dropped_by_rule += int(dropped.sum())
    stats.hist_dropped += _hist(scores[dropped])
    rows = []
    for i, q in enumerate(with_pos):
        chosen = select(np.flatnonzero(keep[i]), scores[i], cfg, query_rng(cfg.seed, q.query_id))
        if len(chosen) < cfg.num_negatives:
            stats.queries_too_few += 1
            if cfg.too_few == "drop":
                stats.queries_dropped_too_few += 1
                continue
        stats.negatives_kept += len(chosen)
        stats.hist_kept += _hist(scores[i, chosen])
        rows.append({
            "query_id": q.query_id,
            "positive_ids": list(q.pos_ids),
            "positive_scores": [float(s) for s in q.pos_scores],
            "negative_ids": [q.cand_ids[j] for j in chosen],
            "negative_scores": [float(scores[i, j]) for j in chosen],
        })
    stats.queries_out += len(rows)
    return rows, stats


def combine_teachers(per_teacher: Sequence[Sequence[tuple[str, float]]], mode: str, k: int,
                     rng: np.random.Generator, dedup: bool = True) -> list[tuple[str, float]]:
    """Combine one query's negatives mined with several teachers (the paper's Table 2).

    cross_sample: one teacher drawn at random for this query, its first k negatives.
    intra_sample: round-robin over teachers' ranked lists (each teacher's best first) until
    k are taken; with `dedup` a document chosen by an earlier teacher is skipped.
    """
    if mode == "cross_sample":
        return list(per_teacher[int(rng.integers(len(per_teacher)))][:k])
    if mode != "intra_sample":
        raise ValueError(f"teacher combination {mode!r}; allowed: cross_sample, intra_sample")
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for rank in range(max((len(t) for t in per_teacher), default=0)):
        for t in per_teacher:
            if len(out) == k:
                return out
            if rank < len(t) and not (dedup and t[rank][0] in seen):
                out.append(t[rank])
                seen.add(t[rank][0])
    return out


def combine_mined(per_teacher: Sequence[Sequence[Mapping[str, Any]]],
                  cfg: MiningConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Merge several teachers' mined rows (schema `schemas.MINED`) into one row per query.

    Each teacher mined with the same rule against its own s+; per query, `combine_teachers`
    (`cfg.combine`) takes `cfg.num_negatives` from the teachers that kept the query, first
    teacher first. Positives and their scores are the first such teacher's; each negative keeps
    the score of the teacher whose list it was taken from, so scores mix the teachers' scales.
    Queries are in the first teacher's order, then any only later teachers kept.
    """
    by_query = [{r["query_id"]: r for r in rows} for rows in per_teacher]
    order = list(dict.fromkeys(r["query_id"] for rows in per_teacher for r in rows))
    stats: dict[str, Any] = {"queries_in": len(order), "queries_too_few": 0,
                             "queries_dropped_too_few": 0, "negatives_in_several_teachers": 0,
                             "negatives_in_teacher": [0] * len(per_teacher)}
    out = []
    for qid in order:
        have = [t for t, rows in enumerate(by_query) if qid in rows]
        lists = [list(zip(by_query[t][qid]["negative_ids"], by_query[t][qid]["negative_scores"],
                          strict=True)) for t in have]
        chosen = combine_teachers(lists, cfg.combine, cfg.num_negatives, query_rng(cfg.seed, qid))
        if len(chosen) < cfg.num_negatives:
            stats["queries_too_few"] += 1
            if cfg.too_few == "drop":
                stats["queries_dropped_too_few"] += 1
                continue
        texts = {d: x for t in have
                 for d, x in zip(by_query[t][qid]["negative_ids"], by_query[t][qid]["negatives"],
                                 strict=True)}
        for doc, _ in chosen:
            holders = [t for t in have if doc in by_query[t][qid]["negative_ids"]]
            stats["negatives_in_several_teachers"] += len(holders) > 1
            for t in holders:
                stats["negatives_in_teacher"][t] += 1
        first = by_query[have[0]][qid]
        out.append({"query_id": qid, "query": first["query"],
                    "positive_ids": list(first["positive_ids"]),
                    "positives": list(first["positives"]),
                    "positive_scores": list(first["positive_scores"]),
                    "negative_ids": [d for d, _ in chosen],
                    "negative_scores": [float(s) for _, s in chosen],
                    "negatives": [texts[d] for d, _ in chosen]})
    stats["queries_out"] = len(out)
    stats["negatives_kept"] = sum(len(r["negative_ids"]) for r in out)
    return out, stats
