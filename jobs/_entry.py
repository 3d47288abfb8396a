"""Shared by the job entry points: `python jobs/<verb>.py --config X.yaml [key=value ...]`.

Submitted with `ray job submit --working-dir . -- python jobs/<verb>.py --config ...`; the
library joins the cluster named by RAY_ADDRESS (set by the job server) instead of starting one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from posmine.cli import main
except ImportError:  # a working_dir upload without an install: use the source folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
    from posmine.cli import main


def run(verb: str) -> None:
    p = argparse.ArgumentParser(prog=f"jobs/{verb}.py")
    p.add_argument("--config", required=True, help="YAML config, e.g. jobs/configs/scifact.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    a = p.parse_args()
    sys.exit(main([verb, a.config, *a.overrides]))
