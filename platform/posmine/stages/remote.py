"""Ray for the stages: started only when a stage has work to do (a rerun whose stages are all
current never starts it), and work that reads a whole split runs in a Ray task, not in the driver.

A driver that reads a million-query qrels file, even as Arrow, grows by hundreds of MB
(decoding buffers, hash tables, the allocator's arenas). `in_task` runs such a function in a worker process
that exits when it returns (`max_calls=1`), so its memory goes back to the node and the
driver stays the same size whatever the number of queries (BENCHMARKS.md, "Scale").

A Ray Data stream run from such a task also owns its actor pool through the task's worker: the
pool goes when the task ends, failed or not. A failed stream in the driver keeps its pool's CPUs
for as long as its error is referenced (a notebook's last error, a test's `pytest.raises`), and
the next stage's actors then wait for those CPUs forever (a search after a failed mine).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import posmine.terminal as terminal
from posmine.io.candidates import few_candidates, shard_table
from posmine.io.textstore import TextStore

T = TypeVar("T")
# Splits with fewer queries are searched and deepened in the driver, without starting Ray: below
# it the driver's growth (see above) is small and Ray's start costs more than the work.
HERE_BELOW_QUERIES = 20_000


def ensure_ray() -> None:
    """Join `RAY_ADDRESS` when set (cluster, `ray job submit`); else start a local instance."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    on_term = signal.getsignal(signal.SIGTERM)
    address = os.environ.get("RAY_ADDRESS")

    # Quiet (the CLI's default): the workers' output stays in Ray's session logs, and Ray's own
    # lines (its start, its warnings) go to the log file.
    to_driver = not terminal.quiet()
    if not to_driver:
        terminal.quiet_ray()
    if address:
        ray.init(address=address, log_to_driver=to_driver)
    else:
        # Ray runs workers at nice 15: then any of its own processes (raylet, GCS, the Train
        # controller, at nice 0) takes a core from a worker's OpenMP team, and every thread
        # of the team waits at the next barrier. A training step ran 20% slower than in a plain
        # process for that alone, and as fast at nice 0 (BENCHMARKS.md). The raylet reads this
        # from its environment when ray.init starts it.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # address="local": a stale `ray start` must not be mistaken for a live cluster. The
        # dashboard serves the State API that Ray Train's placement-group cleaner polls.
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=to_driver)
    if not to_driver:
        where = f"joined {address}" if address else f"started; its logs: {_session_logs()}"
        logging.getLogger(__name__).info("Ray: %s", where)
    if callable(on_term) and threading.current_thread() is threading.main_thread():
        # ray.init replaces the SIGTERM handler with sys.exit; keep the CLI's clean stop.
        signal.signal(signal.SIGTERM, on_term)


def _session_logs() -> str:
    """Where a local Ray instance writes its and its workers' logs (the newest session)."""
    return os.path.join(os.environ.get("RAY_TMPDIR", tempfile.gettempdir()), "ray",
                        "session_latest", "logs")


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


# Below this many candidates (all shards, from their footers), over a corpus one text shard
# holds, the shards are worked here, one after another, as one pool actor would: the pool's
# start (a worker importing Ray Data and posmine, then its actor: 10-18 s on 2 cores) takes
# longer than mining them (SciFact's 29k candidates: ~1 s).
LOCAL_CANDIDATES = 1 << 18


def over_shards(actor: type, kwargs: dict[str, Any], shards: list[dict[str, Any]], data_dir: str,
                dedup: str, desc: str, fold: Callable[[Iterable[dict[str, Any]]], T]) -> T:
    """`fold` of the result rows of `actor(**kwargs, store=<the corpus' texts>)` called on each
    candidate shard (`{"round", "url"}` rows): on a Ray Data actor pool in a Ray task, or here,
    shard after shard, under `LOCAL_CANDIDATES`. The caller sees what `fold` returns, never the
    rows. `fold` runs where the rows are: a module-level function (or a partial of one)."""
    if len(shards) > 1 and not few_candidates(data_dir, [s["url"] for s in shards], LOCAL_CANDIDATES):
        # The stream runs in a Ray task: its actor pool belongs to the task's worker and goes
        # with it, also when a shard fails (an error kept in the driver, in a notebook or a
        # test, would otherwise keep the pool's CPUs and the next stage would wait for them).
        ensure_ray()
        return in_task(_over_pool, actor, kwargs, shards, data_dir, dedup, desc, fold)
    store = TextStore(data_dir, dedup, in_process=True)  # little work: the texts read here
    return fold(actor(**kwargs, store=store)(shard_table(shards)).to_pylist())


def _over_pool(actor: type, kwargs: dict[str, Any], shards: list[dict[str, Any]], data_dir: str,
               dedup: str, desc: str, fold: Callable[[Iterable[dict[str, Any]]], T]) -> T:
    """`over_shards` on the pool, the texts in `TextShard` actors for as long as it runs."""
    store = TextStore(data_dir, dedup)
    try:
        return fold(map_shards(actor, {**kwargs, "store": store}, shards, desc))
    finally:
        store.close()


def map_shards(actor: type, kwargs: dict[str, Any], shards: list[dict[str, Any]],
               desc: str) -> Iterator[dict[str, Any]]:
    """`actor(**kwargs)` over the candidate shards (`{"round", "url"}` rows) on a Ray Data actor
    pool, one shard per call and as many actors as CPUs and shards allow; yields each call's
    result rows as they come (with a progress bar). Run it inside `in_task`: the pool belongs
    to the task's worker and goes with it, also when a shard fails."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ctx = DataContext.get_current()  # this task's own context
    ctx.execution_options.preserve_order = True
    ctx.raise_original_map_exception = True  # the shard's own error, naming it
    ds = ray.data.from_items(shards).map_batches(
        actor, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="pyarrow", num_cpus=1,
        compute=ActorPoolStrategy(min_size=1, max_size=max(1, min(len(shards), cpus))))
    with tqdm(total=len(shards), desc=desc, unit="shard") as bar:
        for row in ds.iter_rows():
            yield row
            bar.update(1)
