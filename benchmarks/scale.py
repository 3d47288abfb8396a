"""Each stage's wall time and the driver's peak RSS as the number of queries grows 100x.

Synthetic BEIR data (`--docs` short documents; queries with 1-3 positives each, the
multi-positive case) and a tiny random 2-layer BERT (hidden 32, 16 tokens) as teacher and
student. Each stage of each size runs in a fresh driver process: data -> embed -> search ->
mine -> audit -> train
(`train.max_steps`, default 3: training is bounded, the point is what it reads; the audit
counts every setting of the default grid, 27, over the mine stage's candidates). A random
teacher ranks the positives anywhere, so `mining.max_depth=128` bounds the deeper searches of
the survivors windows (the default 4096 would make every list 4096 deep). Each stage's
driver peak RSS is its process's `ru_maxrss` (this process only, not Ray's workers: the search
stage's own process, a Ray task, reports its peak apart; the earlier stages are skipped by
their manifests, so it is that stage's peak, imports and Ray start included); the mine
stage's candidates per second are its candidates over its wall time (text store and actor
pool start included).

    python benchmarks/scale.py --queries 10000 100000 1000000 --docs 100000 \
        --json benchmarks/results/scale.json
    python benchmarks/scale.py --queries 10000 100000 --docs 1000000 --index ivf \
        --json benchmarks/results/scale-ivf-1m.json

With `--positives 43 --max-depth 4096` every query has 43 labelled positives and the survivors
windows search up to 4,096 deep: the audit's hard case (a set with many positives per query and
deep lists), e.g.

    python benchmarks/scale.py --queries 2600 --docs 100000 --positives 43 --max-depth 4096 \
        --stages data embed search mine audit --json benchmarks/results/scale-audit-deep.json

With `--index ivf` (or hnsw) a `recall` step between search and mine measures the index's
recall against exact search on 1,000 queries at the mine stage's search depth
(not counted in the driver's peak: it is a measurement, not a stage).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import emit
from driver_memory import WORDS, make_tiny_model

ROOT = Path("/tmp/posmine-bench-scale")


def make_dataset(nq: int, nd: int, positives: int = 0) -> Path:
    """`positives` per query, or 0 for 1-3 (2 on average)."""
    root = ROOT / (f"v2-q{nq}-d{nd}" + (f"-p{positives}" if positives else ""))
    if (root / "qrels" / "train.tsv").exists():
        return root
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    w = len(WORDS)
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(nd):
            # every document its own text (6 words spell i in base 25: 244M distinct), so that
            # an index's recall is not decided by ties between copies
            text = " ".join([*(WORDS[(i // w ** j) % w] for j in range(6)),
                             *(WORDS[(i * 7 + j * 3 + i // w) % w] for j in range(6))])
            f.write(json.dumps({"_id": f"d{i}", "title": WORDS[i % w], "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for i in range(nq):
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(
                WORDS[(i // w ** j) % w] for j in range(5))}) + "\n")
    with open(root / "qrels" / "train.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for i in range(nq):
            for j in range(positives or 1 + i % 3):  # 1-3 positives: 2 on average
                f.write(f"q{i}\td{(i * 7919 + j * 104729) % nd}\t1\n")
    return root


STAGES = ("data", "embed", "search", "mine", "audit", "train")


def child(data: str, model: str, out: str, steps: str, stage: str, kind: str, depth: str) -> None:
    """Run the pipeline up to `stage` (the earlier stages are done: skipped by their manifests)
    and report this process's peak RSS: the driver's peak in that stage alone."""
    from posmine import pipeline
    from posmine.config import load_config

    cfg = load_config(None, [f"index.kind={kind}",
        f"data.path={data}", "data.split=train", f"teacher.model={model}", "teacher.max_length=16",
        "teacher.batch_size=512", "teacher.num_actors=2", "teacher.cpus_per_actor=0.5",
        "teacher.torch_threads=1", "index.num_shards=2", "index.query_batch_size=8192",
        "mining.top_k=30", f"mining.max_depth={depth}", f"train.model={model}", f"train.max_steps={steps}",
        "train.batch_size=32", f"output.dir={out}"])
    sampler = MemorySampler()
    t0 = time.perf_counter()
    extra: dict[str, object] = {}
    if stage == "data":
        pipeline.prepare(cfg)
    elif stage == "embed":
        pipeline.embed(cfg)
    elif stage == "search":
        from posmine.io import storage

        dirs, _, rounds = pipeline.candidates(cfg, cfg.teacher, [cfg.mining])
        # the search itself runs in a Ray task (it holds the split's ids and positives)
        extra = {"search_process_peak_rss_mib": max(
            storage.read_manifest(d)["stats"]["search_process_peak_rss_mib"] for d in dirs),
            **rounds}
    elif stage == "recall":
        extra = recall(cfg)
    elif stage == "mine":
        st = pipeline.mine(cfg)["stats"]
        extra = {"candidates": st["candidates"], "examples": st["examples"]}
    elif stage == "audit":  # every setting of the default grid (27) over the same candidates
        st = pipeline.audit(cfg)["stats"]
        extra = {"settings": len(st["settings"]), "queries_audited": st["queries_audited"],
                 "examples_audited": sum(r["examples"] for r in st["settings"])}
    else:
        pipeline.train(cfg)
    seconds = round(time.perf_counter() - t0, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    anon, shmem = sampler.stop()
    print("STAGE", json.dumps({"stage": stage, "seconds": seconds, "driver_peak_rss_mib": peak,
                               "driver_peak_private_mib": anon, "driver_peak_shared_mib": shmem,
                               **extra}), flush=True)


def recall(cfg: Any, sample: int = 1000) -> dict[str, object]:
    """The index's recall against exact (flat) search on the first `sample` queries, at the
    search depth the mine stage uses: the share of the exact top-k that the index finds, and
    each one's queries per second (index build apart)."""
    import dataclasses

    import numpy as np

    from posmine import pipeline
    from posmine.io import storage
    from posmine.io.vectors import embedding_matrix
    from posmine.stages import search as index

    emb = pipeline.embed(cfg)["dir"]
    data_dir, _ = pipeline.prepare(cfg)
    k = pipeline.candidate_depth(data_dir, cfg.data.split, cfg.mining.top_k)
    qmat = embedding_matrix(storage.read_parquet_rows(f"{emb}/queries", list(range(sample))))
    rows, speed = {}, {}
    for kind in ("flat", cfg.index.kind):
        search = index.ShardedSearch(f"{emb}/corpus", dataclasses.replace(cfg.index, kind=kind))
        search.topk_rows(qmat[:1], k)  # built
        t0 = time.perf_counter()
        rows[kind] = search.topk_rows(qmat, k)[1]  # (sample, k)
        speed[kind] = round(sample / (time.perf_counter() - t0), 1)
        search.close()
    found = [len(set(a) & set(b)) / k for a, b in zip(rows["flat"], rows[cfg.index.kind], strict=True)]
    return {"recall_at_depth": round(float(np.mean(found)), 4), "depth": k, "sample": sample,
            "queries_per_s": speed}


