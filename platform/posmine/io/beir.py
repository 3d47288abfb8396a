"""The BEIR layout: read and validate `corpus.jsonl[.gz]`, `queries.jsonl[.gz]` and
`qrels/{train,dev,test}.tsv` (or `.parquet` equivalents with the columns of `schemas.py`) from
any fsspec URL, or `beir:<name>`, the public BEIR zip downloaded into a cache.

Every problem is reported as a `DataError` naming the file and the line (or row) and id. The
corpus is streamed in chunks, so driver memory holds ids, not texts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from posmine.io import schemas, storage

# The input files' common ground, shared with the other formats' readers (`sources`).
from posmine.io.inputs import (
    DataError,
    Warnings,
    iter_jsonl,
    raw_lines,
    resolve,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
QRELS_HEADER = ("query-id", "corpus-id", "score")


# ---------------------------------------------------------------- locating files


def _find(root: str, stem: str) -> str:
    for ext in (".jsonl", ".jsonl.gz", ".parquet"):
        url = f"{root}/{stem}{ext}"
        if storage.exists(url):
            return url
    raise DataError(f"{root}: no {stem}.jsonl, {stem}.jsonl.gz or {stem}.parquet")


def qrels_splits(root: str) -> dict[str, str]:
    """The qrels files present under `root/qrels`, by split name."""
    found = {}
    for name in storage.listdir(f"{root}/qrels"):
        stem, _, ext = name.partition(".")
        if ext in ("tsv", "parquet"):
            found[stem] = f"{root}/qrels/{name}"
    return found


# ---------------------------------------------------------------- JSONL records


def _iter_parquet_rows(url: str, columns: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    table = storage.read_parquet(url)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{url}: missing column(s) {missing}; has {table.column_names}")
    if table.num_rows == 0:
        raise DataError(f"{url}: empty file (no rows)")
    for i, row in enumerate(table.select(columns).to_pylist(), start=1):
        # Parquet rows are renamed to the JSONL field names so one validator serves both.
        row["_id"] = row.pop("id")
        yield i, row


def _field_str(obj: dict[str, Any], key: str, where: str, required: bool) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing {key!r}")
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def iter_records(url: str, kind: str, warnings: Warnings,
                 chunk_rows: int = 50_000) -> Iterator[pa.Table]:
    """Validated corpus (`kind="corpus"`) or queries records of `url`, in Arrow chunks.

    Raises DataError on malformed JSON, missing `_id`/`text`, duplicate ids, bad bytes
    and empty files. Empty texts are warned about and counted, and kept. Ids are checked for
    repeats in Arrow once the file is read (a duplicate raises after the last chunk): no
    Python set of every id.
    """
    schema = schemas.CORPUS if kind == "corpus" else schemas.QUERIES
    is_parquet = url.endswith(".parquet")
    rows = (_iter_parquet_rows(url, schema.names) if is_parquet else iter_jsonl(url))
    ids: list[pa.ChunkedArray] = []
    buf: dict[str, list[str]] = {n: [] for n in schema.names}
    for lineno, obj in rows:
        where = f"{url}:{'row ' if is_parquet else ''}{lineno}"
        raw_id = _field_str(obj, "_id", where, required=True)
        doc_id = raw_id.strip()  # as qrels ids are: else " d1" in the corpus is never found
        if not doc_id:
            raise DataError(f"{where}: empty '_id'")
        if doc_id != raw_id:
            warnings.add(f"{kind}_id_whitespace_stripped", f"{where} (id {raw_id!r})")
        text = _field_str(obj, "text", f"{where} (id {doc_id!r})", required=True)
        title = _field_str(obj, "title", where, required=False) if kind == "corpus" else ""
        if not text.strip() and not title.strip():
            warnings.add(f"{kind}_empty_text", f"{where} (id {doc_id!r})")
        buf["id"].append(doc_id)
        buf["text"].append(text)
        if kind == "corpus":
            buf["title"].append(title)
        if len(buf["id"]) >= chunk_rows:
            chunk = pa.table(buf, schema=schema)
            ids.append(chunk.column("id"))
            yield chunk
            buf = {n: [] for n in schema.names}
    if buf["id"]:
        chunk = pa.table(buf, schema=schema)
        ids.append(chunk.column("id"))
        yield chunk
    _check_unique(pa.chunked_array([c for a in ids for c in a.chunks], pa.string()), url, schema)


def _check_unique(ids: pa.ChunkedArray, url: str, schema: pa.Schema) -> None:
    """DataError naming the line of the first repeated id; only that case reads the file again."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pa.table({"id": ids}).group_by("id").aggregate([("id", "count")])
    repeated = set(counts.filter(pc.greater(counts.column("id_count"), 1)).column("id").to_pylist())
    is_parquet = url.endswith(".parquet")
    seen: set[str] = set()
    for lineno, obj in (_iter_parquet_rows(url, schema.names) if is_parquet else iter_jsonl(url)):
        doc_id = str(obj.get("_id")).strip()
        if doc_id in repeated:
            if doc_id in seen:
                raise DataError(f"{url}:{'row ' if is_parquet else ''}{lineno}: duplicate id {doc_id!r}")
            seen.add(doc_id)


