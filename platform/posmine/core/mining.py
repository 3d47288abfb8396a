"""The positive-aware mining rules of NV-Retriever, as pure numpy functions (no Ray, no I/O).

Notation: `s(q, d)` is the teacher score, `P(q)` the positives and `s+` the anchor, by
`mining.anchor`: `pair` gives each (q, p) its own example with s+ = s(q, p) (the paper's
formulation); `min` one example per query with s+ = min_p s(q, p) (a kept negative never
outscores any positive, but with dozens of positives s+ sinks below most candidates);
`max` and `mean` likewise.
Candidates are the teacher's top-K with positives, the query itself and texts equal to a
positive's or the query's removed (the eligible ones). Each example's window is the first
`top_k` of them (`mining.window=rank`), or for the rules with a score bound the first `top_k`
that pass the rule (`survivors`: a weak positive's window starts below it instead of ending
above it, and the rule keeps the whole window).

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

import hashlib
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
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
    # The fast path's duplicate-text check (`text_key` of each text, from the text store):
    # (K,) one per candidate, and the keys of the query's own text and its positives' texts.
    cand_keys: np.ndarray | None = None
    banned_keys: np.ndarray | None = None
    # Documents judged under `data.min_positive_score`: never negatives, never anchors.
    judged_ids: Sequence[str] = ()


@dataclass
class MiningStats:
    """What the filter did; every count is a number of queries or of candidates."""

    queries_in: int = 0
    queries_out: int = 0
    queries_no_positive: int = 0
    queries_too_few: int = 0  # queries with at least one example short of num_negatives
    queries_dropped_too_few: int = 0  # queries all of whose examples were dropped as short
    examples: int = 0  # one per query, or one per (query, positive) with anchor=pair
    examples_out: int = 0
    examples_too_few: int = 0
    examples_dropped_too_few: int = 0
    candidates: int = 0
    removed_positive: int = 0
    removed_self: int = 0
    removed_duplicate_text: int = 0
    removed_judged: int = 0  # candidates judged under data.min_positive_score
    judged_below_min: int = 0  # such judgements of the mined queries
    dropped_by_rule: int = 0  # the likely false negatives, counted once per example
    negatives_kept: int = 0
    positives: int = 0
    positives_not_in_topk: int = 0
    existing_negatives_joined: int = 0  # the training file's negatives added to candidate lists
    hist_positive: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_BINS) - 1, np.int64))
    hist_kept: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_BINS) - 1, np.int64))
    hist_dropped: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_BINS) - 1, np.int64))

    def add(self, other: Mapping[str, Any]) -> None:
        """Add the counts of another batch's `to_dict()` (shards mined apart, summed last)."""
        for k, v in other.items():
            if k == "histograms":
                for h in ("positive", "kept", "dropped"):
                    setattr(self, f"hist_{h}", getattr(self, f"hist_{h}") + np.asarray(v[h], np.int64))
            elif k in vars(self):
                setattr(self, k, getattr(self, k) + int(v))

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


def text_hash(text: str) -> int:
    """A signed 64-bit hash of the normalised text: equal for texts `normalize_text` equates.

    Training compares these to keep a query's known positives (by id or by duplicate text)
    out of its negatives without shipping every positive's text with every example.
    """
    digest = hashlib.blake2b(normalize_text(text).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def text_key(text: str, dedup: str) -> int:
    """The key under which `mining.dedup_text` equates texts: `text_hash` (normalized) or a
    hash of the exact text (exact). Two different texts share a key with probability 2^-64."""
    if dedup == "exact":
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little",
                              signed=True)
    return text_hash(text)


# The parameter each rule reads (the others are ignored by it).
RULE_PARAMS: dict[str, tuple[str, ...]] = {
    "naive_topk": (), "topk_shifted": ("shift",), "topk_abs": ("threshold",),
    "topk_marginpos": ("margin",), "topk_percpos": ("perc",)}


BOUNDS = ("max_score", "min_score", "range_min")  # over any rule; shown when set


def describe_rule(mining: Mapping[str, Any]) -> str:
    """`topk_percpos (perc=0.95)`: the rule with the parameters it uses, and no others."""
    rule = str(mining.get("rule"))
    used = ", ".join(f"{k}={mining.get(k)}" for k in (*RULE_PARAMS.get(rule, ()), *BOUNDS)
                     if k not in BOUNDS or mining.get(k))
    return f"{rule} ({used})" if used else rule


