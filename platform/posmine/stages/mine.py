"""The mine stage: candidates + teacher scores -> mined examples (Parquet) and stats, on Ray Data.

Reads the search stage's candidate shards (`candidates.parquet/part-*.parquet`: each query's
top-K, its positives and its file negatives with their teacher scores) and maps the pure miner
(`mining.py`) over them with `map_batches` on an actor pool, one candidate shard per call,
the stream run from a one-shot Ray task (`remote.in_task`: the pool goes with the task). The
texts and their duplicate keys come from `TextShard` actors that hold the corpus and queries
split by id across the cluster (`textstore.py`): no process holds every text, and a text is
normalised once, not once per candidate. Each call writes one mined shard,
`mined.parquet/part-<search round>-<shard>.parquet` (schema `schemas.MINED`: one row per
training example, i.e. per query, or per (query, positive) with `mining.anchor=pair`), and
returns its `mining.MiningStats`; the manifest, written last, sums them. Few candidates over a
corpus that one text shard holds are mined in this process, shard by shard, without a pool.
Warns when over 20% of the examples end short of negatives. `export.py` writes the result in
other trainers' formats. `mine_rows` is the simple one-process reference the tests hold the stage to.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from posmine.config import MiningConfig, config_hash, to_dict
from posmine.core import mining
from posmine.io import prepared, schemas, storage
from posmine.io.candidates import (
    Rounds,
    candidate_shards,
    read_candidates,
    read_shard,
    shard_list,
    shard_queries,
    with_keys,
)
from posmine.io.textstore import TextStore
from posmine.io.vectors import positive_scores
from posmine.models.rescore import CrossEncoderScorer, rescore
from posmine.stages import lifecycle, remote

BATCH = 4096  # queries per call of the pure miner
ROW_GROUP = 4096  # mined rows per Parquet row group
MINED = "mined.parquet"  # a folder of shards
log = logging.getLogger(__name__)


def run(cfg: MiningConfig, data_dir: str, cand_dirs: Sequence[str], out_dir: str,
        split: str, upstream: str, name: str = "mine",
        auto: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mine `split` into `<out_dir>/<name>` (skipped when current); returns the manifest.

    `cand_dirs`: the search stages to read, shallowest first; a query's list in a later one
    (searched deeper) replaces its earlier one. `auto`: how `perc: auto` (or `margin: auto`)
    was picked, for the manifest.
    """
    target = storage.join(out_dir, name)

    def work() -> lifecycle.Done:
        out = storage.join(target, MINED)
        storage.remove(out)  # shards of an interrupted run are redone, not mixed in
        stats, examples = mine_shards(cfg, data_dir, cand_dirs, out, split)
        return _done(cfg, examples, stats, f"mine {split}",
                     {"rule": cfg.rule, "mining": to_dict(cfg), "split": split,
                      "candidate_dirs": [storage.redact(d) for d in cand_dirs],
                      **({"auto": auto} if auto else {})})

    return lifecycle.run_stage(target, "mine", config_hash(cfg, upstream, split), work)


def mine_shards(cfg: MiningConfig, data_dir: str, cand_dirs: Sequence[str],
                out: str, split: str) -> tuple[dict[str, Any], int]:
    """`MineShard` over every candidate shard (`remote.over_shards`); returns the summed stats
    and the number of examples written. The driver sees one small row of stats per shard."""
    return remote.over_shards(
        MineShard, {"cfg": cfg, "out": out, "cand_dirs": list(cand_dirs), "split": (data_dir, split)},
        shard_list(cand_dirs), data_dir, cfg.dedup_text, "mine", _totals)


def _totals(rows: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Any], int]:
    """The shards' stats summed, and their examples counted."""
    stats, examples = mining.MiningStats(), 0
    for row in rows:
        stats.add(json.loads(row["stats"]))
        examples += int(row["examples"])
    return stats.to_dict(), examples


