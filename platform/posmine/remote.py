"""Work that reads a whole split runs in a Ray task, not in the driver.

A driver that reads a million-query qrels file, even as Arrow, grows by hundreds of MB
(decoding buffers, hash tables, the allocator's arenas): measured 260 -> 582 MiB for the
candidate depth of 2M qrels rows alone. `in_task` runs such a function in a worker process
that exits when it returns (`max_calls=1`), so its memory goes back to the node and the
driver stays the same size whatever the number of queries (BENCHMARKS.md, "Scale").

A Ray Data stream run from such a task also owns its actor pool through the task's worker: the
pool goes when the task ends, failed or not. A failed stream in the driver keeps its pool's CPUs
for as long as its error is referenced (a notebook's last error, a test's `pytest.raises`), and
the next stage's actors then wait for those CPUs forever (seen: a search after a failed mine).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def in_task(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a one-shot Ray task when Ray is up, else here; the task's own
    error is raised as it was raised (not Ray's wrapper of it)."""
    import ray

    if not ray.is_initialized():
        return fn(*args, **kwargs)
    task: Any = ray.remote(num_cpus=0, max_calls=1, max_retries=0)(fn)
    try:
        return ray.get(task.remote(*args, **kwargs))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, BaseException):
            raise e.cause from None
        raise
