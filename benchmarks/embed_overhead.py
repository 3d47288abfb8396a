"""Ray overhead of the embed stage: posmine's Ray Data actor pool vs a plain loop, same model,
same texts, same threads, in one process one after the other.

    python benchmarks/embed_overhead.py [--docs 1500] [--json results.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np
import torch

from _common import emit
from posmine.config import TeacherConfig, default_beir_dir
from posmine.io import beir, prepared, storage
from posmine.io.prepared import passage_texts
from posmine.io.vectors import read_embeddings
from posmine.models.encoder import Encoder
from posmine.stages import remote
from posmine.stages.embed import embed_ray, list_parts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=default_beir_dir("scifact"))
    p.add_argument("--docs", type=int, default=1500)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    chunk = prepared.sort_by_length(next(beir.load(a.data).corpus_chunks(chunk_rows=a.docs)))
    src, dst = "/tmp/posmine-bench-overhead/src", "/tmp/posmine-bench-overhead/dst"
    shutil.rmtree("/tmp/posmine-bench-overhead", ignore_errors=True)
    storage.write_parquet(chunk, f"{src}/part-0.parquet")
    texts = passage_texts(chunk.to_pydict())
    threads = os.cpu_count() or 1

    cfg = TeacherConfig(num_actors=1, cpus_per_actor=1.0, torch_threads=threads)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    enc = Encoder(cfg)  # the loop pays its model load too, as each actor does
    plain = enc.encode(texts)
    plain_s = time.perf_counter() - t0

    remote.ensure_ray()
    t0 = time.perf_counter()
    embed_ray(cfg, list_parts(src), dst, "corpus")
    ray_s = time.perf_counter() - t0
    ids, mat = read_embeddings(dst)
    row = {i: k for k, i in enumerate(chunk.column("id").to_pylist())}
    max_diff = float(np.abs(mat - plain[[row[i] for i in ids]]).max())
    result = {"docs": len(texts), "threads": threads, "plain_loop_seconds": round(plain_s, 2),
              "ray_data_seconds": round(ray_s, 2), "overhead": round(ray_s / plain_s - 1, 4),
              "plain_docs_per_s": round(len(texts) / plain_s, 2),
              "ray_docs_per_s": round(len(texts) / ray_s, 2), "max_abs_diff": max_diff}
    emit(result, a.json)


if __name__ == "__main__":
    main()
