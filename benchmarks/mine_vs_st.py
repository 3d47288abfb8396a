"""posmine mining vs sentence-transformers' `mine_hard_negatives`, same model/data/settings.

Both run end to end, one after the other: posmine (data + Ray Data embed + sharded FAISS +
TopK-PercPos 0.95) and ST (`relative_margin=0.05`, `range_max=top_k`, `sampling_strategy="top"`,
`use_faiss=True`), with the same rule: posmine is told ST's window (the teacher's top 30) and
ST's anchor (a query's lowest positive score, one list for all its positives). Reports wall
times, their ratio, and per (query, positive) example the identical lists and the overlap.

Each run has a fresh interpreter to itself (and posmine's runs a local Ray of their own, its
start timed apart): glibc's malloc raises its own thresholds as a process frees large blocks,
so runs sharing a process would each be timed with the history of the ones before. posmine's
CPU encoder sets those thresholds itself (`teacher.reuse_memory`); ST runs both as it comes
and given the same lever (`st_reuse_memory_*`), and `--system-malloc` adds posmine runs with
`teacher.reuse_memory=false`. `--dtypes float32 bfloat16` adds both tools with the teacher in
bfloat16 (posmine's opt-in `teacher.dtype`, ST's `torch_dtype`): their times, and their lists
against ST's float32 ones, each other's and posmine's float32 ones.

    python benchmarks/mine_vs_st.py [--data PATH] [--out DIR] [--actors N] [--threads N]
        [--backends torch openvino] [--where ray driver] [--st-batch-sizes 32 8]
        [--system-malloc] [--dtypes float32 bfloat16] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import emit, list_agreement
from posmine import pipeline
from posmine.config import default_beir_dir, load_config
from posmine.io import beir, storage
from posmine.models import allocator
from posmine.models.backbone import resolve_model
from posmine.stages import remote


def run_posmine(data: str, out: str, actors: int, threads: int, backend: str = "torch",
                where: str = "ray", reuse: bool = True, dtype: str = "float32") -> tuple[float, dict, dict]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config("jobs/configs/scifact.yaml", [
        f"data.path={data}", f"output.dir={out}", f"teacher.num_actors={actors}",
        f"teacher.backend={backend}", f"teacher.reuse_memory={str(reuse).lower()}",
        f"teacher.dtype={dtype}",
        # driver: the corpus embedded in this process, as a corpus under the bound is
        f"teacher.local_corpus_below={10**9 if where == 'driver' else 1000}",
        f"teacher.cpus_per_actor={1.0 if actors == 1 else 0.5}", f"teacher.torch_threads={threads}",
        "mining.rule=topk_percpos", "mining.perc=0.95", "mining.num_negatives=4", "mining.top_k=30",
        "mining.dedup_text=exact", "mining.window=rank",  # ST's range_max: the teacher's top 30
        # ST anchors all of a query's examples on its lowest positive's score (`torch.min` over
        # them in `mine_hard_negatives`) and repeats that one list for each positive
        "mining.anchor=min",
    ])
    t0 = time.perf_counter()
    manifest = pipeline.mine(cfg)
    seconds = time.perf_counter() - t0
    mined = storage.read_parquet(f"{out}/mine/mined.parquet").to_pylist()
    # keyed by (query, positive), as ST's n-tuples are: one row for each positive
    return seconds, {(r["query"], p): r["negatives"] for r in mined for p in r["positives"]}, manifest


def run_st(data: str, batch_size: int = 32, dtype: str = "float32") -> tuple[float, dict]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives


    t0 = time.perf_counter()
    ds = beir.load(data)
    corpus = {}
    for chunk in ds.corpus_chunks():
        for r in chunk.to_pylist():
            corpus[r["id"]] = f"{r['title']} {r['text']}".strip()
    qtext = dict(zip(ds.queries.column("id").to_pylist(), ds.queries.column("text").to_pylist(),
                     strict=True))
    pairs = [(qtext[q], corpus[d]) for q, d, s in zip(
        *(ds.qrels["train"].column(c).to_pylist() for c in ("query_id", "doc_id", "score")),
        strict=True) if s > 0]
    model = SentenceTransformer(resolve_model("default"), device="cpu",
                                model_kwargs={"torch_dtype": getattr(torch, dtype)})
    model.max_seq_length = 256
    mined = mine_hard_negatives(
        Dataset.from_dict({"query": [p[0] for p in pairs], "positive": [p[1] for p in pairs]}),
        model, corpus=list(corpus.values()), range_max=30, relative_margin=0.05, num_negatives=4,
        sampling_strategy="top", batch_size=batch_size, use_faiss=True, output_format="n-tuple",
        verbose=True)
    seconds = time.perf_counter() - t0
    out: dict[tuple[str, str], list[str]] = {}
    for r in mined:
        out[r["query"], r["positive"]] = [r[f"negative_{i}"] for i in range(1, 5)]
    return seconds, out


def one_run(spec: dict[str, Any]) -> dict[str, Any]:
    """The run `spec` names, in this process: seconds, negative lists and what the rule dropped."""
    if spec["kind"] == "st":
        if spec["reuse"]:
            allocator.reuse_freed_memory()  # the lever posmine's encoder pulls, given to ST
        seconds, lists = run_st(spec["data"], spec["batch"], spec["dtype"])
        extra: dict[str, Any] = {}
    else:
        t0 = time.perf_counter()
        remote.ensure_ray()  # a cluster is already up in production: timed apart
        extra = {"ray_init_seconds": time.perf_counter() - t0}
        seconds, lists, manifest = run_posmine(*(spec[k] for k in (
            "data", "out", "actors", "threads", "backend", "where", "reuse", "dtype")))
        extra["dropped_by_rule"] = manifest["stats"]["dropped_by_rule"]
    return {"seconds": seconds, "lists": [[q, p, n] for (q, p), n in lists.items()], **extra}


def isolated(spec: dict[str, Any]) -> tuple[float, dict, dict[str, Any]]:
    """`one_run(spec)` in a fresh interpreter -> (seconds, {(query, positive): negatives}, rest)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "run.json")
        subprocess.run([sys.executable, __file__, "--one", json.dumps(spec), "--json", str(path)],
                       check=True)
        got = json.loads(path.read_text())
    return got.pop("seconds"), {(q, p): n for q, p, n in got.pop("lists")}, got


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=default_beir_dir("scifact"))
    p.add_argument("--out", default="/tmp/posmine-bench-mine")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backends", nargs="+", default=["torch"], choices=["torch", "openvino"],
                   help="posmine's teacher.backend; each runs beside the same ST runs")
    p.add_argument("--where", nargs="+", default=["ray"], choices=["ray", "driver"],
                   help="the corpus through the Ray Data actor pool, or embedded in the driver")
    p.add_argument("--st-batch-sizes", nargs="+", type=int, default=[32],
                   help="ST's encode batch; the first (its default, 32) is the ratios' reference, "
                        "the others (8: as few long texts as posmine's 2,048-token batches) its own rows")
    p.add_argument("--system-malloc", action="store_true",
                   help="also posmine with teacher.reuse_memory=false (glibc's defaults)")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="the teacher's precision (posmine's teacher.dtype, ST's torch_dtype); "
                        "float32 is the reference: bfloat16 (opt-in) changes some negatives")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child's run
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if a.one:
        Path(a.json).write_text(json.dumps(one_run(json.loads(a.one))))
        return
    st_runs = {(b, r): isolated({"kind": "st", "data": a.data, "batch": b, "reuse": r, "dtype": "float32"})
               for r in (False, True) for b in a.st_batch_sizes}
    runs = {(b, w, r, t): isolated({"kind": "posmine", "data": a.data, "out": a.out, "actors": a.actors,
                                    "threads": a.threads, "backend": b, "where": w, "reuse": r, "dtype": t})
            for t in a.dtypes for r in ([False, True] if a.system_malloc else [True])
            for w in a.where for b in a.backends}
    # ST at each lower precision too, as it comes (batch 32, glibc's malloc): the like-for-like
    # speed of a bf16 posmine, and the lists each precision gives
    st_low = {t: isolated({"kind": "st", "data": a.data, "batch": 32, "reuse": False, "dtype": t})
              for t in a.dtypes if t != "float32"}
    ref_batch = a.st_batch_sizes[0]
    st_s, st, _ = st_runs[ref_batch, False]
    result: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "st_seconds": round(st_s, 1),
        "ray_init_seconds": round(next(iter(runs.values()))[2]["ray_init_seconds"], 1)}
    # ST's other runs: its other batch sizes, and each batch size given posmine's malloc lever
    others = {f"st{'_reuse_memory' if r else ''}_batch{b}": (s, lists)
              for (b, r), (s, lists, _) in st_runs.items() if (b, r) != (ref_batch, False)}
    for tag, (s, lists) in others.items():
        # the same negatives whatever ST's batch (its vectors move by ~1e-7)
        result.update({f"{tag}_seconds": round(s, 1),
                       f"{tag}_identical_to_batch{ref_batch}": sum(lists.get(k) == v for k, v in st.items())})
    for t, (s, lists, _) in st_low.items():
        result.update({f"st_{t}_seconds": round(s, 1),
                       **{f"st_{t}_{k}_vs_st": v for k, v in list_agreement(lists, st).items()}})
        others[f"st_{t}"] = (s, lists)
    for (b, w, r, t), (pm_s, pm, rest) in runs.items():
        tag = ("" if b == "torch" else f"_{b}") + ("" if w == "ray" else f"_{w}") + (
            "" if r else "_system_malloc") + ("" if t == "float32" else f"_{t}")
        result.update({f"posmine{tag}_seconds": round(pm_s, 1),
                       f"speedup{tag}_posmine_over_st": round(st_s / pm_s, 3),
                       f"posmine{tag}_dropped_by_rule": rest["dropped_by_rule"],
                       **{f"{k}{tag}": v for k, v in list_agreement(pm, st).items()}})
        for other, (s, _) in others.items():
            result[f"speedup{tag}_posmine_over_{other}"] = round(s / pm_s, 3)
        if t != "float32":  # against ST at the same precision, and posmine's own fp32 lists
            result.update({f"{k}{tag}_vs_st_{t}": v for k, v in list_agreement(pm, st_low[t][1]).items()})
            same = runs.get((b, w, r, "float32"))
            if same is not None:
                result.update({f"{k}{tag}_vs_posmine_float32": v
                               for k, v in list_agreement(pm, same[1]).items()})
    emit(result, a.json)


if __name__ == "__main__":
    main()
