"""The data stage: validate the dataset (BEIR, `io/beir.py`, or the other formats,
`io/sources.py`) and write it as the prepared folder (`io/prepared.py`) under `<out_dir>/data`.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from posmine.config import DataConfig, config_hash
from posmine.core.mining import normalize_text
from posmine.io import sources, storage
from posmine.io.beir import load

# The input files' common ground, shared with the other formats' readers (`sources`).
from posmine.io.inputs import (
    sample_queries,
    split_queries,
)
from posmine.io.prepared import (
    JUDGED,
    MAX_POSITIVES,
    NEGATIVES,
    QUERIES,
    max_positives,
    sort_by_length,
    split_by_grade,
)
from posmine.stages import lifecycle

log = logging.getLogger(__name__)


def split_dev(qrels: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Split train qrels by query into (train, dev), seeded; all rows of a query stay together."""
    n = pc.count_distinct(qrels.column("query_id")).as_py()
    return split_queries(qrels, max(1, round(n * fraction)) if fraction > 0 else 0, seed)


def subset_queries(qrels: pa.Table, max_queries: int | None, seed: int) -> pa.Table:
    """At most `max_queries` queries of `qrels` (seeded sample), all their rows kept."""
    if max_queries is None or pc.count_distinct(qrels.column("query_id")).as_py() <= max_queries:
        return qrels
    return qrels.filter(pc.is_in(qrels.column("query_id"),
                                 value_set=sample_queries(qrels, max_queries, seed)))


def prepared_qrels(qrels: dict[str, pa.Table], cfg: DataConfig) -> dict[str, pa.Table]:
    """Qrels per split, with a seeded dev hold-out of train when the dataset has no dev."""
    qrels = dict(qrels)
    if "dev" not in qrels and "train" in qrels:
        rest, dev = split_dev(qrels["train"], cfg.dev_fraction, cfg.seed)
        qrels["dev"] = dev
        if cfg.holdout_dev:
            qrels["train"] = rest
    return {s: subset_queries(t, cfg.max_queries, cfg.seed) for s, t in qrels.items()}


def share_positives_by_text(qrels: pa.Table, queries: pa.Table) -> tuple[pa.Table, int]:
    """Queries of `qrels` with the same text after `mining.normalize_text` (and different ids)
    share their positives: each gains the others' relevant rows it lacks, with their scores.
    Returns the qrels and how many queries gained a positive."""
    ids = pc.unique(qrels.column("query_id").combine_chunks())
    mine = queries.filter(pc.is_in(queries.column("id"), ids))
    groups: dict[str, list[str]] = {}
    for q, t in zip(mine.column("id").to_pylist(), mine.column("text").to_pylist(), strict=True):
        groups.setdefault(normalize_text(t), []).append(q)
    same = {q: g for g in groups.values() if len(g) > 1 for q in g}  # query -> its text's queries
    if not same:
        return qrels, 0
    sub = qrels.filter(pc.is_in(qrels.column("query_id"), pa.array(sorted(same))))
    rows = sub.to_pylist()
    have = {(r["query_id"], r["doc_id"]) for r in rows}
    extra: list[dict[str, Any]] = []
    for r in rows:
        for q in same[r["query_id"]] if r["score"] > 0 else ():
            if (q, r["doc_id"]) not in have:
                have.add((q, r["doc_id"]))
                extra.append({**r, "query_id": q})
    gained = len({r["query_id"] for r in extra})
    return pa.concat_tables([qrels, pa.Table.from_pylist(extra, schema=qrels.schema)]), gained


def _write_judged(prepared: dict[str, pa.Table], cfg: DataConfig, target: str) -> dict[str, Any]:
    """With `data.min_positive_score` above 1: the mined split's judgements under it leave its
    qrels (in place in `prepared`) for `judged/<split>.parquet`. Returns the counts ({} if off)."""
    if cfg.min_positive_score <= 1 or cfg.split not in prepared:
        return {}
    table = prepared[cfg.split]
    positives, judged = split_by_grade(table, cfg.min_positive_score)
    prepared[cfg.split] = positives
    storage.write_parquet(judged, storage.join(target, JUDGED, f"{cfg.split}.parquet"))
    relevant = positives.filter(pc.greater(positives.column("score"), 0))
    left = set(judged.column("query_id").to_pylist()) - set(relevant.column("query_id").to_pylist())
    counts = {"min_positive_score": cfg.min_positive_score, "split": cfg.split,
              "positives": relevant.num_rows, "judged_below": judged.num_rows,
              "queries_left_without_positive": len(left)}
    log.info("data: %s: %d judgements at or above %d are positives, %d below it are never negatives",
             cfg.split, counts["positives"], cfg.min_positive_score, judged.num_rows)
    return counts


