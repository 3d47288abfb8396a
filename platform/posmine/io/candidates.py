"""The search stage's output on storage: `candidates.parquet/`, shards of `query_id, doc_ids,
scores` (each query's candidates, best first), that the mine, evaluate and audit stages read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from posmine.io import storage


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