def describe_auto(auto: Mapping[str, Any]) -> str:
    """`mining.perc=auto picked 0.99: <why>`: what a mine manifest's `auto` record says."""
    if "param" not in auto:  # the rule reads none of the auto values: they were left at their defaults
        return ", ".join(f"mining.{k}=auto" for k in auto["picked"]) + f": {auto['why']}"
    return f"mining.{auto['param']}=auto picked {auto['picked']}: {auto['why']}"


def number(cfg: MiningConfig, name: str) -> float:
    """`mining.perc` or `mining.margin` as a number; `auto` is picked before mining starts."""
    value = getattr(cfg, name)
    if isinstance(value, str):
        raise ValueError(f"mining.{name}={value}: pick the value first (pipeline.resolve_auto)")
    return float(value)


def rule_threshold(anchor: np.ndarray, cfg: MiningConfig) -> np.ndarray:
    """Per-query exclusive upper bound on kept scores: (nq,) -> (nq,); +inf for rank rules."""
    if cfg.rule == "topk_abs":
        bound = np.full_like(anchor, cfg.threshold)
    elif cfg.rule == "topk_marginpos":
        bound = anchor - number(cfg, "margin")
    elif cfg.rule == "topk_percpos":
        bound = anchor - np.abs(anchor) * (1.0 - number(cfg, "perc"))
    else:
        bound = np.full_like(anchor, np.inf)
    if cfg.max_score is None:
        return bound
    # sentence-transformers drops s > max_score; kept here is s < nextafter(max_score, +inf)
    return np.minimum(bound, np.nextafter(cfg.max_score, np.inf))


def survivor_window(cfg: MiningConfig) -> bool:
    """Whether windows hold the first top_k survivors: `survivors`, for rules with a bound."""
    return cfg.window == "survivors" and cfg.rule in ("topk_abs", "topk_marginpos", "topk_percpos")


def rule_keep(scores: np.ndarray, eligible: np.ndarray, anchor: np.ndarray,
              cfg: MiningConfig) -> tuple[np.ndarray, np.ndarray]:
    """Batched rule: which candidates survive, and which the rule dropped.

    Args:
        scores: (nq, K) teacher scores, best first per row.
        eligible: (nq, K) bool, False for positives, self-hits, duplicate texts, padding.
        anchor: (nq,) s+ per query.

    Returns:
        keep (nq, K) and dropped (nq, K) bool masks: kept candidates lie in the window, dropped
        ones are those the rule refused before the window closed.
    """
    passes = scores < rule_threshold(anchor, cfg)[:, None]  # (nq, K)
    if cfg.min_score is not None:
        passes &= scores >= cfg.min_score
    in_window = eligible & passes if survivor_window(cfg) else eligible
    rank = np.cumsum(in_window, axis=1) - 1  # (nq, K) rank among the window's candidates
    window = in_window & (rank < cfg.top_k)
    if cfg.rule == "topk_shifted":
        passes = passes & (rank >= cfg.shift)
    # Dropped: every eligible candidate the rule refuses before the window closes (with
    # `rank` windows this is window & ~passes).
    open_ = np.cumsum(window, axis=1) - window < cfg.top_k  # (nq, K)
    keep = window & passes
    if cfg.range_min:  # the first range_min survivors are passed over, not dropped by the rule
        keep &= np.cumsum(keep, axis=1) > cfg.range_min
    return keep, eligible & open_ & ~passes


def rule_keep_reference(scores: Sequence[float], eligible: Sequence[bool], anchor: float,
                        cfg: MiningConfig) -> list[bool]:
    """One query, plain Python: the slow twin `rule_keep` is tested against."""
    keep, rank, survivors = [], 0, 0
    for s, ok in zip(scores, eligible, strict=True):
        if cfg.rule == "naive_topk":
            passes = True
        elif cfg.rule == "topk_shifted":
            passes = rank >= cfg.shift
        elif cfg.rule == "topk_abs":
            passes = s < cfg.threshold
        elif cfg.rule == "topk_marginpos":
            passes = s < anchor - number(cfg, "margin")
        else:
            passes = s < anchor - abs(anchor) * (1 - number(cfg, "perc"))
        passes = passes and (cfg.max_score is None or s <= cfg.max_score)
        passes = passes and (cfg.min_score is None or s >= cfg.min_score)
        if not ok or (survivor_window(cfg) and not passes):
            keep.append(False)
            continue
        kept = rank < cfg.top_k and passes
        if kept:
            survivors += 1
        keep.append(kept and survivors > cfg.range_min)
        rank += 1
    return keep


