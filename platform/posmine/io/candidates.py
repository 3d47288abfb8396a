"""The search stage's output on storage: `candidates.parquet/`, shards of `query_id, doc_ids,
scores` (each query's candidates, best first; searched for mining, also its positives and
file negatives with their teacher scores), that the mine, evaluate and audit stages read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from posmine.core.mining import QueryCandidates
from posmine.io import prepared, storage
from posmine.io.textstore import DOCS_PER_SHARD, TextStore


def candidate_shards(cand_dir: str) -> list[str]:
    """The URLs of a search stage's candidate shards, in order."""
    return storage.parquet_files(storage.join(cand_dir, "candidates.parquet"))


def candidates_in(url: str) -> int:
    """Candidates (doc ids over all queries) in one candidate shard, from its footer."""
    fs, path = storage.filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{storage.redact(url)}: cannot read this candidate shard: {e}") from e
    col = next(j for j in range(meta.num_columns)
               if meta.schema.column(j).path.split(".")[0] == "doc_ids")
    return sum(meta.row_group(i).column(col).num_values for i in range(meta.num_row_groups))


def read_candidates(cand_dirs: Sequence[str]) -> list[dict[str, Any]]:
    """Each query's deepest candidate list, in the first stage's query order (one process)."""
    merged: dict[str, dict[str, Any]] = {}
    for d in cand_dirs:
        for c in storage.read_parquet(storage.join(d, "candidates.parquet")).to_pylist():
            merged[c["query_id"]] = c
    return list(merged.values())


def read_shard(url: str) -> pa.Table:
    """One candidate shard; an unreadable one is named."""
    try:
        return storage.read_parquet(url)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{storage.redact(url)}: cannot read this candidate shard: {e}") from e


def shard_list(cand_dirs: Sequence[str]) -> list[dict[str, Any]]:
    """`{"round": j, "url": ...}` for every shard of every search round (shallowest first)."""
    return [{"round": j, "url": u} for j, d in enumerate(cand_dirs) for u in candidate_shards(d)]


def shard_table(shards: Sequence[Mapping[str, Any]]) -> pa.Table:
    """`shard_list`'s rows as the table a shard actor is called with in this process."""
    return pa.table({"round": [s["round"] for s in shards], "url": [s["url"] for s in shards]},
                    schema=pa.schema([("round", pa.int64()), ("url", pa.string())]))


def query_ids(cand_dirs: Sequence[str]) -> pa.Array:
    """The distinct query ids of these search stages' candidates."""
    cols = [storage.read_parquet(u, ["query_id"]).column("query_id")
            for d in cand_dirs for u in candidate_shards(d)]
    return pc.unique(pa.chunked_array(cols, pa.string()).combine_chunks())  # empty: no later round


class Rounds:
    """A query searched again deeper keeps only its deepest list: round j's shards skip the
    query ids of the rounds after it, read once per round, where the shards are read."""

    def __init__(self, cand_dirs: Sequence[str]) -> None:
        self.cand_dirs = list(cand_dirs)
        self.later: dict[int, pa.Array] = {}

    def deepest(self, j: int, table: pa.Table) -> pa.Table:
        if j not in self.later:
            self.later[j] = query_ids(self.cand_dirs[j + 1:])
        return table.filter(pc.invert(pc.is_in(table.column("query_id"), value_set=self.later[j])))


def few_candidates(data_dir: str, urls: Sequence[str], limit: int) -> bool:
    """Whether these candidate shards hold fewer than `limit` candidates in all (reading their
    footers until the count reaches it) over a corpus that one text shard holds: work for this
    process rather than a pool whose start would take longer."""
    if prepared.parquet_rows(storage.join(data_dir, "corpus")) > DOCS_PER_SHARD:
        return False
    total = 0
    for url in urls:
        total += candidates_in(url)
        if total >= limit:
            return False
    return True


def shard_queries(table: pa.Table, judged: Mapping[str, Sequence[str]] | None = None
                  ) -> list[QueryCandidates]:
    """A candidate shard's rows as the pure miner's input (positives and scores from the shard;
    `judged`: each query's documents judged under `data.min_positive_score`)."""
    cols = {c: table.column(c).to_pylist() for c in ("query_id", "doc_ids", "scores", "positive_ids",
                                                     "positive_scores")}
    judged = judged or {}
    return [QueryCandidates(q, d, np.asarray(s, np.float64), p, np.asarray(ps, np.float32),
                            judged_ids=judged.get(q, ()))
            for q, d, s, p, ps in zip(*cols.values(), strict=True)]


def with_keys(queries: list[QueryCandidates], store: TextStore, dedup: str) -> list[QueryCandidates]:
    """Each query with its candidates' duplicate keys and the keys it bans (its own text's and
    its positives'); nothing banned with `dedup_text=none`."""
    cand = [d for q in queries for d in q.cand_ids]
    ckeys = store.keys("corpus", cand)  # (sum K,)
    pkeys = store.keys("corpus", [p for q in queries for p in q.pos_ids]) if dedup != "none" else None
    qkeys = store.keys("queries", [q.query_id for q in queries]) if dedup != "none" else None
    out, c, p = [], 0, 0
    for i, q in enumerate(queries):
        k, n = len(q.cand_ids), len(q.pos_ids)
        banned = (np.zeros(0, np.int64) if pkeys is None or qkeys is None
                  else np.concatenate([pkeys[p:p + n], qkeys[i:i + 1]]))
        out.append(dataclasses.replace(q, cand_keys=ckeys[c:c + k], banned_keys=banned))
        c, p = c + k, p + n
    return out
