"""Fixed costs of a small `posmine run`: each stage's seconds, with the small search and mine
work in its own process (the defaults) and on Ray actors as before (`index.local_below=0`, the
`remote.LOCAL_CANDIDATES=0`). Work this small is almost all fixed cost, which is what
most of the test suite pays.

    python benchmarks/small_run.py --json benchmarks/results/small_run.json

Data: 40 passages, 12 queries (the tests' tiny BEIR set); model: the tests' randomly
initialised 2-layer BERT (hidden size 32); 2 training steps. Each arm runs `posmine run` in a
fresh process with its own local Ray, in a fresh output folder; arms alternate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import emit

REPO = Path(__file__).resolve().parents[1]
ARMS = {  # arm -> (overrides, Python run first in the process)
    "in_process": ([], ""),
    "actors": (["index.local_below=0"], "import posmine.stages.remote as m; m.LOCAL_CANDIDATES = 0; "),
}


def make_inputs(root: Path) -> tuple[Path, str]:
    """The tests' tiny BEIR folder and tiny model, built in `root`."""
    sys.path.insert(0, str(REPO))
    from tests import conftest

    class Factory:
        def mktemp(self, name: str) -> Path:
            (root / name).mkdir(exist_ok=True)
            return root / name

    return conftest.write_beir(root / "beir"), conftest.tiny_model.__wrapped__(Factory())


def run_arm(arm: str, beir: Path, model: str, out: Path) -> dict[str, Any]:
    overrides, prelude = ARMS[arm]
    args = [f"data.path={beir}", f"teacher.model={model}", f"train.model={model}",
            "teacher.cpus_per_actor=0.5", "teacher.torch_threads=1", "data.test_fraction=0.25",
            "mining.top_k=8", "mining.num_negatives=2", "train.batch_size=4", "train.max_steps=2",
            "train.cpus_per_worker=0.5", "evaluate.k_values=[10]", "evaluate.top_k=20",
            f"output.dir={out}", *overrides]
    argv = ["run", "jobs/configs/scifact.yaml", *args]
    code = f"{prelude}from posmine.cli import main; raise SystemExit(main({argv!r}))"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if r.returncode:
        raise SystemExit(f"{arm}: posmine run failed:\n{r.stderr[-3000:]}")
    stages: dict[str, float] = {}
    for m in out.rglob("_manifest.json"):
        d = json.loads(m.read_text())
        stages[d["stage"]] = round(stages.get(d["stage"], 0.0) + float(d.get("seconds", 0.0)), 2)
    return {"wall_s": round(wall, 1), "stage_s": dict(sorted(stages.items()))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        beir, model = make_inputs(Path(tmp))
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
        for i in range(a.repeats):
            order = list(ARMS) if i % 2 == 0 else list(ARMS)[::-1]
            for arm in order:
                runs[arm].append(run_arm(arm, beir, model, Path(tmp) / f"out-{arm}-{i}"))
                print(arm, runs[arm][-1], file=sys.stderr)
    emit({"cpus": os.cpu_count(), "runs": runs}, a.json)


if __name__ == "__main__":
    main()