def window_end(q: QueryCandidates, cfg: MiningConfig) -> int | None:
    """`survivors`: how much of the query's candidate list its examples' windows can reach.

    The window with the lowest bound ends at its top_k-th candidate under that bound
    (positives and the query itself aside); every other example's window ends earlier.
    Returns that position + 1 plus `top_k` places of slack for candidates that duplicate-text
    removal will take out, or None when the list holds fewer than top_k such candidates.
    """
    s_plus = np.array([s for _, s in anchors(np.asarray(q.pos_scores), cfg.anchor)])
    low = rule_threshold(s_plus, cfg).min(initial=np.inf)
    scores = np.asarray(q.cand_scores)  # (K,)
    other = ~np.isin(np.asarray(q.cand_ids, dtype=object), [*q.pos_ids, *q.judged_ids, q.query_id])
    below = np.flatnonzero(other & (scores < low))
    if len(below) < cfg.top_k:
        return None
    return min(len(scores), int(below[cfg.top_k - 1]) + 1 + cfg.top_k)


def join_candidates(q: QueryCandidates, ids: Sequence[str],
                    scores: np.ndarray) -> tuple[QueryCandidates, int]:
    """`q` with the documents `ids` (teacher scores `scores`, (n,)) added to its candidates
    where absent, the list still best first (ties: the search's own candidates first); and how
    many were added. The rule then treats them as any other candidate."""
    have, new = set(q.cand_ids), []
    for i, d in enumerate(ids):
        if d not in have:
            have.add(d)
            new.append(i)
    if not new:
        return q, 0
    all_ids = [*q.cand_ids, *(ids[i] for i in new)]
    all_scores = np.concatenate([np.asarray(q.cand_scores, np.float64),
                                 np.asarray(scores, np.float64)[new]])  # (K + n,)
    order = np.argsort(-all_scores, kind="stable")
    return replace(q, cand_ids=[all_ids[i] for i in order], cand_scores=all_scores[order]), len(new)


def cut_to_window(q: QueryCandidates, cfg: MiningConfig) -> QueryCandidates:
    """`survivors`: `q` with its list cut where its windows end (nothing after can matter), so a
    list searched deep for one weak positive costs no more than its windows need."""
    if not survivor_window(cfg):
        return q
    end = window_end(q, cfg)  # None: the list ended first, keep it whole
    return replace(q, cand_ids=q.cand_ids[:end], cand_scores=q.cand_scores[:end],
                   cand_keys=None if q.cand_keys is None else q.cand_keys[:end])


def query_rng(seed: int, query_id: str) -> np.random.Generator:
    """A generator per query: the same draw whatever the batch or worker order."""
    return np.random.default_rng([seed, zlib.crc32(query_id.encode())])


def select(survivors: np.ndarray, scores: np.ndarray, cfg: MiningConfig,
           rng: np.random.Generator | None) -> np.ndarray:
    """Pick up to `num_negatives` of the survivor positions (best first in, best first out).

    topk: the first k. sample: k of the first `sample_from`, uniform or softmax(s / T).
    top1_sample: the best one plus k-1 sampled from the next `sample_from` - 1.
    """
    k = cfg.num_negatives
    if cfg.sampling == "topk" or len(survivors) <= k:
        return survivors[:k]
    assert rng is not None, "the sampling modes need a generator"
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
    pos, judged = set(q.pos_ids), set(q.judged_ids) - set(q.pos_ids)
    norm = (lambda t: t) if cfg.dedup_text == "exact" else normalize_text
    texts = texts or {}
    banned = set()
    if texts and cfg.dedup_text != "none":
        banned = {norm(texts[p]) for p in q.pos_ids if p in texts} | {norm(query_text)}
    out = np.ones(len(q.cand_ids), dtype=bool)
    for i, d in enumerate(q.cand_ids):
        if d in pos:
            stats.removed_positive += 1
        elif d in judged:
            stats.removed_judged += 1
        elif d == q.query_id:
            stats.removed_self += 1  # BEIR datasets where queries are also documents
        elif banned and d in texts and norm(texts[d]) in banned:
            stats.removed_duplicate_text += 1
        else:
            continue
        out[i] = False
    return out


