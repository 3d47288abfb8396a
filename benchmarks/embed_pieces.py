"""What resuming within a data part costs: the embed stage on SciFact's corpus with pieces saved
as configured (`teacher.piece_rows`, `teacher.piece_seconds`) against one write per part, each
in a fresh `posmine embed` process, alternating, and what a kill mid-part keeps.

    python benchmarks/embed_pieces.py [--runs 1] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import emit

ROOT = Path(__file__).parents[1]
NEVER = ["teacher.piece_rows=1000000000", "teacher.piece_seconds=1000000"]


def embed_seconds(out: Path, extra: list[str]) -> float:
    """The embed stage's own seconds (from its manifest) in a fresh process."""
    cmd = [sys.executable, "-m", "posmine.cli", "embed", str(ROOT / "jobs/configs/scifact.yaml"),
           f"output.dir={out}", *extra]
    subprocess.run(cmd, check=True, capture_output=True)
    manifest = next(out.glob("embed/*/_manifest.json"))
    return float(json.loads(manifest.read_text())["seconds"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    times: dict[str, list[float]] = {"pieces": [], "whole_parts": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for name, extra in (("pieces", []), ("whole_parts", NEVER)):
                times[name].append(embed_seconds(Path(tmp) / f"{name}-{i}", extra))
    best = {k: min(v) for k, v in times.items()}
    emit({"corpus": "scifact (5,183 abstracts, one data part)", "embed_seconds": times,
          "ratio_pieces_to_whole_parts": round(best["pieces"] / best["whole_parts"], 3),
          # at piece_seconds=60 an interrupted run loses at most a minute of the part in
          # progress; with whole parts it loses the whole part
          "lost_on_a_kill_at_most_s": {"pieces": 60, "whole_parts": best["whole_parts"]}},
         args.out)


if __name__ == "__main__":
    main()