class MemorySampler:
    """Peaks of the process's private (RssAnon) and shared-memory (RssShmem) resident pages,
    sampled every 20 ms: RSS also counts the pages of Ray's object store that the driver has
    read (`ray.get` maps them), which belong to the store, sized by Ray, not to the driver."""

    def __init__(self) -> None:
        import threading

        self.peak = {"RssAnon": 0, "RssShmem": 0}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.02):
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]))

    def stop(self) -> tuple[int, int]:
        self.done.set()
        self.thread.join()
        return self.peak["RssAnon"] // 1024, self.peak["RssShmem"] // 1024


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:9])
        return
    p = argparse.ArgumentParser()
    p.add_argument("--queries", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--index", default="flat", choices=["flat", "ivf", "hnsw"],
                   help="the index kind; other than flat, its recall against flat is measured")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                   help="the stages to run (each needs the ones before it)")
    p.add_argument("--positives", type=int, default=0,
                   help="labelled positives per query (default 0: 1-3, 2 on average)")
    p.add_argument("--max-depth", type=int, default=128,
                   help="mining.max_depth: how deep the survivors window may search")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    model = make_tiny_model()
    runs = []
    for nq in a.queries:
        data = make_dataset(nq, a.docs, a.positives)
        out = ROOT / f"out-v2-q{nq}-d{a.docs}-{a.index}-p{a.positives}-depth{a.max_depth}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        stages = []
        stages_here = [*STAGES[:3], "recall", *STAGES[3:]] if a.index != "flat" else list(STAGES)
        stages_here = [s for s in stages_here if s in a.stages or s == "recall"]
        for stage in stages_here:  # each stage in a fresh driver process
            proc = subprocess.run([sys.executable, __file__, "--child", str(data), str(model),
                                   str(out), str(a.steps), stage, a.index, str(a.max_depth)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-4000:])
            stages += [json.loads(line.split("STAGE", 1)[1]) for line in proc.stdout.splitlines()
                       if line.startswith("STAGE")]
        mine = next(s for s in stages if s["stage"] == "mine")
        runs.append({"queries": nq, "docs": a.docs, "index": a.index, "positives": a.positives,
                     "max_depth": a.max_depth, "stages": stages,
                     "driver_peak_rss_mib": max(s["driver_peak_rss_mib"] for s in stages
                                                if s["stage"] in STAGES),
                     "driver_peak_private_mib": max(s["driver_peak_private_mib"] for s in stages
                                                    if s["stage"] in STAGES),
                     "mine_candidates_per_s": round(mine["candidates"] / mine["seconds"]),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(runs[-1]), flush=True)
    emit(runs, a.json)


if __name__ == "__main__":
    main()
