"""The plain encoder with glibc's malloc as it comes and with `teacher.reuse_memory`, each run
in a fresh process (the setting cannot be undone, and glibc adapts its thresholds to what a
process has freed before), alternating; wall time, minor page faults and system time per run.

    python benchmarks/malloc_ab.py [--docs 1000] [--pairs 3] [--json results.json]
    python benchmarks/malloc_ab.py --batch-tokens 2048 8192 [--docs 6000] [--pairs 2]

`--docs N`: the first N SciFact abstracts, longest first (as `embed_peak.py`); 6000 takes the
whole corpus. `--batch-tokens A B` compares two `teacher.batch_tokens` caps instead (both with
`teacher.reuse_memory`; 8,192 is no cap for 32 rows of at most 256 tokens). Each pair runs its
two arms in turn, the second pair in the other order.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from _common import emit


def child(data: str, docs: int, reuse: bool, batch_tokens: int) -> None:
    """Embed the abstracts once after a warm-up batch; print the seconds."""
    from posmine.config import TeacherConfig
    from posmine.io import beir, prepared
    from posmine.io.prepared import passage_texts
    from posmine.models.encoder import Encoder

    chunk = prepared.sort_by_length(next(beir.load(data).corpus_chunks(chunk_rows=docs)))
    texts = passage_texts(chunk.to_pydict())
    enc = Encoder(TeacherConfig(batch_size=32, reuse_memory=reuse, batch_tokens=batch_tokens))
    enc.encode(texts[:32])
    t0 = time.perf_counter()
    enc.encode(texts)
    print(json.dumps({"seconds": time.perf_counter() - t0, "docs": len(texts)}))


def measured(args: list[str]) -> dict[str, float]:
    """One child run: its own seconds, and the minor faults and system time the OS counted."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    got = json.loads(out.strip().splitlines()[-1])
    return {"seconds": round(got["seconds"], 2), "docs": got["docs"],
            "minor_page_faults": after.ru_minflt - before.ru_minflt,
            "system_seconds": round(after.ru_stime - before.ru_stime, 2)}


def main() -> None:
    from posmine.config import default_beir_dir

    p = argparse.ArgumentParser()
    p.add_argument("--data", default=default_beir_dir("scifact"))
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--batch-tokens", nargs=2, type=int, default=None, metavar=("A", "B"))
    p.add_argument("--child", choices=["system", "reuse"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-batch-tokens", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.child:
        child(a.data, a.docs, a.child == "reuse", a.child_batch_tokens)
        return
    # arm name -> (malloc setting, token cap; 0: the CPU's default)
    arms = ({f"batch_tokens_{t}": ("reuse", t) for t in a.batch_tokens} if a.batch_tokens
            else {"system": ("system", 0), "reuse": ("reuse", 0)})
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for pair in range(a.pairs):
        for name in (list(arms) if pair % 2 == 0 else list(arms)[::-1]):
            kind, tokens = arms[name]
            runs[name].append(measured(["--child", kind, "--child-batch-tokens", str(tokens),
                                        "--docs", str(a.docs), "--data", a.data]))
    mean = {k: sum(r["seconds"] for r in v) / len(v) for k, v in runs.items()}
    first, second = list(arms)
    label = f"speedup_of_{second}" if a.batch_tokens else "speedup_of_reuse_memory"
    emit({"docs": runs[first][0]["docs"], "cpu": torch_cpu_capability(), "runs": runs,
          label: round(mean[first] / mean[second], 3)}, a.json)


def torch_cpu_capability() -> str:
    """The vector ISA torch dispatches its CPU kernels at (AVX512, AVX2, ...)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


if __name__ == "__main__":
    main()