def eligible_by_keys(q: QueryCandidates, stats: MiningStats) -> np.ndarray:
    """(K,) bool, as `eligible_mask` decides, with texts compared by their precomputed keys
    (`q.cand_keys`, `q.banned_keys`) instead of normalised per candidate: the fast path."""
    assert q.cand_keys is not None and q.banned_keys is not None
    pos, judged = set(q.pos_ids), set(q.judged_ids)
    is_pos = np.fromiter((d in pos for d in q.cand_ids), bool, len(q.cand_ids))  # (K,)
    is_judged = np.fromiter((d in judged for d in q.cand_ids), bool, len(q.cand_ids)) & ~is_pos
    is_self = np.fromiter((d == q.query_id for d in q.cand_ids), bool,
                          len(q.cand_ids)) & ~is_pos & ~is_judged
    is_dup = np.isin(q.cand_keys, q.banned_keys) & ~is_pos & ~is_judged & ~is_self
    stats.removed_positive += int(is_pos.sum())
    stats.removed_judged += int(is_judged.sum())
    stats.removed_self += int(is_self.sum())
    stats.removed_duplicate_text += int(is_dup.sum())
    return ~(is_pos | is_judged | is_self | is_dup)


def anchors(pos_scores: np.ndarray, mode: str) -> list[tuple[np.ndarray, float]]:
    """The training examples of one query: (indices of its positives, s+) for each.

    pair: one example per positive, anchored on its own score (the paper's formulation).
    min / max / mean: one example holding every positive, anchored on their min / max / mean.
    """
    if mode == "pair":
        return [(np.array([j]), float(s)) for j, s in enumerate(pos_scores)]
    s_plus = pos_scores.min() if mode == "min" else pos_scores.max() if mode == "max" else pos_scores.mean()
    return [(np.arange(len(pos_scores)), float(s_plus))]


@dataclass(frozen=True)
class Filtered:
    """A batch after the rule: its training examples and what each kept and dropped."""

    queries: list[QueryCandidates]  # those with positives
    examples: list[tuple[int, np.ndarray]]  # (query row, indices of its positives) per example
    scores: np.ndarray  # (nq, K) teacher scores, -inf padding
    keep: np.ndarray  # (ne, K) survivors of the rule, inside each example's window
    dropped: np.ndarray  # (ne, K) refused by the rule before the window closed


def filter_batch(batch: Sequence[QueryCandidates], cfg: MiningConfig,
                 texts: Mapping[str, str] | None, query_texts: Mapping[str, str] | None,
                 stats: MiningStats) -> Filtered:
    """Eligibility, anchors and the batched rule for a batch of queries (counts into `stats`)."""
    with_pos = [q for q in batch if len(q.pos_ids) > 0]
    stats.queries_in += len(batch)
    stats.queries_no_positive += len(batch) - len(with_pos)
    width = max((len(q.cand_ids) for q in with_pos), default=0)
    scores = np.full((len(with_pos), width), -np.inf, dtype=np.float64)  # (nq, K)
    eligible = np.zeros((len(with_pos), width), dtype=bool)
    examples: list[tuple[int, np.ndarray]] = []
    anchor_list: list[float] = []
    for i, q in enumerate(with_pos):
        n = len(q.cand_ids)
        scores[i, :n] = q.cand_scores
        qtext = (query_texts or {}).get(q.query_id, "")
        eligible[i, :n] = (eligible_by_keys(q, stats) if q.cand_keys is not None
                           else eligible_mask(q, texts, qtext, cfg, stats))
        stats.candidates += n
        stats.positives += len(q.pos_ids)
        stats.judged_below_min += len(q.judged_ids)
        stats.positives_not_in_topk += len(set(q.pos_ids) - set(q.cand_ids))
        for pos, s_plus in anchors(np.asarray(q.pos_scores), cfg.anchor):
            examples.append((i, pos))
            anchor_list.append(s_plus)
    stats.hist_positive += _hist(np.concatenate([np.zeros(0), *(q.pos_scores for q in with_pos)]))
    qrow = np.array([i for i, _ in examples], dtype=np.int64)  # (ne,) example -> query row
    keep, dropped = rule_keep(scores[qrow], eligible[qrow], np.array(anchor_list), cfg)  # (ne, K)
    stats.examples += len(examples)
    stats.dropped_by_rule += int(dropped.sum())
    stats.hist_dropped += _hist(scores[qrow][dropped])
    return Filtered(with_pos, examples, scores, keep, dropped)


