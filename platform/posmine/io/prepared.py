"""The prepared data folder, as the data stage writes it and every later stage reads it:
`corpus/part-*.parquet`, `queries.parquet/part-*.parquet` (a folder of parts, so that no later
stage holds every query at once), `qrels/<split>.parquet`, `negatives.parquet` (the training
file's own negatives), `judged/<split>.parquet` (the mined split's judgements under
`data.min_positive_score`: never negatives, never positives) and the manifest's per-split count
of the most positives of one query.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from posmine.io import storage

# The input files' common ground, shared with the other formats' readers (`sources`).
from posmine.io.inputs import (
    DataError,
)

NEGATIVES = "negatives.parquet"  # query_id, doc_ids: negatives the training file brought
JUDGED = "judged"  # judged/<split>.parquet: judgements under data.min_positive_score
QUERIES = "queries.parquet"  # a folder of parts
MAX_POSITIVES = "max_positives"  # manifest stats: split -> the most positives of one query


def max_positives(qrels: pa.Table) -> int:
    """The most positives (score > 0) any one query of `qrels` has; 0 when none has any."""
    pos = qrels.filter(pc.greater(qrels.column("score"), 0)).column("query_id").combine_chunks()
    codes = pc.dictionary_encode(pos).indices.to_numpy(zero_copy_only=False)
    return int(np.bincount(codes).max()) if len(codes) else 0


def split_max_positives(data_dir: str, split: str) -> int:
    """`max_positives` of a prepared split, from the data manifest."""
    recorded = ((storage.read_manifest(data_dir) or {}).get("stats", {})
                .get(MAX_POSITIVES, {}).get(split))
    if recorded is None:
        read_prepared_qrels(data_dir, split)  # a split not in the dataset: its error names those that are
        raise DataError(f"{storage.redact(data_dir)}: the data manifest has no count for {split!r}")
    return int(recorded)


def file_negatives_table(data_dir: str) -> pa.Table:
    """The data stage's `negatives.parquet` (query_id, doc_ids); empty for BEIR data."""
    url = storage.join(data_dir, NEGATIVES)
    if not storage.exists(url):
        return pa.table({"query_id": pa.array([], pa.string()),
                         "doc_ids": pa.array([], pa.list_(pa.string()))})
    return storage.read_parquet(url)


def file_negatives(data_dir: str) -> dict[str, list[str]]:
    """The data stage's `negatives.parquet` as query id -> doc ids ({} for BEIR data)."""
    table = file_negatives_table(data_dir)
    return dict(zip(table.column("query_id").to_pylist(), table.column("doc_ids").to_pylist(),
                    strict=True))


def sort_by_length(chunk: pa.Table) -> pa.Table:
    """Longest documents first: embedding batches then hold similar lengths (less padding)."""
    lengths = pc.add(pc.utf8_length(chunk.column("title")),
                             pc.utf8_length(chunk.column("text")))
    return chunk.take(pc.sort_indices(lengths, sort_keys=[("", "descending")]))


def read_prepared_qrels(data_dir: str, split: str) -> pa.Table:
    """The data stage's qrels of `split`; DataError naming the available splits if absent."""
    url = storage.join(data_dir, "qrels", f"{split}.parquet")
    if not storage.exists(url):
        have = [n.removesuffix(".parquet") for n in storage.listdir(storage.join(data_dir, "qrels"))]
        raise DataError(f"split {split!r} not in the dataset; available: {have}")
    return storage.read_parquet(url)


def positives_by_query(qrels: pa.Table) -> dict[str, list[str]]:
    """Relevant doc ids (score > 0) per query, in qrels order."""
    out: dict[str, list[str]] = {}
    for q, d, s in zip(*(qrels.column(c).to_pylist() for c in ("query_id", "doc_id", "score")),
                       strict=True):
        if s > 0:
            out.setdefault(q, []).append(d)
    return out


def split_by_grade(qrels: pa.Table, min_score: int) -> tuple[pa.Table, pa.Table]:
    """(positives: score >= min_score, judged below it: 0 < score < min_score) of `qrels`;
    rows of score 0 or less (judged irrelevant) go with the positives' table, as before."""
    weak = pc.and_(pc.greater(qrels.column("score"), 0), pc.less(qrels.column("score"), min_score))
    return qrels.filter(pc.invert(weak)), qrels.filter(weak)


def judged_by_query(data_dir: str, split: str) -> dict[str, list[str]]:
    """The documents judged under `data.min_positive_score` per query of `split` ({} if none)."""
    url = storage.join(data_dir, JUDGED, f"{split}.parquet")
    if not storage.exists(url):
        return {}
    out: dict[str, list[str]] = {}
    table = storage.read_parquet(url, ["query_id", "doc_id"])
    for q, d in zip(table.column("query_id").to_pylist(), table.column("doc_id").to_pylist(),
                    strict=True):
        out.setdefault(q, []).append(d)
    return out


def read_texts(url: str, ids: set[str] | None = None) -> dict[str, str]:
    """id -> text ("title text" for corpus rows) from a prepared Parquet file or folder."""
    table = storage.read_parquet(url)
    if ids is not None:
        table = table.filter(pc.is_in(table.column("id"), pa.array(sorted(ids))))
    return texts_of(table)


def texts_of(table: pa.Table) -> dict[str, str]:
    """id -> text ("title text" for corpus rows) of prepared corpus or queries rows."""
    texts = table.column("text").to_pylist()
    if "title" in table.column_names:
        texts = [f"{t} {x}".strip() for t, x in zip(table.column("title").to_pylist(), texts,
                                                   strict=True)]
    return dict(zip(table.column("id").to_pylist(), texts, strict=True))


def parquet_rows(url: str) -> int:
    """Rows of a Parquet file or folder, from the footers."""
    total = 0
    for part in storage.parquet_files(url):
        fs, path = storage.filesystem(part)
        with fs.open(path, "rb") as f:
            total += int(pq.ParquetFile(f).metadata.num_rows)
    return total


def passage_texts(batch: dict[str, Any]) -> list[str]:
    """'title text' per corpus row (BEIR/MTEB convention); the text alone for queries."""
    texts = [str(t) for t in batch["text"]]
    if "title" not in batch:
        return texts
    return [f"{ti} {t}".strip() for ti, t in zip(batch["title"], texts, strict=True)]
