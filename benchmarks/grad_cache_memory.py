"""Peak memory of one training step against batch size, with and without GradCache.

Each point runs in a fresh process (peak RSS is per process): all-MiniLM-L6-v2, batch B of
(query, positive, 4 hard negatives), passages 128 tokens, CPU fp32. Reports peak RSS and its
growth over the process after loading the model, and the step's seconds.

    python benchmarks/grad_cache_memory.py --points 8:0 16:0 16:8 32:8 64:8 \
        --json benchmarks/results/grad_cache_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

WORDS = ("protein cell gene cancer virus brain heart blood drug trial mouse human risk dose "
         "study effect level rate patients treatment therapy vitamin diet sleep stress").split()


def text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n))


def one_point(batch: int, chunk: int) -> dict[str, float]:
    import torch

    from posmine.config import TrainConfig
    from posmine.stages.train.plan import expand
    from posmine.stages.train.trainer import StudentTrainer

    torch.set_num_threads(2)
    rows = expand({"query_id": [f"q{i}" for i in range(batch)],
                   "query": [text(i, 12) for i in range(batch)],
                   "positives": [[text(i + 1, 200)] for i in range(batch)],
                   "positive_scores": [[0.9]] * batch,
                   "negatives": [[text(i + 2 + j, 200) for j in range(4)] for i in range(batch)],
                   "negative_scores": [[0.5] * 4] * batch})
    cfg = TrainConfig(batch_size=batch, num_negatives=4, passage_max_length=128,
                      grad_cache_chunk=chunk)
    trainer = StudentTrainer(cfg, 10, torch.device("cpu"))
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    t0 = time.perf_counter()
    trainer.step(rows)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"batch": batch, "chunk": chunk, "peak_gib": round(peak, 2),
            "step_gib": round(peak - loaded, 2), "seconds": round(seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--points", nargs="+", default=["8:0", "16:0", "16:8", "32:8", "64:8"],
                   help="batch:chunk (chunk 0 = one pass)")
    p.add_argument("--json", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        b, c = map(int, a.one.split(":"))
        print(json.dumps(one_point(b, c)))
        return
    rows = []
    for point in a.points:
        out = subprocess.run([sys.executable, __file__, "--one", point], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(rows[-1], flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "model": "all-MiniLM-L6-v2", "negatives": 4,
                       "passage_max_length": 128, "device": "cpu (2 cores)"}, f, indent=2)


if __name__ == "__main__":
    main()
