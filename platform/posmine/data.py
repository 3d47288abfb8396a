"""BEIR datasets: read, validate, and prepare them as Parquet for the later stages.

Reads the BEIR layout from any fsspec URL (`corpus.jsonl[.gz]`, `queries.jsonl[.gz]`,
`qrels/{train,dev,test}.tsv`, or `.parquet` equivalents with the columns of `schemas.py`),
or `beir:<name>`, the public BEIR zip downloaded into a cache. Writes the `data` stage:
`corpus/part-*.parquet`, `queries.parquet/part-*.parquet` (a folder of parts, so that no later
stage holds every query at once), `qrels/<split>.parquet` and a manifest that records, per
split, the most positives a query has (the search depth, read without reading the qrels).

Every problem is reported as a `DataError` naming the file and the line (or row) and id.
The corpus is streamed in chunks, so driver memory holds ids, not texts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from posmine import schemas, storage
from posmine.config import DataConfig, config_hash

# The input files' common ground, shared with the other formats' readers (`sources`).
from posmine.inputs import (
    DataError,
    Warnings,
    iter_jsonl,
    raw_lines,
    resolve,
    sample_queries,
    split_queries,
)
from posmine.mining import normalize_text

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
    # memory than hashing the pairs of strings (283 MB more for 2M pairs, measured)
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


# ---------------------------------------------------------------- the data stage


def stage_dir(out_dir: str) -> str:
    return storage.join(out_dir, "data")


def prepare(cfg: DataConfig, out_dir: str) -> dict[str, Any]:
    """Validate the dataset and write it as Parquet under `<out_dir>/data` (skipped if current).

    BEIR folders are streamed; the other formats (`sources.py`) are read whole, then written
    the same way, with the file's own negatives in `negatives.parquet`.
    """
    from posmine import sources

    target = stage_dir(out_dir)
    inputs = sources.input_fingerprints(cfg)

    def work() -> storage.Done:

        for old in ("corpus", QUERIES, "qrels", NEGATIVES):  # an earlier dataset's files must not outlive it
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
        for split, table in prepared.items():
            storage.write_parquet(table, storage.join(target, "qrels", f"{split}.parquet"))
        rows = {"corpus": n_corpus, "queries": queries.num_rows,
                **{f"qrels_{s}": t.num_rows for s, t in prepared.items()}}
        return storage.Done(rows, stats={"warnings": warnings.counts, "source": source,
                                         "dev_source": "file" if "dev" in qrels else "heldout",
                                         "queries_given_same_text_positives": shared,
                                         MAX_POSITIVES: {s: max_positives(t)
                                                         for s, t in prepared.items()}},
                            extra={"inputs": inputs},
                            outputs=[*outputs, *(f"qrels/{s}.parquet" for s in prepared)])

    return storage.run_stage(target, "data", config_hash(cfg, inputs), work,
                             current_because="the inputs' content and the data settings are unchanged")


NEGATIVES = "negatives.parquet"  # query_id, doc_ids: negatives the training file brought
QUERIES = "queries.parquet"  # a folder of parts (one file in data stages written before)
MAX_POSITIVES = "max_positives"  # manifest stats: split -> the most positives of one query


def max_positives(qrels: pa.Table) -> int:
    """The most positives (score > 0) any one query of `qrels` has; 0 when none has any."""
    pos = qrels.filter(pc.greater(qrels.column("score"), 0)).column("query_id").combine_chunks()
    codes = pc.dictionary_encode(pos).indices.to_numpy(zero_copy_only=False)
    return int(np.bincount(codes).max()) if len(codes) else 0


def split_max_positives(data_dir: str, split: str) -> int:
    """`max_positives` of a prepared split, from the data manifest (its qrels read only for a
    data stage written before the manifest kept it)."""
    recorded = ((storage.read_manifest(data_dir) or {}).get("stats", {})
                .get(MAX_POSITIVES, {}).get(split))
    return int(recorded) if recorded is not None else max_positives(read_prepared_qrels(data_dir, split))


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
