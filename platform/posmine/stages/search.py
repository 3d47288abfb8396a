"""The search stage: FAISS shards over corpus embeddings, searched in parallel by Ray actors, merged
exactly.

Reads the embed stage's `corpus/*.parquet`; each shard actor loads one contiguous row range
and holds its index (a corpus under `index.local_below` vectors: the searching process holds
the shards itself); `merge.merge_topk` (pure, no Ray) merges the shards' lists exactly.
Writes candidates (`query_id, doc_ids, scores`, and for mining the positives' exact scores) per
split, block by block from a one-shot Ray task (`remote.in_task`) that reads the split's qrels
itself: the driver never reads them.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from posmine.config import IndexConfig, config_hash, to_dict
from posmine.core.merge import merge_topk
from posmine.io import schemas, storage
from posmine.io.prepared import file_negatives_table, parquet_rows, read_prepared_qrels
from posmine.io.vectors import check_vectors, embedding_dim, embedding_matrix, pair_scores
from posmine.stages import lifecycle, remote

log = logging.getLogger(__name__)
MAX_BLOCK_CANDIDATES = 1 << 21  # candidates per query shard: ~40 MB in the driver, ~0.3 GB as
# Python lists in the mining worker that reads it


def build_index(vectors: np.ndarray, cfg: IndexConfig) -> Any:
    """A FAISS inner-product index over (n, dim) float32 vectors (on GPU when asked/available)."""
    import faiss

    n, dim = vectors.shape
    index: Any
    if cfg.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = cfg.ef_search
    else:
        nlist = max(1, min(cfg.nlist, n // 39))  # FAISS wants ~39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(cfg.nprobe, nlist)
    want_gpu = cfg.use_gpu == "always" or (cfg.use_gpu == "auto" and cfg.kind != "hnsw")
    if want_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    elif cfg.use_gpu == "always":
        raise RuntimeError("index.use_gpu=always but faiss sees no GPU (install faiss-gpu)")
    index.add(vectors)
    return index


# ---------------------------------------------------------------- shards


@dataclass(frozen=True)
class ShardPlan:
    files: tuple[str, ...]
    start: int  # global row of the shard's first vector
    stop: int


def plan_shards(corpus_dir: str, num_shards: int) -> tuple[list[ShardPlan], pa.Array]:
    """Split the embedding files' rows into contiguous ranges; also return every row's id (an
    Arrow array: ~15 bytes a document, not a Python string each)."""
    files = storage.parquet_files(corpus_dir)
    if not files:
        raise FileNotFoundError(f"{storage.redact(corpus_dir)}: no embedding files")
    counts = [parquet_rows(f) for f in files]
    total = sum(counts)
    bounds = np.linspace(0, total, min(num_shards, total) + 1).astype(int)
    plans = [ShardPlan(tuple(files), int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    ids = storage.read_parquet(corpus_dir, columns=["id"]).column("id").combine_chunks()
    return plans, ids


def load_rows(plan: ShardPlan) -> tuple[pa.Array, np.ndarray]:
    """The shard's ids and (stop - start, dim) float32 rows, reading only the files that
    overlap it."""
    ids, parts, offset = [], [], 0
    dim = embedding_dim(plan.files[0])  # every file the same size, or a named error
    for f in plan.files:
        n = parquet_rows(f)
        lo, hi = max(plan.start, offset), min(plan.stop, offset + n)
        if lo < hi:
            table = storage.read_parquet(f).slice(lo - offset, hi - lo)
            parts.append(embedding_matrix(table))
            check_vectors(table.column("id").to_pylist(), parts[-1], storage.redact(f), dim)
            ids.append(table.column("id"))
        offset += n
    return pa.chunked_array(ids).combine_chunks(), np.concatenate(parts)


class IndexShard:
    """Holds one FAISS shard; `search` returns global row ids (shard offset added)."""

    def __init__(self, plan: ShardPlan, cfg: IndexConfig, threads: int = 0) -> None:
        import faiss
        import pandas as pd

        faiss.omp_set_num_threads(threads or os.cpu_count() or 1)  # workers are reused
        self.offset = plan.start
        ids, rows = load_rows(plan)
        self.index = build_index(rows, cfg)
        if cfg.kind == "ivf" and hasattr(self.index, "make_direct_map"):
            self.index.make_direct_map()  # IVF lists hold the vectors; `reconstruct` needs a map
        self.rows = pd.Index(ids.to_numpy(zero_copy_only=False))  # id -> local row, hashed once

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, local = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, np.where(local < 0, -1, local + self.offset)

    def score_pairs(self, queries: np.ndarray, doc_ids: np.ndarray) -> np.ndarray:
        """`pair_scores` of (query vector i, document doc_ids[i]) for the documents this shard
        holds, NaN for the others: (n, dim), (n,) -> (n,)."""
        local = self.rows.get_indexer(doc_ids)  # (n,), -1 where not in this shard
        out = np.full(len(doc_ids), np.nan, np.float32)
        have = np.flatnonzero(local >= 0)
        if len(have):
            docs = self.index.reconstruct_batch(local[have].astype(np.int64))  # (h, dim)
            out[have] = pair_scores(queries[have], docs)
        return out


@dataclass(frozen=True)
class Listed:
    """The documents whose exact teacher score the mine stage needs besides the top-K: each
    query's positives (qrels order) and the negatives its training file listed."""

    positives: pa.Table  # query_id, doc_id (score > 0 only)
    negatives: pa.Table  # query_id, doc_ids

    def for_block(self, query_ids: pa.Array) -> tuple[list[list[str]], list[list[str]]]:
        """Each block query's positives and file negatives, in block order."""
        out = []
        for table, col in ((self.positives, "doc_id"), (self.negatives, "doc_ids")):
            rows = table.filter(pc.is_in(table.column("query_id"), value_set=query_ids))
            by_query: dict[str, list[str]] = {}
            for q, d in zip(rows.column("query_id").to_pylist(), rows.column(col).to_pylist(),
                            strict=True):
                by_query.setdefault(q, []).extend(d if isinstance(d, list) else [d])
            out.append([by_query.get(q, []) for q in query_ids.to_pylist()])
        return out[0], out[1]


