"""Fault injection for tests, in one hook: each embed batch, each finished embed part, each
training worker's start of training and each training step calls `hook(stage, point, n)`. With no
`POSMINE_FAULTS` and no `POSMINE_TRACE_DIR` set it does nothing.

`POSMINE_FAULTS` is a comma-separated list of `stage.point[=n]:action`:
- `kill`: SIGKILL this process, once (the marker `<POSMINE_FAULT_DIR>/<stage>.<point>.fired`
  stops it firing again after a restart), like a node lost mid-run;
- `stall`: touch `<POSMINE_FAULT_DIR>/<stage>.<point>.stalled` and wait to be signalled, so a
  signal lands at a known point;
- `delay=S`: sleep S seconds.

`n` is the caller's own count (the training step, the parts written); where the caller has
none (an embed batch), the calls of that point counted over every process, in a file under
`POSMINE_FAULT_DIR`. Without `=n` the action matches every call. A training step's hook runs
after its update and before its report, so `train.step=3:delay=3,train.step=4:kill` gives step
2's checkpoint time to land, then kills the worker at step 4, before its checkpoint.

`POSMINE_TRACE_DIR` records which node (`POSMINE_NODE_NAME`, set on each node's `ray start`) is
at which call, in `<dir>/<stage>-<node>`, so a test can kill that node at a known point.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import NamedTuple


class Fault(NamedTuple):
    stage: str
    point: str
    at: int | None  # None: every call
    action: str  # kill, stall, delay
    seconds: float


def parse(spec: str) -> list[Fault]:
    """`POSMINE_FAULTS`' value as faults; a malformed item is a ValueError naming it."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            where, action = item.split(":", 1)
            stage, point = where.split(".", 1)
            point, _, at = point.partition("=")
            action, _, arg = action.partition("=")
            if action not in ("kill", "stall", "delay") or (action == "delay") != bool(arg):
                raise ValueError(action)
            out.append(Fault(stage, point, int(at) if at else None, action, float(arg or 0)))
        except ValueError as e:
            raise ValueError(f"POSMINE_FAULTS: cannot read {item!r} (stage.point[=n]:kill|stall|"
                             "delay=S)") from e
    return out


def hook(stage: str, point: str, n: int | None = None) -> None:
    """Trace, then act on the faults set for this call (see the module's doc)."""
    if os.environ.get("POSMINE_TRACE_DIR"):
        _trace(Path(os.environ["POSMINE_TRACE_DIR"]), stage, n)
    spec = os.environ.get("POSMINE_FAULTS")
    if not spec:
        return
    faults = [f for f in parse(spec) if (f.stage, f.point) == (stage, point)]
    if not faults:
        return
    where = Path(os.environ.get("POSMINE_FAULT_DIR", "."))
    if n is None and any(f.at is not None for f in faults):
        n = _count(where / f"{stage}.{point}.calls")
    for f in faults:
        if f.at is None or f.at == n:
            _act(f, where / f"{stage}.{point}")


def _act(fault: Fault, marker: Path) -> None:
    if fault.action == "delay":
        time.sleep(fault.seconds)
    elif fault.action == "stall":
        Path(f"{marker}.stalled").touch()
        time.sleep(600)  # until the test's signal ends the process
    elif not Path(f"{marker}.fired").exists():
        Path(f"{marker}.fired").touch()
        os.kill(os.getpid(), signal.SIGKILL)


def _count(calls: Path) -> int:
    """This call's number among every process's calls of one point (appends are atomic)."""
    with calls.open("a") as f:
        f.write("x")
    return calls.stat().st_size


def _trace(where: Path, stage: str, n: int | None) -> None:
    """Touch `<where>/<stage>-<node>`, holding the last n; write-then-rename, so a reader never
    sees a half-written number."""
    node = os.environ.get("POSMINE_NODE_NAME", "unnamed")
    tmp = where / f".{stage}-{node}-{os.getpid()}"
    tmp.write_text("" if n is None else str(n))
    tmp.replace(where / f"{stage}-{node}")