class MineShard:
    """Ray Data actor: mines one candidate shard per call and writes its mined shard.

    `cand_dirs`: every search round's stage, shallowest first. A query searched again deeper
    keeps only its deepest list: round j skips the query ids of the rounds after it, read here
    (not in the driver) the first time a shard of round j comes. `split`: (data folder, split)
    whose judgements under `data.min_positive_score` its queries are given."""

    def __init__(self, cfg: MiningConfig, out: str, store: TextStore, cand_dirs: list[str],
                 split: tuple[str, str]) -> None:
        self.cfg, self.out, self.store, self.rounds = cfg, out, store, Rounds(cand_dirs)
        self.judged = prepared.judged_by_query(*split)
        self.scorer = CrossEncoderScorer(cfg.cross_encoder) if cfg.cross_encoder else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        names, counts, stats = [], [], []
        for j, url in zip(batch.column("round").to_pylist(), batch.column("url").to_pylist(),
                          strict=True):
            table = self.rounds.deepest(j, read_shard(url))
            rows, st = mine_table(self.cfg, table, self.store, self.scorer, self.judged)
            name = f"part-{j}-{url.rsplit('/', 1)[-1].removeprefix('part-')}"
            storage.write_parquet(pa.Table.from_pylist(rows, schema=schemas.MINED),
                                  storage.join(self.out, name), row_group_size=ROW_GROUP)
            names.append(name)
            counts.append(len(rows))
            stats.append(json.dumps(st.to_dict()))
        return pa.table({"shard": names, "examples": counts, "stats": stats})


def mine_table(cfg: MiningConfig, table: pa.Table, store: TextStore,
               scorer: CrossEncoderScorer | None = None,
               judged: Mapping[str, Sequence[str]] | None = None
               ) -> tuple[list[dict[str, Any]], mining.MiningStats]:
    """Mine one candidate shard: windows cut, duplicate keys and texts fetched from `store`."""
    stats = mining.MiningStats()
    queries = shard_queries(table, judged)
    if cfg.existing_negatives == "candidates":
        listed = dict(zip(table.column("query_id").to_pylist(),
                          zip(table.column("file_negative_ids").to_pylist(),
                              table.column("file_negative_scores").to_pylist(), strict=True),
                          strict=True))
        queries = _join_file_negatives(queries, {q: ids for q, (ids, _) in listed.items()},
                                       {q: np.asarray(s, np.float64) for q, (_, s) in listed.items()},
                                       stats)
    queries = [mining.cut_to_window(q, cfg) for q in queries]
    if scorer is not None:
        need = {d for q in queries for d in [*q.cand_ids, *q.pos_ids]}
        texts = store.texts("corpus", sorted(need))
        queries = rescore(queries, scorer, texts, store.texts("queries", [q.query_id for q in queries]))
    queries = with_keys(queries, store, cfg.dedup_text)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(queries), BATCH):
        rows.extend(mining.mine(queries[start:start + BATCH], cfg, stats=stats)[0])
    _add_texts(rows, store)
    return rows, stats


def _add_texts(rows: list[dict[str, Any]], store: TextStore) -> None:
    """The mined rows' texts and their positives' `mining.text_hash` (training's duplicate check)."""
    docs = sorted({d for r in rows for d in (*r["positive_ids"], *r["negative_ids"],
                                             *r["query_positive_ids"])})
    texts = store.texts("corpus", docs)
    hashes = dict(zip(docs, store.hashes("corpus", docs).tolist(), strict=True))
    qtexts = store.texts("queries", sorted({r["query_id"] for r in rows}))
    for r in rows:
        r["query"] = qtexts[r["query_id"]]
        r["positives"] = [texts[d] for d in r["positive_ids"]]
        r["negatives"] = [texts[d] for d in r["negative_ids"]]
        r["query_positive_hashes"] = [hashes[d] for d in r["query_positive_ids"]]


def _query_candidates(c: Mapping[str, Any], positives: Mapping[str, list[str]],
                      pos_scores: Mapping[str, np.ndarray],
                      judged: Mapping[str, list[str]]) -> mining.QueryCandidates:
    return mining.QueryCandidates(c["query_id"], c["doc_ids"], np.asarray(c["scores"], np.float64),
                                  positives.get(c["query_id"], []),
                                  pos_scores.get(c["query_id"], np.zeros(0)),
                                  judged_ids=judged.get(c["query_id"], ()))


def unfilled(cfgs: Sequence[MiningConfig], cand_dir: str, depth: int) -> pa.Array:
    """Queries of `cand_dir` (searched `depth` deep) whose `survivors` windows need a deeper
    list under some setting of `cfgs`: fewer than top_k candidates under the lowest bound, and
    the corpus not yet ended. Reads one candidate shard at a time."""
    out: list[pa.Array] = []
    for url in candidate_shards(cand_dir):
        table = storage.read_parquet(url)
        short = [bool(len(q.pos_ids) and len(q.cand_ids) >= depth
                      and any(mining.window_end(q, m) is None for m in cfgs))
                 for q in shard_queries(table)]
        out.append(table.column("query_id").combine_chunks().filter(pa.array(short, pa.bool_())))
    return pa.concat_arrays(out) if out else pa.array([], pa.string())


