"""Fine-tuning quality on SciFact: base model vs naive top-k vs TopK-PercPos 0.95.

Each rule runs `posmine run` (mine -> train -> evaluate) with jobs/configs/scifact.yaml, the
same seed and budget; the data and teacher embeddings of the first run are copied to the
others so the corpus is embedded once.

    python benchmarks/quality.py [--rules topk_percpos naive_topk] [--out DIR] [k=v ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from _common import emit
from posmine import pipeline
from posmine.config import load_config
from posmine.io import storage
from posmine.stages import remote


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rules", nargs="+", default=["topk_percpos", "naive_topk"])
    p.add_argument("--out", default="/tmp/posmine-quality")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    remote.ensure_ray()
    results: dict = {"rows": {}}
    first: Path | None = None
    for rule in a.rules:
        out = Path(a.out) / rule
        if first is not None and not (out / "embed").exists():
            for stage in ("data", "embed", "candidates", "evaluate"):
                shutil.copytree(first / stage, out / stage, dirs_exist_ok=True)
        cfg = load_config("jobs/configs/scifact.yaml",
                          [f"mining.rule={rule}", f"output.dir={out}", *a.overrides])
        t0 = time.perf_counter()
        summary = pipeline.run(cfg)
        mine = storage.read_manifest(str(out / "mine")) or {}
        train = storage.read_manifest(str(out / "train")) or {}
        results["base"] = summary["base"]
        results["rows"][rule] = {
            "metrics": summary["fine_tuned"], "seconds": round(time.perf_counter() - t0, 1),
            "dropped_by_rule": mine.get("stats", {}).get("dropped_by_rule"),
            "train_seconds": train.get("seconds"), "train_steps": train.get("rows", {}).get("steps"),
            "samples_per_s": train.get("stats", {}).get("samples_per_s")}
        print(rule, pipeline.format_table(summary), sep="\n", flush=True)
        first = first or out
    emit(results, a.json)


if __name__ == "__main__":
    main()