def mine(batch: Sequence[QueryCandidates], cfg: MiningConfig,
         texts: Mapping[str, str] | None = None,
         query_texts: Mapping[str, str] | None = None,
         stats: MiningStats | None = None) -> tuple[list[dict[str, Any]], MiningStats]:
    """Apply the rule and the sampling to a batch of queries.

    Each query gives one example per anchor (`anchors`): with `cfg.anchor == "pair"` one per
    positive, else one holding all its positives. Returns one dict per kept example
    (`query_id, positive_ids, positive_scores, negative_ids, negative_scores,
    query_positive_ids`) and the stats, updated in place when given.
    """
    stats = stats or MiningStats()
    return choose(filter_batch(batch, cfg, texts, query_texts, stats), cfg, stats), stats


def choose(f: Filtered, cfg: MiningConfig, stats: MiningStats) -> list[dict[str, Any]]:
    """Each example's negatives from its survivors (`select`), as the rows `mine` returns."""
    rows, short_queries, kept_queries = [], set(), set()
    kept_scores: list[np.ndarray] = []
    for e, (i, pos) in enumerate(f.examples):
        q = f.queries[i]
        pos_ids = [q.pos_ids[j] for j in pos]
        key = q.query_id if cfg.anchor != "pair" else f"{q.query_id}\x1f{pos_ids[0]}"
        # a generator costs ~15 us to seed: only the sampling modes draw from one
        rng = None if cfg.sampling == "topk" else query_rng(cfg.seed, key)
        chosen = select(np.flatnonzero(f.keep[e]), f.scores[i], cfg, rng)
        if len(chosen) < cfg.num_negatives:
            stats.examples_too_few += 1
            short_queries.add(q.query_id)
            if cfg.too_few == "drop":
                stats.examples_dropped_too_few += 1
                continue
        kept_queries.add(q.query_id)
        stats.negatives_kept += len(chosen)
        kept_scores.append(f.scores[i, chosen])
        rows.append({
            "query_id": q.query_id,
            "positive_ids": pos_ids,
            "positive_scores": [float(q.pos_scores[j]) for j in pos],
            "negative_ids": [q.cand_ids[j] for j in chosen],
            "negative_scores": [float(f.scores[i, j]) for j in chosen],
            # what training masks as known positives: the judged under the grade too
            "query_positive_ids": [*q.pos_ids, *(d for d in q.judged_ids if d not in q.pos_ids)],
        })
    stats.hist_kept += _hist(np.concatenate([np.zeros(0), *kept_scores]))
    stats.examples_out += len(rows)
    stats.queries_out += len(kept_queries)
    stats.queries_too_few += len(short_queries)
    stats.queries_dropped_too_few += len(short_queries - kept_queries)
    return rows


def _stat(stats: MiningStats | Mapping[str, Any], key: str) -> int:
    return int(stats.get(key, 0) if isinstance(stats, Mapping) else getattr(stats, key))


def short_share(stats: MiningStats | Mapping[str, Any]) -> float:
    """The share of examples mined with fewer than `num_negatives` negatives."""
    return _stat(stats, "examples_too_few") / max(1, _stat(stats, "examples"))


