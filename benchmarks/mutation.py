"""Mutation testing of the pure core with cosmic-ray: how many broken versions do the tests catch?

    pip install cosmic-ray
    python benchmarks/mutation.py --sample 200 --json benchmarks/results/mutation.json

Each module of the pure core (the rules, the losses, the metrics) is mutated by cosmic-ray's
operators (comparisons flipped, numbers changed, operators swapped, ...), one mutant at a time,
and the module's unit tests run against it; a mutant the tests fail on is killed. Mutants are
made in a copy of the repository (the working tree is never touched, so runs beside it are
safe). `--sample N` runs a seeded sample of N mutants per module (all with 0) and says so.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# module -> the unit tests that guard it (the fast ones: no Ray, no real data)
MODULES = {
    "mining": "tests/test_mining.py tests/test_window.py tests/test_multi_positive.py "
              "tests/test_audit.py -k 'not cisi and not cli'",
    "losses": "tests/test_losses.py tests/test_multi_positive.py -k 'not cisi'",
    "metrics": "tests/test_metrics.py",
    "merge": "tests/test_index.py -k merge",
}


def config(copy: Path, module: str, tests: str) -> Path:
    toml = copy / f"mut-{module}.toml"
    # PYTHONPATH: the copy's (mutated) source, not the installed working tree's
    command = (f"env PYTHONPATH={copy}/platform RAY_AUTH_MODE=disabled {sys.executable} "
               f"-m pytest -x -q -p no:cacheprovider {tests}")
    toml.write_text(f'''[cosmic-ray]
module-path = "platform/posmine/{module}.py"
timeout = 120.0
excluded-modules = []
test-command = "{command}"

[cosmic-ray.distributor]
name = "local"
''')
    return toml


def keep_sample(session: Path, n: int, seed: int) -> tuple[int, int]:
    """Leave a seeded sample of `n` work items in the session; returns (kept, total)."""
    db = sqlite3.connect(session)
    # job ids are fresh UUIDs at each init: order the mutants by what they change instead, so
    # the same seed samples the same mutants on every run
    ids = [r[0] for r in db.execute(
        "select job_id from mutation_specs order by operator_name, start_pos_row, start_pos_col, occurrence")]
    drop = sorted(set(ids) - set(random.Random(seed).sample(ids, n))) if 0 < n < len(ids) else []
    for table in ("mutation_specs", "work_items"):
        db.executemany(f"delete from {table} where job_id = ?", [(j,) for j in drop])
    db.commit()
    return len(ids) - len(drop), len(ids)


def outcomes(session: Path) -> dict[str, int]:
    db = sqlite3.connect(session)
    rows = db.execute("select worker_outcome, test_outcome from work_results").fetchall()
    out = {"killed": 0, "survived": 0, "incompetent": 0, "abnormal": 0}
    for worker, test in rows:  # cosmic-ray stores them upper-case: NORMAL, KILLED, ...
        key = str(test).lower() if str(worker).lower() == "normal" else "abnormal"
        out[key if key in out else "abnormal"] += 1
    return out


def survivors(session: Path) -> list[str]:
    db = sqlite3.connect(session)
    rows = db.execute("select diff from work_results where lower(test_outcome) = 'survived'").fetchall()
    return [r[0] for r in rows]


class _NoAnnotations(ast.NodeTransformer):
    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.annotation = None
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        node.returns = None
        self.generic_visit(node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AnnAssign:
        node.annotation = ast.Constant(None)
        self.generic_visit(node)
        return node


def mutated_source(original: str, diff: str) -> str:
    """Apply cosmic-ray's one-hunk diff to the original module."""
    lines = original.splitlines()
    _, _, body = diff.partition("\n@@ -")
    start = int(re.match(r"(\d+)", body).group(1)) - 1  # type: ignore[union-attr]
    hunk = body.split("\n")[1:]
    old = [ln[1:] for ln in hunk if ln[:1] in (" ", "-")]
    new = [ln[1:] for ln in hunk if ln[:1] in (" ", "+")]
    return "\n".join(lines[:start] + new + lines[start + len(old):])


def in_annotation(original: str, diff: str) -> bool:
    """A mutant that changes only type annotations: equivalent, because the modules use
    `from __future__ import annotations` and never evaluate them."""
    def bare(src: str) -> str:
        return ast.dump(_NoAnnotations().visit(ast.parse(src)))

    try:
        return bare(original) == bare(mutated_source(original, diff))
    except (SyntaxError, AttributeError, ValueError):
        return False


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--modules", nargs="+", default=list(MODULES))
    p.add_argument("--sample", type=int, default=0, help="mutants per module (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    cr = str(Path(sys.executable).with_name("cosmic-ray"))
    # modules not run this time keep their earlier results (each says its own sample and seed)
    earlier = json.loads(Path(a.json).read_text()) if a.json and Path(a.json).exists() else {}
    results = {m: r for m, r in earlier.get("modules", {}).items() if m not in a.modules}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv", ".git", "posmine-out", "results"))
        for module in a.modules:
            toml, session = config(copy, module, MODULES[module]), copy / f"mut-{module}.sqlite"
            subprocess.run([cr, "init", str(toml), str(session)], cwd=copy, check=True)
            subprocess.run([cr, "baseline", str(toml)], cwd=copy, check=True)  # the tests pass unmutated
            kept, total = keep_sample(session, a.sample, a.seed)
            t0 = time.perf_counter()
            subprocess.run([cr, "exec", str(toml), str(session)], cwd=copy, check=True)
            counts = outcomes(session)
            killed = counts["killed"] + counts["abnormal"]  # a crash or timeout is caught too
            alive = survivors(session)
            source = (copy / "platform" / "posmine" / f"{module}.py").read_text()
            annotation = sum(in_annotation(source, d) for d in alive)
            competent = killed + counts["survived"]
            results[module] = {"mutants": total, "run": kept, "sample": a.sample, "seed": a.seed,
                               **counts,
                               "survived_in_annotations": annotation,
                               "score": round(killed / max(1, competent), 4),
                               "score_without_annotations": round(killed / max(1, competent - annotation), 4),
                               "seconds": round(time.perf_counter() - t0, 1),
                               "survivors": [d for d in alive if not in_annotation(source, d)]}
            print(f"{module}: {killed}/{competent} killed ({results[module]['score']:.1%}; "
                  f"{results[module]['score_without_annotations']:.1%} without the {annotation} "
                  f"annotation-only mutants) of {kept} run ({total} mutants)", flush=True)
    allk = sum(r["killed"] + r["abnormal"] for r in results.values())
    allc = allk + sum(r["survived"] for r in results.values())
    ann = sum(r["survived_in_annotations"] for r in results.values())
    summary = {"modules": results, "score": round(allk / max(1, allc), 4),
               "score_without_annotations": round(allk / max(1, allc - ann), 4)}
    print(f"pure core: {allk}/{allc} killed ({summary['score']:.1%}; "
          f"{summary['score_without_annotations']:.1%} without annotation-only mutants)")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
