"""What a short training run reads of a large mined file (issues #19/#21, "train reads what it
uses"): the old way (read and expand every row) against posmine's planned read (plan from two
light columns, then read and expand only the row groups the steps use), same batches.

    python benchmarks/train_read.py [--rows 100000] [--steps 58] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import pyarrow as pa

from _common import emit
from posmine.config import TrainConfig
from posmine.io import storage
from posmine.stages.mine import ROW_GROUP
from posmine.stages.train.plan import epoch_batches, expand, planned_batches


def synthetic_mined(rows: int) -> pa.Table:
    """Mined rows of 1-3 positives and 4 negatives, texts of ~60 words (SciFact-sized)."""
    words = " ".join(f"w{i}" for i in range(60))
    cols: dict[str, list] = {k: [] for k in ("query_id", "query", "positive_ids", "positives",
                                              "positive_scores", "negative_ids", "negatives",
                                              "negative_scores")}
    for i in range(rows):
        p = 1 + i % 3
        cols["query_id"].append(f"q{i}")
        cols["query"].append(f"query {i} {words[:40]}")
        cols["positive_ids"].append([f"d{i}-{j}" for j in range(p)])
        cols["positives"].append([f"{words} {i} {j}" for j in range(p)])
        cols["positive_scores"].append([0.8] * p)
        cols["negative_ids"].append([f"n{i}-{j}" for j in range(4)])
        cols["negatives"].append([f"{words} neg {i} {j}" for j in range(4)])
        cols["negative_scores"].append([0.5, 0.4, 0.3, 0.2])
    return pa.table(cols)


def child(mode: str, url: str, steps: int) -> dict:
    """One way of getting the first `steps` batches, in a fresh process: seconds, peak RSS."""
    cfg = TrainConfig(batch_size=32, epochs=1, positives="all")
    t0 = time.perf_counter()
    if mode == "planned":
        batches, rows_read = planned_batches(url, cfg, 0, steps)
    else:
        examples = expand(storage.read_parquet(url))
        batches = [b for _, b in zip(range(steps), epoch_batches(examples, cfg), strict=False)]
        rows_read = storage.read_parquet(url, columns=["query_id"]).num_rows
    seconds = time.perf_counter() - t0
    ids = [[e["query_id"] + "/" + e["positive"][-4:] for e in b] for b in batches]
    return {"seconds": round(seconds, 2), "rows_read": rows_read, "batches": ids,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=58)
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=2, metavar=("MODE", "URL"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.steps)))
        return
    with tempfile.TemporaryDirectory() as d:
        url = f"{d}/mined.parquet"
        storage.write_parquet(synthetic_mined(a.rows), url, row_group_size=ROW_GROUP)
        runs = {m: json.loads(subprocess.run(
            [sys.executable, __file__, "--steps", str(a.steps), "--child", m, url],
            capture_output=True, text=True, check=True).stdout) for m in ("planned", "whole")}
    assert runs["planned"].pop("batches") == runs["whole"].pop("batches"), "same batches"
    emit({"mined_rows": a.rows, "steps": a.steps, "batch": 32, **{
        f"{m}_{k}": v for m, r in runs.items() for k, v in r.items()},
        "speedup": round(runs["whole"]["seconds"] / runs["planned"]["seconds"], 1)}, a.json)


if __name__ == "__main__":
    main()