def read_qrels(url: str, query_ids: pa.Array, doc_ids: pa.Array, warnings: Warnings) -> pa.Table:
    """A validated qrels table; DataError on a bad header, row, score, or unknown id.

    Rows are parsed line by line (a bad line is named) into Arrow chunks; unknown ids and
    repeated pairs are found in Arrow over the whole file, not with Python sets."""
    if url.endswith(".parquet"):
        table = schemas.check(storage.read_parquet(url), schemas.QRELS, url)
        rows: Iterator[tuple[int, str, str, str]] = (
            (i + 2, r["query_id"], r["doc_id"], str(r["score"])) for i, r in enumerate(table.to_pylist()))
    else:
        rows = _read_qrels_tsv(url)
    chunks: list[pa.Table] = []
    buf: dict[str, list[Any]] = {"query_id": [], "doc_id": [], "score": [], "line": []}
    for lineno, qid, did, score_text in rows:
        try:
            score = int(score_text)
        except ValueError:
            raise DataError(f"{url}:{lineno}: score {score_text!r} is not an integer") from None
        if not -(2**63) <= score < 2**63:
            raise DataError(f"{url}:{lineno}: score {score_text} is out of range (a 64-bit integer)")
        for col, v in zip(buf, (qid, did, score, lineno), strict=True):
            buf[col].append(v)
        if len(buf["line"]) >= 65536:
            chunks.append(_qrels_chunk(buf))
            buf = {k: [] for k in buf}
    if buf["line"]:
        chunks.append(_qrels_chunk(buf))
    if not chunks:
        raise DataError(f"{url}: empty file (no qrels rows)")
    table = pa.concat_tables(chunks)
    _check_known(table, url, query_ids, doc_ids)
    _count_queries_without_positive(table, url, warnings)
    return _drop_repeated_pairs(table, url, warnings).select(schemas.QRELS.names).cast(schemas.QRELS)


def _count_queries_without_positive(table: pa.Table, url: str, warnings: Warnings) -> None:
    """Queries whose every judgement is 0 or less have no positive to train towards or to find:
    they are left out downstream, so say how many, naming the first by its line."""
    best = table.group_by("query_id").aggregate([("score", "max"), ("line", "min")])
    none = best.filter(pc.less_equal(best.column("score_max"), 0))
    none = none.take(pc.sort_indices(none, [("line_min", "ascending")]))
    for qid, line in zip(none.column("query_id").to_pylist(), none.column("line_min").to_pylist(),
                         strict=True):
        warnings.add("qrels_query_without_positive", f"{url}:{line} (query {qid!r})")


def _qrels_chunk(buf: dict[str, list[Any]]) -> pa.Table:
    return pa.table({"query_id": pa.array(buf["query_id"], pa.string()),
                     "doc_id": pa.array(buf["doc_id"], pa.string()),
                     "score": pa.array(buf["score"], pa.int64()),
                     "line": pa.array(buf["line"], pa.int64())})


def _first(mask: pa.Array) -> int | None:
    i = pc.index(mask, True).as_py()
    return None if i < 0 else int(i)


def _check_known(table: pa.Table, url: str, query_ids: pa.Array, doc_ids: pa.Array) -> None:
    """DataError at the first row (in file order) whose query or document is unknown."""
    bad_q = pc.invert(pc.is_in(table.column("query_id"), value_set=query_ids))
    bad_d = pc.invert(pc.is_in(table.column("doc_id"), value_set=doc_ids))
    found = [i for i in (_first(bad_q.combine_chunks()), _first(bad_d.combine_chunks())) if i is not None]
    if not found:
        return
    i = min(found)
    qid, did = table.column("query_id")[i].as_py(), table.column("doc_id")[i].as_py()
    where = f"{url}:{table.column('line')[i].as_py()}"
    if bad_q[i].as_py():
        raise DataError(f"{where}: query id {qid!r} is not in the queries file")
    raise DataError(f"{where}: doc id {did!r} (query {qid!r}) is not in the corpus")