def starvation_warning(stats: MiningStats | Mapping[str, Any], cfg: MiningConfig,
                       limit: float = 0.2) -> str | None:
    """A message naming the likely cause and the setting to change, when over `limit` of the
    examples end short of negatives; None otherwise."""
    share = short_share(stats)
    if share <= limit:
        return None
    msg = (f"{share:.0%} of training examples ({_stat(stats, 'examples_too_few')} of "
           f"{_stat(stats, 'examples')}) "
           f"have fewer than mining.num_negatives={cfg.num_negatives} negatives")
    anchored = cfg.rule in ("topk_percpos", "topk_marginpos")
    if anchored and cfg.anchor in ("min", "mean"):
        what = {"min": "the weakest positive's score", "mean": "the mean positive score"}[cfg.anchor]
        why = (f"mining.anchor={cfg.anchor} anchors on {what}, and weak positives (queries "
               "with many positives have them) score below most of the teacher's top "
               "candidates; mining.anchor=pair (the default) gives each positive its own "
               "example, mining.anchor=max anchors on the strongest positive")
    elif survivor_window(cfg):
        why = ("weak positives sit deeper in the teacher's ranking than mining.max_depth="
               f"{cfg.max_depth} candidates (or near the end of the corpus), leaving too few "
               "below them; raise mining.max_depth, or keep the shortfall (mining.too_few)")
    elif anchored and cfg.anchor == "pair":
        why = ("the window is the teacher's first mining.top_k candidates and weak positives "
               "score below most of them, so the rule drops them all; mining.window=survivors "
               "(the default) fills each window with candidates that pass the rule")
    elif anchored:
        why = ("weak positives leave few candidates below their score; raise mining.top_k, "
               f"loosen the rule (mining.{'perc' if cfg.rule == 'topk_percpos' else 'margin'}), "
               "or keep the shortfall (mining.too_few)")
    elif cfg.rule == "topk_abs":
        why = "most candidates score above mining.threshold; raise it"
    else:
        why = "the teacher retrieved too few candidates; raise mining.top_k"
    return f"{msg}: {why}"


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


def example_key(row: Mapping[str, Any]) -> str:
    """A mined example's identity across teachers: its query and its positives."""
    return "\x1f".join([row["query_id"], *row["positive_ids"]])


def combine_mined(per_teacher: Sequence[Sequence[Mapping[str, Any]]],
                  cfg: MiningConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Merge several teachers' mined rows (schema `schemas.MINED`) into one row per example.

    Each teacher mined with the same rule against its own s+; per example (`example_key`: a
    query, or a (query, positive) pair with anchor=pair), `combine_teachers`
    (`cfg.combine`) takes `cfg.num_negatives` from the teachers that kept the query, first
    teacher first. Positives and their scores are the first such teacher's; each negative keeps
    the score of the teacher whose list it was taken from, so scores mix the teachers' scales.
    Examples are in the first teacher's order, then any only later teachers kept.
    """
    by_query = [{example_key(r): r for r in rows} for rows in per_teacher]
    order = list(dict.fromkeys(example_key(r) for rows in per_teacher for r in rows))
    stats: dict[str, Any] = {"examples": len(order), "examples_too_few": 0,
                             "examples_dropped_too_few": 0,
                             "queries_in": len({r["query_id"] for rows in per_teacher for r in rows}),
                             "queries_too_few": 0,
                             "queries_dropped_too_few": 0, "negatives_in_several_teachers": 0,
                             "negatives_in_teacher": [0] * len(per_teacher)}
    out, short, kept = [], set(), set()
    for key in order:
        have = [t for t, rows in enumerate(by_query) if key in rows]
        first = by_query[have[0]][key]
        lists = [list(zip(by_query[t][key]["negative_ids"], by_query[t][key]["negative_scores"],
                          strict=True)) for t in have]
        rng = query_rng(cfg.seed, first["query_id"] if cfg.anchor != "pair" else key)
        chosen = combine_teachers(lists, cfg.combine, cfg.num_negatives, rng)
        if len(chosen) < cfg.num_negatives:
            stats["examples_too_few"] += 1
            short.add(first["query_id"])
            if cfg.too_few == "drop":
                stats["examples_dropped_too_few"] += 1
                continue
        kept.add(first["query_id"])
        texts = {d: x for t in have
                 for d, x in zip(by_query[t][key]["negative_ids"], by_query[t][key]["negatives"],
                                 strict=True)}
        for doc, _ in chosen:
            holders = [t for t in have if doc in by_query[t][key]["negative_ids"]]
            stats["negatives_in_several_teachers"] += len(holders) > 1
            for t in holders:
                stats["negatives_in_teacher"][t] += 1
        out.append({**first,
                    "negative_ids": [d for d, _ in chosen],
                    "negative_scores": [float(s) for _, s in chosen],
                    "negatives": [texts[d] for d, _ in chosen]})
    stats.update(queries_too_few=len(short), queries_dropped_too_few=len(short - kept),
                 queries_out=len(kept), examples_out=len(out),
                 negatives_kept=sum(len(r["negative_ids"]) for r in out))
    return out, stats