class ShardedSearch:
    """The shards of one corpus, searched block by block: one Ray actor per shard, or, for a
    corpus under `index.local_below` vectors, held in this process (the same shards and merge)."""

    def __init__(self, corpus_dir: str, cfg: IndexConfig) -> None:
        plans, self.ids = plan_shards(corpus_dir, cfg.num_shards)
        self.local = len(self.ids) < cfg.local_below
        if self.local:  # this process's cores, one shard at a time
            self.shards: list[Any] = [IndexShard(p, cfg) for p in plans]
            return
        import ray

        if cfg.cpus_per_shard:  # reserve N CPUs, run N FAISS threads
            cpus, threads = cfg.cpus_per_shard, max(1, round(cfg.cpus_per_shard))
        else:  # the shards share the machine's cores; Ray's reservation stays small
            cpus, threads = min(1.0, 2.0 / len(plans)), max(1, (os.cpu_count() or 1) // len(plans))
        shard_cls: Any = ray.remote(num_cpus=cpus)(IndexShard)
        self.shards = [shard_cls.remote(p, cfg, threads) for p in plans]

    def _each(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` of every shard, in shard order: on the actors in parallel, or here."""
        import ray

        if self.local:
            return [getattr(s, method)(*args) for s in self.shards]
        refs = [ray.put(a) if isinstance(a, np.ndarray) else a for a in args]  # shipped once
        return ray.get([getattr(s, method).remote(*refs) for s in self.shards])

    def topk_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(nq, dim) -> scores (nq, k) float32 and global rows (nq, k), -1 past the end of a
        small corpus."""
        k = min(k, len(self.ids))
        scores, rows = merge_topk(self._each("search", np.ascontiguousarray(queries, np.float32), k), k)
        return scores.astype(np.float32), rows

    def lists(self, scores: np.ndarray, rows: np.ndarray) -> tuple[pa.ListArray, pa.ListArray]:
        """Each query's doc ids and scores as Arrow lists, built from the rows without a Python
        string per candidate: (nq, k), (nq, k) -> list<string>, list<float32>."""
        valid = rows >= 0  # (nq, k)
        offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32))
        ids = self.ids.take(pa.array(rows[valid]))
        return (pa.ListArray.from_arrays(offsets, ids),
                pa.ListArray.from_arrays(offsets, pa.array(scores[valid], pa.float32())))

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """`topk_rows` with each query's doc ids as a Python list."""
        scores, rows = self.topk_rows(queries, k)
        return scores, self.lists(scores, rows)[0].to_pylist()

    def score_pairs(self, queries: np.ndarray, doc_ids: list[str]) -> np.ndarray:
        """`pair_scores` of (queries[i], doc_ids[i]): (n, dim), n -> (n,), from the shard that
        holds each document."""
        if not doc_ids:
            return np.zeros(0, np.float32)
        docs = np.asarray(doc_ids, dtype=object)
        parts = self._each("score_pairs", queries, docs)
        out = np.fmax.reduce(np.stack(parts), axis=0)  # NaN from the shards without the doc
        if np.isnan(out).any():
            missing = docs[np.isnan(out)][:3].tolist()
            raise ValueError(f"documents {missing} have no embedding in the corpus")
        return out

    def close(self) -> None:
        import ray

        if not self.local:
            for a in self.shards:
                ray.kill(a)
        self.shards = []


def sharded_search(corpus_dir: str, queries: np.ndarray, k: int,
                   cfg: IndexConfig) -> tuple[np.ndarray, list[list[str]]]:
    """Top-k over all shards (`ShardedSearch`). Returns scores (nq, k), doc ids."""
    search = ShardedSearch(corpus_dir, cfg)
    try:
        parts = [search.topk(queries[s:s + cfg.query_batch_size], k)
                 for s in range(0, len(queries), cfg.query_batch_size)]
    finally:
        search.close()
    k = min(k, len(search.ids))
    scores = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, k), np.float32)
    return scores, [d for p in parts for d in p[1]]


def candidates_table(query_ids: pa.Array, doc_ids: pa.ListArray, scores: pa.ListArray,
                     listed: tuple[list[list[str]], list[np.ndarray], list[list[str]],
                                   list[np.ndarray]] | None = None) -> pa.Table:
    """One row per query (schema `schemas.CANDIDATES`); `listed`: each query's positives, their
    scores, its file negatives and theirs (empty lists without)."""
    empty: list[list[Any]] = [[] for _ in range(len(query_ids))]
    pos, pos_s, neg, neg_s = listed or (empty, empty, empty, empty)
    return pa.table({
        "query_id": query_ids, "doc_ids": doc_ids, "scores": scores,
        "positive_ids": pos, "positive_scores": [list(map(float, s)) for s in pos_s],
        "file_negative_ids": neg, "file_negative_scores": [list(map(float, s)) for s in neg_s],
    }, schema=schemas.CANDIDATES)


def ids_digest(ids: pa.Array) -> str:
    """A digest of a set of ids (order and repeats aside) without a Python string per id."""
    uniq = pc.unique(ids)
    uniq = uniq.take(pc.array_sort_indices(uniq))
    h = hashlib.sha256()
    for start in range(0, len(uniq), 65536):
        h.update("\x1f".join(uniq.slice(start, 65536).to_pylist()).encode())
        h.update(b"\x1e")
    return h.hexdigest()


def query_blocks(queries_dir: str, wanted: pa.Array, size: int, dim: int
                 ) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """The query vectors of `wanted`, in the embedding files' order, `size` at a time: (ids,
    (n, dim) float32). One block in memory, however many queries."""
    buf: list[pa.Table] = []
    have = 0
    for table in _read_batches(storage.parquet_files(queries_dir)):
        table = table.filter(pc.is_in(table.column("id"), value_set=wanted))
        buf.append(table)
        have += table.num_rows
        while have >= size:
            block, rest = _split(pa.concat_tables(buf), size)
            yield _block(block, queries_dir, dim)
            buf, have = [rest], rest.num_rows
    if have:
        yield _block(pa.concat_tables(buf), queries_dir, dim)


def _read_batches(files: list[str], rows: int = 65536) -> Iterator[pa.Table]:
    """The files' rows, `rows` at a time (a file of a million query vectors is never read
    whole)."""
    for url in files:
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=rows):
                yield pa.Table.from_batches([batch])


def _split(table: pa.Table, size: int) -> tuple[pa.Table, pa.Table]:
    table = table.combine_chunks()
    return table.slice(0, size), table.slice(size)


def _block(block: pa.Table, where: str, dim: int) -> tuple[pa.Array, np.ndarray]:
    mat = embedding_matrix(block)
    check_vectors(block.column("id").to_pylist(), mat, storage.redact(where), dim)
    return block.column("id").combine_chunks(), mat


# Fields that decide where the shards are searched, not what they return: out of the stage key,
# so candidates (and the mining and training keyed on them) made before these existed stay current.
PLACEMENT_FIELDS = ("local_below",)


def search_key(cfg: IndexConfig) -> dict[str, Any]:
    """The index settings a search stage's key holds."""
    return {k: v for k, v in to_dict(cfg).items() if k not in PLACEMENT_FIELDS}


def _needs_ray(cfg: IndexConfig, data_dir: str, query_ids: pa.Array | None) -> bool:
    """Whether the search wants Ray: shard actors for a corpus of `local_below` or more, or a
    task of its own for a split big enough to grow the driver. A small search runs here, so a
    small dataset is mined without starting Ray at all."""
    docs = parquet_rows(storage.join(data_dir, "corpus"))
    queries = len(query_ids) if query_ids is not None else parquet_rows(
        storage.join(data_dir, "queries"))
    return docs >= cfg.local_below or queries >= remote.HERE_BELOW_QUERIES


def run(cfg: IndexConfig, embed_dir: str, out_dir: str, split: str, k: int,
               upstream: str, data_dir: str, query_ids: pa.Array | None = None,
               ids_key: str | None = None, for_mining: bool = False) -> tuple[str, dict[str, Any]]:
    """Write candidates for the queries of `split` (skipped when current). Returns (folder,
    manifest).

    `query_ids`: the queries to search, default every query of the split's qrels (read in the
    search task, not here). `ids_key` names them in the stage key without reading them (a
    deeper round's: the round before it and the settings that chose them); without it the key
    holds their digest. `candidates.parquet` is a folder of query shards (`part-NNNNN.parquet`,
    `index.query_batch_size` queries each, fewer when `k` is deep, in the query embeddings'
    order), written block by block in a one-shot Ray task that holds the split's query ids and
    positives and one block of vectors (its peak is on the manifest): the driver holds none of
    them, whatever the number of queries. With `for_mining`, each row also carries its
    positives' and file negatives' exact teacher scores (the mine stage's anchors).
    """
    if query_ids is not None and ids_key is None:
        ids_key = ids_digest(query_ids)
    key = config_hash(search_key(cfg), upstream, split, k, ids_key or "split", for_mining)
    target = storage.join(out_dir, "candidates", key)

    def work() -> lifecycle.Done:
        if _needs_ray(cfg, data_dir, query_ids):
            remote.ensure_ray()
        done, peak = remote.in_task(_search, SearchJob(cfg, embed_dir, target, split, k, data_dir,
                                                        for_mining), query_ids)
        # the search process holds the split's ids and positives: what it needs is on record
        return lifecycle.Done({"queries": done}, stats={"search_process_peak_rss_mib": peak},
                            extra={"split": split, "k": k}, outputs=["candidates.parquet"])

    return target, lifecycle.run_stage(target, "search", key, work)


@dataclass(frozen=True)
class SearchJob:
    """What one search stage searches and where it writes."""

    cfg: IndexConfig
    embed_dir: str
    target: str
    split: str
    k: int
    data_dir: str
    for_mining: bool


def _search(job: SearchJob, query_ids: pa.Array | None) -> tuple[int, int]:
    """The search stage's work: every wanted query's top-k, block by block; returns the count
    and this process's peak RSS in MiB."""
    cfg, k = job.cfg, job.k
    corpus_dir = storage.join(job.embed_dir, "corpus")
    files = storage.parquet_files(corpus_dir)
    if not files:
        raise FileNotFoundError(f"{storage.redact(corpus_dir)}: no embedding files")
    qrels = read_prepared_qrels(job.data_dir, job.split) if query_ids is None or job.for_mining else None
    wanted = pc.unique(query_ids if query_ids is not None
                       else qrels.column("query_id").combine_chunks())  # type: ignore[union-attr]
    listed = None if qrels is None or not job.for_mining else Listed(
        qrels.filter(pc.greater(qrels.column("score"), 0)).select(["query_id", "doc_id"]),
        file_negatives_table(job.data_dir))
    del qrels
    out = storage.join(job.target, "candidates.parquet")
    storage.remove(out)  # parts of an interrupted run are redone, not mixed in
    dim = embedding_dim(files[0])
    # deep lists make small shards: a block's candidates fit in memory however deep
    block = max(1, min(cfg.query_batch_size, MAX_BLOCK_CANDIDATES // max(1, k)))
    search, done = ShardedSearch(corpus_dir, cfg), 0
    try:
        with tqdm(total=len(wanted), desc="search", unit="query",
                  disable=len(wanted) <= cfg.query_batch_size) as bar:
            for part, (ids, qmat) in enumerate(query_blocks(
                    storage.join(job.embed_dir, "queries"), wanted, block, dim)):
                doc_ids, scores = search.lists(*search.topk_rows(qmat, k))
                extra = _score_listed(search, listed, ids, qmat) if listed else None
                storage.write_parquet(candidates_table(ids, doc_ids, scores, extra),
                                      storage.join(out, f"part-{part:05d}.parquet"))
                done += len(ids)
                bar.update(len(ids))
    finally:
        search.close()
    if done != len(wanted):  # queries of the split that the embed stage never embedded
        raise ValueError(f"{len(wanted) - done} of {len(wanted)} queries have no embedding "
                         f"in {storage.redact(job.embed_dir)}")
    return done, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _score_listed(search: ShardedSearch, listed: Listed, ids: pa.Array, qmat: np.ndarray
                  ) -> tuple[list[list[str]], list[np.ndarray], list[list[str]], list[np.ndarray]]:
    """The block's positives and file negatives with their exact teacher scores."""
    pos, neg = listed.for_block(ids)
    out: list[Any] = []
    for docs in (pos, neg):
        lens = [len(d) for d in docs]
        rows = np.repeat(np.arange(len(docs)), lens)  # (n,) pair -> query row
        flat = search.score_pairs(qmat[rows], [d for ds in docs for d in ds])
        out += [docs, np.split(flat, np.cumsum(lens)[:-1])]
    return out[0], out[1], out[2], out[3]
