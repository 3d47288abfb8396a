"""The teacher in bfloat16 on the CPU (opt-in `teacher.dtype=bfloat16`) against float32: what it
saves and what it changes, on one dataset's default config (issue #21, item 2's lower precision).

For each precision, in one process and one output folder (the data stage shared):
1. `posmine mine` end to end on the config's split, timed (the embed stage's actors, the
   sharded search and the rule, exactly as `posmine mine` runs them).
2. The negative lists, per training example (query, its positives): identical lists, the
   mean overlap of the sets, and the examples short of `mining.num_negatives`.
3. With `--seeds`: training on each precision's lists and scoring the student on the test
   split, which always runs at the device's own precision (fp32 on the CPU), so the nDCG
   difference is the negatives' alone.

    python benchmarks/teacher_precision.py --dataset scifact [--seeds 42] [--json out.json]
    python benchmarks/teacher_precision.py --dataset cisi --seeds 42     # many positives a query

Mining is timed only in a fresh `--out/<dataset>`: rerun in the same folder (more seeds), the
stages already done are skipped and their times reported as null.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

import torch

from _common import emit, list_agreement
from posmine import pipeline
from posmine.config import Config, load_config
from posmine.io import storage
from posmine.models.encoder import cpu_has_amx
from posmine.stages import remote
from posmine.stages import train as train_stage

DTYPES = ("float32", "bfloat16")


def mined_lists(mine_dir: str) -> dict[tuple[str, tuple[str, ...]], list[str]]:
    """{(query id, its positive ids): negative ids} from a mine stage's output."""
    rows = storage.read_parquet(f"{mine_dir}/mined.parquet",
                                columns=["query_id", "positive_ids", "negative_ids"]).to_pylist()
    return {(r["query_id"], tuple(r["positive_ids"])): r["negative_ids"] for r in rows}


def config(dataset: str, out: str, dtype: str, seed: int = 42) -> Config:
    return load_config(f"jobs/configs/{dataset}.yaml", [
        f"output.dir={out}", f"teacher.dtype={dtype}", f"train.seed={seed}"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", choices=["scifact", "cisi", "cranfield"], default="scifact")
    p.add_argument("--out", default="/tmp/posmine-bench-precision")
    p.add_argument("--seeds", nargs="*", type=int, default=[],
                   help="train and score each precision's lists at these seeds (none: mining only)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out = f"{a.out}/{a.dataset}"
    t0 = time.perf_counter()
    remote.ensure_ray()
    result: dict[str, Any] = {
        "dataset": a.dataset, "ray_init_seconds": round(time.perf_counter() - t0, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, AMX: {cpu_has_amx()}, "
                   f"torch {torch.__version__}"}
    pipeline.prepare(config(a.dataset, out, "float32"))  # the data stage, shared: not timed
    lists, manifests = {}, {}
    for dtype in DTYPES:
        cfg = config(a.dataset, out, dtype)
        # a folder mined before (a rerun with more seeds) skips the stages: no time to report
        reused = storage.read_manifest(f"{out}/mine-{dtype}") is not None
        t0 = time.perf_counter()
        manifests[dtype] = pipeline.mine(cfg, name=f"mine-{dtype}")
        result[f"mine_seconds_{dtype}"] = None if reused else round(time.perf_counter() - t0, 1)
        lists[dtype] = mined_lists(manifests[dtype]["dir"])
        result[f"dropped_by_rule_{dtype}"] = manifests[dtype]["stats"]["dropped_by_rule"]
    k = config(a.dataset, out, "float32").mining.num_negatives
    fp32_s, bf16_s = result["mine_seconds_float32"], result["mine_seconds_bfloat16"]
    if fp32_s is not None and bf16_s is not None:
        result["speedup_bfloat16"] = round(fp32_s / bf16_s, 3)
    result["bfloat16_vs_float32"] = list_agreement(lists["bfloat16"], lists["float32"],
                                                   ("bfloat16", "float32"))
    for dtype in DTYPES:
        result[f"short_of_k_{dtype}"] = sum(len(v) < k for v in lists[dtype].values())
    for seed in a.seeds:
        for dtype in DTYPES:
            cfg = config(a.dataset, out, dtype, seed)
            mined = manifests[dtype]
            trained = train_stage.run(cfg.train, mined["dir"], cfg.output.dir,
                                      upstream=str(mined["config_hash"]), name=f"train-{dtype}-s{seed}")
            metrics = pipeline.evaluate_student(cfg, str(trained["model_dir"]))["metrics"]
            result[f"ndcg@10_{dtype}_s{seed}"] = round(metrics["ndcg@10"], 4)
            result[f"recall@100_{dtype}_s{seed}"] = round(metrics["recall@100"], 4)
            print(f"{a.dataset} {dtype} seed {seed}: nDCG@10 {metrics['ndcg@10']:.4f}", flush=True)
        result[f"ndcg@10_delta_s{seed}"] = round(
            result[f"ndcg@10_bfloat16_s{seed}"] - result[f"ndcg@10_float32_s{seed}"], 4)
    emit(result, a.json)


if __name__ == "__main__":
    main()
