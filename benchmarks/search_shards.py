"""Sharded FAISS search on Ray vs one in-process IndexFlatIP on synthetic unit vectors.

Reports build+search time, results equality, and bytes held per shard. Exact flat search
costs n * dim * nq multiply-adds: 1M x 384 x 2k = 768 GFLOP (x2 for FLOPs).

    python benchmarks/search_shards.py [--n 1000000] [--dim 384] [--queries 2000] [--k 100]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time

import faiss
import numpy as np

from _common import emit
from posmine.config import IndexConfig
from posmine.io import storage
from posmine.io.vectors import embeddings_table
from posmine.stages import remote
from posmine.stages.search import sharded_search


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = "/tmp/posmine-bench-search"
    shutil.rmtree(root, ignore_errors=True)
    step = 100_000
    for i in range(0, a.n, step):  # written in files, as the embed stage does
        block = unit(min(step, a.n - i), a.dim, i)
        storage.write_parquet(embeddings_table([f"d{j}" for j in range(i, i + len(block))], block),
                              f"{root}/corpus/part-{i // step:05d}.parquet")
    queries = unit(a.queries, a.dim, 10**9)
    corpus = np.concatenate([unit(min(step, a.n - i), a.dim, i) for i in range(0, a.n, step)])

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(a.dim)
    index.add(corpus)
    built = time.perf_counter() - t0
    s_single, i_single = index.search(queries, a.k)
    single_s = time.perf_counter() - t0
    del index, corpus
    flops = 2.0 * a.n * a.dim * a.queries
    result: dict = {"n": a.n, "dim": a.dim, "queries": a.queries, "k": a.k,
                    "single": {"build_s": round(built, 2), "build_search_s": round(single_s, 2),
                               "search_gflops": round(flops / (single_s - built) / 1e9, 1),
                               "index_bytes": a.n * a.dim * 4},
                    "driver_peak_rss_mib": 0, "sharded": {}}
    remote.ensure_ray()
    for shards in a.shards:
        t0 = time.perf_counter()
        s, ids = sharded_search(f"{root}/corpus", queries, a.k, IndexConfig(num_shards=shards))
        secs = time.perf_counter() - t0
        same = all(r == [f"d{j}" for j in row] for r, row in zip(ids, i_single, strict=True))
        result["sharded"][shards] = {
            "load_build_search_s": round(secs, 2), "identical_ids": same,
            "max_score_diff": float(np.abs(s - s_single).max()),
            "bytes_per_shard": a.n * a.dim * 4 // shards}
    result["driver_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    emit(result, a.json)


if __name__ == "__main__":
    main()