def mine_rows(cfg: MiningConfig, data_dir: str, embed_dir: str, cand_dirs: Sequence[str],
              split: str) -> tuple[list[dict[str, Any]], mining.MiningStats]:
    """The reference: the pure miner in one process over every candidate, with the positives'
    scores from the embeddings and every text read and normalised per candidate
    (`mining.eligible_mask`). The stage must mine the same examples (tests/test_mine_scale.py).
    """
    positives = prepared.positives_by_query(prepared.read_prepared_qrels(data_dir, split))
    listed = ({q: ds for q, ds in prepared.file_negatives(data_dir).items() if q in positives}
              if cfg.existing_negatives == "candidates" else {})
    scores = positive_scores(embed_dir, {q: ps + listed.get(q, []) for q, ps in positives.items()})
    pos_scores = {q: s[:len(positives[q])] for q, s in scores.items()}
    stats = mining.MiningStats()
    judged = prepared.judged_by_query(data_dir, split)
    queries = [_query_candidates(c, positives, pos_scores, judged) for c in read_candidates(cand_dirs)]
    if listed:
        queries = _join_file_negatives(queries, listed, {q: scores[q][len(positives[q]):] for q in listed},
                                       stats)
    queries = [mining.cut_to_window(q, cfg) for q in queries]
    need = ({d for q in queries for d in q.cand_ids} | {d for p in positives.values() for d in p}
            | {d for j in judged.values() for d in j})
    texts = prepared.read_texts(storage.join(data_dir, "corpus"), need)
    qtexts = prepared.read_texts(storage.join(data_dir, prepared.QUERIES), {q.query_id for q in queries})
    scorer = CrossEncoderScorer(cfg.cross_encoder) if cfg.cross_encoder else None
    rows: list[dict[str, Any]] = []
    for start in range(0, len(queries), BATCH):
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
    """Each query's candidates with the negatives its training file listed (`prepared.NEGATIVES`)
    added, with their teacher `scores` ((n,) per query)."""
    out = []
    for q in queries:
        joined, n = mining.join_candidates(q, listed.get(q.query_id, []),
                                           scores.get(q.query_id, np.zeros(0)))
        stats.existing_negatives_joined += n
        out.append(joined)
    return out


def _done(cfg: MiningConfig, examples: int, stats: dict[str, Any], what: str,
          extra: dict[str, Any]) -> lifecycle.Done:
    """The manifest's content: counts, the short-of-negatives share, and the warning when it is
    too high."""
    stats = {**stats, "short_share": round(mining.short_share(stats), 4),
             "warning": mining.starvation_warning(stats, cfg)}
    if stats["warning"]:
        log.warning("%s: %s", what, stats["warning"])
    return lifecycle.Done({"queries_in": stats["queries_in"], "queries_out": stats["queries_out"],
                         "examples": examples}, stats=stats, extra=extra, outputs=[MINED])


def combine(cfg: MiningConfig, teachers: Sequence[Mapping[str, Any]], out_dir: str,
            name: str = "mine", auto: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge the mine outputs of several teachers into `<out_dir>/<name>` (`mining.combine`).

    `teachers` are the finished mine stages' manifests (with their "dir"), the primary
    teacher's first; skipped when current. `auto`: as in `run`.
    """
    target = storage.join(out_dir, name)
    key = config_hash(cfg, config_hash(*(t["config_hash"] for t in teachers)), "combine")

    def work() -> lifecycle.Done:
        teacher_dirs = [t["dir"] for t in teachers]
        per_teacher = [storage.read_parquet(storage.join(d, MINED)).to_pylist() for d in teacher_dirs]
        storage.remove(storage.join(target, MINED))
        rows, stats = mining.combine_mined(per_teacher, cfg)
        stats["teachers"] = [t["stats"] for t in teachers]
        storage.write_parquet(pa.Table.from_pylist(rows, schema=schemas.MINED),
                              storage.join(target, MINED, "part-00000.parquet"), row_group_size=ROW_GROUP)
        return _done(cfg, len(rows), stats, f"mine ({len(teachers)} teachers)",
                      {"rule": cfg.rule, "mining": to_dict(cfg), "combine": cfg.combine,
                       "teacher_dirs": teacher_dirs, **({"auto": auto} if auto else {})})

    return lifecycle.run_stage(target, "mine", key, work)