# ---------------------------------------------------------------- the data stage


def stage_dir(out_dir: str) -> str:
    return storage.join(out_dir, "data")


def run(cfg: DataConfig, out_dir: str) -> dict[str, Any]:
    """Validate the dataset and write it as Parquet under `<out_dir>/data` (skipped if current).

    BEIR folders are streamed; the other formats (`sources.py`) are read whole, then written
    the same way, with the file's own negatives in `negatives.parquet`.
    """
    target = stage_dir(out_dir)
    inputs = sources.input_fingerprints(cfg)

    def work() -> lifecycle.Done:
        # an earlier dataset's files must not outlive it
        for old in ("corpus", QUERIES, "qrels", NEGATIVES, JUDGED):
            storage.remove(storage.join(target, old))
        fmt = sources.detect(cfg.path) if cfg.format == "auto" else cfg.format
        log.debug("data: reading %s as %s", storage.redact(cfg.path), fmt)

        def write_chunk(i: int, chunk: pa.Table) -> None:
            storage.write_parquet(sort_by_length(chunk),
                                  storage.join(target, "corpus", f"part-{i:05d}.parquet"))

        outputs = [QUERIES]
        if fmt == "beir":
            ds = load(cfg.path, sink=write_chunk, rows_per_part=cfg.rows_per_part)
            queries, qrels, warnings = ds.queries, ds.qrels, ds.warnings
            source: dict[str, Any] = {"format": "beir"}
            n_corpus = len(ds.corpus_ids)
        else:
            t = sources.load(cfg, fmt)
            for i, start in enumerate(range(0, t.corpus.num_rows, cfg.rows_per_part)):
                write_chunk(i, t.corpus.slice(start, cfg.rows_per_part))
            storage.write_parquet(t.negatives, storage.join(target, NEGATIVES))
            queries, qrels, warnings, source = t.queries, t.qrels, t.warnings, t.summary
            outputs.append(NEGATIVES)
            n_corpus = t.corpus.num_rows
        for i, start in enumerate(range(0, max(1, queries.num_rows), cfg.rows_per_part)):
            storage.write_parquet(queries.slice(start, cfg.rows_per_part),
                                  storage.join(target, QUERIES, f"part-{i:05d}.parquet"))
        prepared = prepared_qrels(qrels, cfg)
        shared = 0
        if cfg.share_positives_by_text and cfg.split in prepared:
            prepared[cfg.split], shared = share_positives_by_text(prepared[cfg.split], queries)
            if shared:
                log.info("data: %d %s queries gained the positives of queries of the same text",
                         shared, cfg.split)
        graded = _write_judged(prepared, cfg, target)
        for split, table in prepared.items():
            storage.write_parquet(table, storage.join(target, "qrels", f"{split}.parquet"))
        rows = {"corpus": n_corpus, "queries": queries.num_rows,
                **{f"qrels_{s}": t.num_rows for s, t in prepared.items()}}
        return lifecycle.Done(rows, stats={"warnings": warnings.counts, "source": source,
                                         "dev_source": "file" if "dev" in qrels else "heldout",
                                         "queries_given_same_text_positives": shared,
                                         "graded": graded,
                                         MAX_POSITIVES: {s: max_positives(t)
                                                         for s, t in prepared.items()}},
                            extra={"inputs": inputs},
                            outputs=[*outputs, *(f"qrels/{s}.parquet" for s in prepared),
                                     *([f"{JUDGED}/{cfg.split}.parquet"] if graded else [])])

    return lifecycle.run_stage(target, "data", config_hash(cfg, inputs), work,
                             current_because="the inputs' content and the data settings are unchanged")
