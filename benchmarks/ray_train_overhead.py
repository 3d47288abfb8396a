"""Where a Ray Train worker loses time against a plain process: the same `StudentTrainer` loop
(all-MiniLM-L6-v2, batch 16 x (query + positive + 4 negatives), passages at 128 tokens, 2
threads) in a plain process, in a 1-CPU Ray task, and in a 1-worker TorchTrainer; with the CPU
seconds Ray's own processes (raylet, GCS, dashboard agents, Train controller) burn meanwhile.

    python benchmarks/ray_train_overhead.py --json benchmarks/results/ray_train_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from _common import emit

STEPS = 4


def loop(tag: str) -> dict[str, Any]:
    """Median step seconds of the training loop, after one warm-up step."""
    import torch

    from posmine.config import TrainConfig
    from posmine.stages.train.trainer import StudentTrainer

    torch.set_num_threads(2)
    rows = [{"query_id": f"q{i}", "query": "cell protein gene cancer virus " * 6,
             "positive": "brain heart blood drug " * 30, "negatives": ["liver kidney lung immune " * 30] * 4,
             "positive_hash": i, "negative_hashes": [100 + i] * 4, "known": frozenset([i]),
             "scores": [0.9, 0.5, 0.4, 0.3, 0.2]} for i in range(16)]
    trainer = StudentTrainer(TrainConfig(batch_size=16, passage_max_length=128), STEPS + 1,
                             torch.device("cpu"))
    times = []
    for _ in range(STEPS + 1):
        start = time.perf_counter()
        trainer.step(rows)
        times.append(time.perf_counter() - start)
    return {"tag": tag, "step_s": round(statistics.median(times[1:]), 3), "nice": os.nice(0),
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def ray_cpu_seconds() -> float:
    """CPU seconds used so far by this machine's Ray processes other than the measured worker."""
    import psutil

    total = 0.0
    for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(k in cmd for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env",
                                  "TrainController")):
            t = p.info["cpu_times"]
            total += t.user + t.system if t else 0.0
    return total


def in_ray(mode: str) -> dict[str, Any]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    before, start = ray_cpu_seconds(), time.perf_counter()
    if mode == "task":
        out = ray.get(ray.remote(num_cpus=1)(loop).remote("ray task, 1 CPU"))
    else:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        # Ray Train keeps only checkpointed reports' metrics: the worker writes its own
        path = "/tmp/posmine-bench-rto-result.json"

        def worker(config: dict[str, Any]) -> None:
            with open(path, "w") as f:
                json.dump(loop("ray train, 1 worker"), f)

        TorchTrainer(worker, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(storage_path="/tmp/posmine-bench-rto")).fit()
        with open(path) as f:
            out = json.load(f)
    out["ray_processes_cpu_share"] = round((ray_cpu_seconds() - before) / (time.perf_counter() - start), 3)
    ray.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--mode", choices=["plain", "task", "train"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:  # one measurement per fresh process
        print("RESULT " + json.dumps(loop("plain process") if a.mode == "plain" else in_ray(a.mode)))
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    rows = []
    for mode in ("plain", "task", "train"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode], capture_output=True, text=True,
                             check=True).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    plain = rows[0]["step_s"]
    for r in rows:
        r["slower_than_plain"] = round(r["step_s"] / plain - 1, 3)
    emit({"steps": STEPS, "rows": rows}, a.json)


if __name__ == "__main__":
    main()
