"""FAISS shards over corpus embeddings, searched in parallel by Ray actors, merged exactly.

Reads the embed stage's `corpus/*.parquet`; each shard actor loads one contiguous row range
and holds its index; `merge.merge_topk` (pure, no Ray) merges the shards' lists exactly.
Writes candidates (`query_id, doc_ids, scores`) per split.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from posmine import schemas, storage
from posmine.config import IndexConfig, config_hash
from posmine.data import parquet_rows
from posmine.merge import merge_topk

log = logging.getLogger(__name__)


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


def plan_shards(corpus_dir: str, num_shards: int) -> tuple[list[ShardPlan], list[str]]:
    """Split the embedding files' rows into contiguous ranges; also return every row's id."""
    files = [storage.join(corpus_dir, n) for n in storage.listdir(corpus_dir)
             if n.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"{storage.redact(corpus_dir)}: no embedding files")
    counts = [parquet_rows(f) for f in files]
    total = sum(counts)
    bounds = np.linspace(0, total, min(num_shards, total) + 1).astype(int)
    plans = [ShardPlan(tuple(files), int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    ids = storage.read_parquet(corpus_dir, columns=["id"]).column("id").to_pylist()
    return plans, ids


def load_rows(plan: ShardPlan) -> np.ndarray:
    """(stop - start, dim) float32: the shard's rows, reading only the files that overlap it."""
    from posmine.embed import embedding_dim, read_embeddings

    parts, offset = [], 0
    dim = embedding_dim(plan.files[0])  # every file the same size, or a named error
    for f in plan.files:
        n = parquet_rows(f)
        lo, hi = max(plan.start, offset), min(plan.stop, offset + n)
        if lo < hi:
            parts.append(read_embeddings(f, dim=dim)[1][lo - offset:hi - offset])
        offset += n
    return np.concatenate(parts)


class IndexShard:
    """Holds one FAISS shard; `search` returns global row ids (shard offset added)."""

    def __init__(self, plan: ShardPlan, cfg: IndexConfig, threads: int = 0) -> None:
        import faiss

        faiss.omp_set_num_threads(threads or os.cpu_count() or 1)  # workers are reused
        self.offset = plan.start
        self.index = build_index(load_rows(plan), cfg)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, local = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, np.where(local < 0, -1, local + self.offset)


def sharded_search(corpus_dir: str, queries: np.ndarray, k: int,
                   cfg: IndexConfig) -> tuple[np.ndarray, list[list[str]]]:
    """Top-k over all shards, one Ray actor per shard. Returns scores (nq, k), doc ids."""
    import ray

    plans, ids = plan_shards(corpus_dir, cfg.num_shards)
    if cfg.cpus_per_shard:  # reserve N CPUs, run N FAISS threads
        cpus, threads = cfg.cpus_per_shard, max(1, round(cfg.cpus_per_shard))
    else:  # the shards share the machine's cores; Ray's reservation stays small
        cpus, threads = min(1.0, 2.0 / len(plans)), max(1, (os.cpu_count() or 1) // len(plans))
    shard_cls: Any = ray.remote(num_cpus=cpus)(IndexShard)
    actors: list[Any] = [shard_cls.remote(p, cfg, threads) for p in plans]
    k = min(k, len(ids))
    all_scores, all_rows = [], []
    try:
        for start in tqdm(range(0, len(queries), cfg.query_batch_size), desc="search",
                          unit="batch", disable=len(queries) <= cfg.query_batch_size):
            block = ray.put(queries[start:start + cfg.query_batch_size])
            parts = ray.get([a.search.remote(block, k) for a in actors])
            s, r = merge_topk(parts, k)
            all_scores.append(s)
            all_rows.append(r)
    finally:
        for a in actors:
            ray.kill(a)
    scores = np.concatenate(all_scores) if all_scores else np.zeros((0, k), np.float32)
    rows = np.concatenate(all_rows) if all_rows else np.zeros((0, k), np.int64)
    doc_ids = [[ids[j] for j in row if j >= 0] for row in rows]
    return scores.astype(np.float32), doc_ids


def candidates_table(query_ids: list[str], scores: np.ndarray, doc_ids: list[list[str]]) -> pa.Table:
    return pa.table({
        "query_id": query_ids,
        "doc_ids": doc_ids,
        "scores": [s[:len(d)].tolist() for s, d in zip(scores, doc_ids, strict=True)],
    }, schema=schemas.CANDIDATES)


def run_search(cfg: IndexConfig, embed_dir: str, out_dir: str, split: str,
               query_ids: list[str], k: int, upstream: str) -> tuple[str, dict[str, Any]]:
    """Write candidates for `query_ids` (skipped when current). Returns (folder, manifest)."""
    from posmine.embed import embedding_dim, read_embeddings

    key = config_hash(cfg, upstream, split, k, sorted(query_ids))
    target = storage.join(out_dir, "candidates", key)

    def work() -> storage.Done:
        corpus_dir = storage.join(embed_dir, "corpus")
        first = next((n for n in storage.listdir(corpus_dir) if n.endswith(".parquet")), None)
        if first is None:
            raise FileNotFoundError(f"{storage.redact(corpus_dir)}: no embedding files")
        # Query vectors must match the corpus's size (and be finite): say so before FAISS does.
        qids, qmat = read_embeddings(storage.join(embed_dir, "queries"),
                                     dim=embedding_dim(storage.join(corpus_dir, first)))
        row = {q: i for i, q in enumerate(qids)}
        missing = [q for q in query_ids if q not in row]
        if missing:
            raise ValueError(f"{len(missing)} queries have no embedding, e.g. {missing[:3]}")
        queries = qmat[[row[q] for q in query_ids]]  # (nq, dim)
        scores, doc_ids = sharded_search(corpus_dir, queries, k, cfg)
        storage.write_parquet(candidates_table(query_ids, scores, doc_ids),
                              storage.join(target, "candidates.parquet"))
        return storage.Done({"queries": len(query_ids)}, extra={"split": split, "k": k},
                            outputs=["candidates.parquet"])

    return target, storage.run_stage(target, "search", key, work)
