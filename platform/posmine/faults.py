"""Where a worker is, for fault tests: embed actors and training workers call `trace` on every
batch or step; with `POSMINE_TRACE_DIR` set it records which node (`POSMINE_NODE_NAME`, set on
each node's `ray start`) is doing what, so a test can kill that node at a known point.
`POSMINE_TRACE_DELAY_S` slows each traced call, giving the test time to act. Unset: no cost."""

from __future__ import annotations

import os
import time
from pathlib import Path


def trace(stage: str, step: int | None = None) -> None:
    """Touch `<trace dir>/<stage>-<node>`, holding the last step, then wait the set delay."""
    where = os.environ.get("POSMINE_TRACE_DIR")
    if not where:
        return
    node = os.environ.get("POSMINE_NODE_NAME", "unnamed")
    # write-then-rename: a reader never sees a half-written step
    tmp = Path(where) / f".{stage}-{node}-{os.getpid()}"
    tmp.write_text("" if step is None else str(step))
    tmp.replace(Path(where) / f"{stage}-{node}")
    time.sleep(float(os.environ.get("POSMINE_TRACE_DELAY_S", "0")))