def _drop_repeated_pairs(table: pa.Table, url: str, warnings: Warnings) -> pa.Table:
    """The first row of each (query, document) pair, in file order; each later one warned."""
    # each id as its code in a dictionary of the distinct ids, a pair as one int64: far less
    # memory than hashing the pairs of strings
    q, d = (pc.dictionary_encode(table.column(c).combine_chunks()).indices.to_numpy().astype(np.int64)
            for c in ("query_id", "doc_id"))
    _, first = np.unique(q * (int(d.max(initial=0)) + 1) + d, return_index=True)
    if len(first) == table.num_rows:
        return table
    keep = np.sort(first)
    repeated = np.setdiff1d(np.arange(table.num_rows), keep)
    for line in table.column("line").take(pa.array(repeated)).to_pylist():
        warnings.add("qrels_duplicate_pair", f"{url}:{line}")
    return table.take(pa.array(keep))


def _read_qrels_tsv(url: str) -> Iterator[tuple[int, str, str, str]]:
    for lineno, raw in raw_lines(url):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise DataError(f"{url}:{lineno}: not valid UTF-8 ({e.reason})") from e
        if lineno == 1:
            if tuple(c.strip() for c in line.split("\t")) != QRELS_HEADER:
                raise DataError(f"{url}:1: bad header {line!r}; expected "
                                f"{chr(9).join(QRELS_HEADER)!r} (tab-separated)")
            continue
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataError(f"{url}:{lineno}: expected 3 tab-separated fields "
                            f"(query-id, corpus-id, score), got {len(parts)}")
        yield lineno, parts[0].strip(), parts[1].strip(), parts[2].strip()


# ---------------------------------------------------------------- whole datasets


@dataclass
class Dataset:
    """A validated BEIR dataset. The corpus stays on storage as chunks (see `corpus_chunks`)."""

    root: str
    corpus_url: str
    corpus_ids: pa.Array
    queries: pa.Table
    qrels: dict[str, pa.Table]
    warnings: Warnings

    def corpus_chunks(self, chunk_rows: int = 50_000) -> Iterator[pa.Table]:
        return iter_records(self.corpus_url, "corpus", Warnings(), chunk_rows)

    def summary(self) -> dict[str, Any]:
        return {
            "path": storage.redact(self.root),
            "corpus": len(self.corpus_ids),
            "queries": self.queries.num_rows,
            "qrels": {s: t.num_rows for s, t in sorted(self.qrels.items())},
            "qrels_queries": {s: pc.count_distinct(t.column("query_id")).as_py()
                              for s, t in sorted(self.qrels.items())},
            "warnings": dict(self.warnings.counts),
        }


def load(path: str, sink: Callable[[int, pa.Table], None] | None = None,
         rows_per_part: int = 50_000) -> Dataset:
    """Read and validate a whole BEIR dataset; the corpus is streamed, only its ids kept.

    Args:
        path: dataset folder, fsspec URL, or `beir:<name>`.
        sink: called with (chunk number, chunk) for each validated corpus chunk, so a caller
            can write the corpus in the same pass.
        rows_per_part: corpus rows per chunk.
    """
    root = resolve(path)
    if not storage.exists(root):
        raise DataError(f"{storage.redact(root)}: dataset folder not found")
    warnings = Warnings()
    corpus_url = _find(root, "corpus")
    ids: list[pa.Array] = []  # Arrow: ~15 bytes an id, not a Python string each
    for i, chunk in enumerate(iter_records(corpus_url, "corpus", warnings, rows_per_part)):
        ids.extend(chunk.column("id").chunks)
        if sink is not None:
            sink(i, chunk)
    corpus_ids = pa.chunked_array(ids, pa.string()).combine_chunks()
    queries = pa.concat_tables(list(iter_records(_find(root, "queries"), "queries", warnings)))
    query_ids = queries.column("id").combine_chunks()
    splits = qrels_splits(root)
    if not splits:
        raise DataError(f"{root}/qrels: no qrels files (expected train.tsv, dev.tsv or test.tsv)")
    qrels = {s: read_qrels(u, query_ids, corpus_ids, warnings) for s, u in splits.items()}
    for kind, n in warnings.counts.items():
        log.warning("%s: %d (first at %s)", kind, n, warnings.examples[kind])
    return Dataset(root, corpus_url, corpus_ids, queries, qrels, warnings)
