"""The mine stage: candidates + qrels + teacher scores -> mined examples (Parquet) and stats.

Reads the search stage's `candidates.parquet`, the data stage's qrels and texts, and the
embed stage's vectors (for the positives' teacher scores, which the top-K may not hold).
Writes `<out>/mine/mined.parquet` (schema `schemas.MINED`: one row per training example,
i.e. per query, or per (query, positive) with `mining.anchor=pair`) and a manifest with the
rule, its parameters and the counts of `mining.MiningStats`; warns when over 20% of the
examples end short of negatives. `export.py` writes it in other trainers' formats.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from posmine import data, mining, schemas, storage
from posmine.config import MiningConfig, config_hash, to_dict
from posmine.embed import embedding_matrix, read_embeddings
from posmine.rescore import CrossEncoderScorer, rescore

BATCH = 4096  # queries per call of the pure miner
ROW_GROUP = 4096  # mined rows per Parquet row group
log = logging.getLogger(__name__)


def positive_scores(embed_dir: str, positives: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Teacher score s(q, d) for every query's listed documents (its positives, or the file's
    negatives): (P,) per query."""
    qids, qmat = read_embeddings(storage.join(embed_dir, "queries"))
    need = {d for ps in positives.values() for d in ps}
    table = storage.read_parquet(storage.join(embed_dir, "corpus"))
    table = table.filter(pc.is_in(table.column("id"), pa.array(sorted(need))))
    dmat = embedding_matrix(table)  # (D, dim)
    drow = {d: i for i, d in enumerate(table.column("id").to_pylist())}
    qrow = {q: i for i, q in enumerate(qids)}
    out = {}
    for q, ps in positives.items():
        rows = [drow[p] for p in ps]
        out[q] = dmat[rows] @ qmat[qrow[q]]  # (P, dim) @ (dim,) -> (P,)
    return out


def run(cfg: MiningConfig, data_dir: str, embed_dir: str, cand_dirs: Sequence[str], out_dir: str,
        split: str, upstream: str, name: str = "mine") -> dict[str, Any]:
    """Mine `split` into `<out_dir>/<name>` (skipped when current); returns the manifest.

    `cand_dirs`: the search stages to read, shallowest first; a query's list in a later one
    (searched deeper) replaces its earlier one.
    """
    target = storage.join(out_dir, name)

    def work() -> storage.Done:
        rows, stats = mine_rows(cfg, data_dir, embed_dir, cand_dirs, split)
        return _write(cfg, target, rows, stats.to_dict(), f"mine {split}",
                      {"rule": cfg.rule, "mining": to_dict(cfg), "split": split,
                       "candidate_dirs": [storage.redact(d) for d in cand_dirs]})

    return storage.run_stage(target, "mine", config_hash(cfg, upstream, split), work)


def read_candidates(cand_dirs: Sequence[str]) -> list[dict[str, Any]]:
    """Each query's deepest candidate list, in the first stage's query order."""
    merged: dict[str, dict[str, Any]] = {}
    for d in cand_dirs:
        for c in storage.read_parquet(storage.join(d, "candidates.parquet")).to_pylist():
            merged[c["query_id"]] = c
    return list(merged.values())


def _query_candidates(c: Mapping[str, Any], positives: Mapping[str, list[str]],
                      pos_scores: Mapping[str, np.ndarray]) -> mining.QueryCandidates:
    return mining.QueryCandidates(c["query_id"], c["doc_ids"], np.asarray(c["scores"], np.float64),
                                  positives.get(c["query_id"], []),
                                  pos_scores.get(c["query_id"], np.zeros(0)))


def unfilled(cfgs: Sequence[MiningConfig], data_dir: str, embed_dir: str, cand_dir: str, split: str,
             depth: int) -> list[str]:
    """Queries of `cand_dir` (searched `depth` deep) whose `survivors` windows need a deeper
    list under some setting of `cfgs`: fewer than top_k candidates under the lowest bound, and
    the corpus not yet ended."""
    positives = data.positives_by_query(data.read_prepared_qrels(data_dir, split))
    pos_scores = positive_scores(embed_dir, positives)
    cands = storage.read_parquet(storage.join(cand_dir, "candidates.parquet")).to_pylist()
    queries = [_query_candidates(c, positives, pos_scores) for c in cands
               if c["query_id"] in positives and len(c["doc_ids"]) >= depth]
    return [q.query_id for q in queries if any(mining.window_end(q, m) is None for m in cfgs)]


def mine_rows(cfg: MiningConfig, data_dir: str, embed_dir: str, cand_dirs: Sequence[str],
              split: str) -> tuple[list[dict[str, Any]], mining.MiningStats]:
    """The pure miner over the search stage's candidates, with texts and hashes joined in.

    With `survivors` windows each list is first cut where its windows end (`mining.cut_to_window`).
    """
    positives = data.positives_by_query(data.read_prepared_qrels(data_dir, split))
    # the negatives the training file listed (`mining.existing_negatives=candidates`), scored in
    # the same pass over the teacher's embeddings as the positives
    listed = ({q: ds for q, ds in data.file_negatives(data_dir).items() if q in positives}
              if cfg.existing_negatives == "candidates" else {})
    scores = positive_scores(embed_dir, {q: ps + listed.get(q, []) for q, ps in positives.items()})
    pos_scores = {q: s[:len(positives[q])] for q, s in scores.items()}
    stats = mining.MiningStats()
    queries = [_query_candidates(c, positives, pos_scores) for c in read_candidates(cand_dirs)]
    if listed:
        queries = _join_file_negatives(queries, listed, {q: scores[q][len(positives[q]):] for q in listed},
                                       stats)
    queries = [mining.cut_to_window(q, cfg) for q in queries]
    need = {d for q in queries for d in q.cand_ids} | {d for p in positives.values() for d in p}
    texts = data.read_texts(storage.join(data_dir, "corpus"), need)
    qtexts = data.read_texts(storage.join(data_dir, "queries.parquet"), {q.query_id for q in queries})
    scorer = CrossEncoderScorer(cfg.cross_encoder) if cfg.cross_encoder else None
    rows: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(queries), BATCH), desc="mining", unit="batch"):
        batch = queries[start:start + BATCH]
        if scorer is not None:
            batch = rescore(batch, scorer, texts, qtexts)
        mined, _ = mining.mine(batch, cfg, texts, qtexts, stats)
        rows.extend(mined)
    hashes = {d: mining.text_hash(t) for d, t in texts.items()}
    for r in rows:
        r["query"] = qtexts[r["query_id"]]
        r["positives"] = [texts[d] for d in r["positive_ids"]]
        r["negatives"] = [texts[d] for d in r["negative_ids"]]
        r["query_positive_hashes"] = [hashes[d] for d in r["query_positive_ids"]]
    return rows, stats


def _join_file_negatives(queries: list[mining.QueryCandidates], listed: Mapping[str, list[str]],
                         scores: Mapping[str, np.ndarray],
                         stats: mining.MiningStats) -> list[mining.QueryCandidates]:
    """Each query's candidates with the negatives its training file listed (`data.NEGATIVES`)
    added, with their teacher `scores` ((n,) per query)."""
    out = []
    for q in queries:
        joined, n = mining.join_candidates(q, listed.get(q.query_id, []),
                                           scores.get(q.query_id, np.zeros(0)))
        stats.existing_negatives_joined += n
        out.append(joined)
    return out


def _write(cfg: MiningConfig, target: str, rows: list[dict[str, Any]], stats: dict[str, Any],
           what: str, extra: dict[str, Any]) -> storage.Done:
    """mined.parquet, the short-of-negatives share, and the warning when it is too high."""
    table = pa.Table.from_pylist(rows, schema=schemas.MINED)
    # row groups of ROW_GROUP rows: training reads only the groups its steps use
    storage.write_parquet(table, storage.join(target, "mined.parquet"), row_group_size=ROW_GROUP)
    stats = {**stats, "short_share": round(mining.short_share(stats), 4),
             "warning": mining.starvation_warning(stats, cfg)}
    if stats["warning"]:
        log.warning("%s: %s", what, stats["warning"])
    return storage.Done({"queries_in": stats["queries_in"], "queries_out": stats["queries_out"],
                         "examples": table.num_rows}, stats=stats, extra=extra,
                        outputs=["mined.parquet"])


def combine(cfg: MiningConfig, teachers: Sequence[Mapping[str, Any]], out_dir: str,
            name: str = "mine") -> dict[str, Any]:
    """Merge the mine outputs of several teachers into `<out_dir>/<name>` (`mining.combine`).

    `teachers` are the finished mine stages' manifests (with their "dir"), the primary
    teacher's first; skipped when current.
    """
    target = storage.join(out_dir, name)
    key = config_hash(cfg, config_hash(*(t["config_hash"] for t in teachers)), "combine")

    def work() -> storage.Done:
        teacher_dirs = [t["dir"] for t in teachers]
        per_teacher = [storage.read_parquet(storage.join(d, "mined.parquet")).to_pylist()
                       for d in teacher_dirs]
        rows, stats = mining.combine_mined(per_teacher, cfg)
        stats["teachers"] = [t["stats"] for t in teachers]
        return _write(cfg, target, rows, stats, f"mine ({len(teachers)} teachers)",
                      {"rule": cfg.rule, "mining": to_dict(cfg), "combine": cfg.combine,
                       "teacher_dirs": teacher_dirs})

    return storage.run_stage(target, "mine", key, work)
