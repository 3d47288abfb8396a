"""One writer per output folder: a lease file, `<output.dir>/_lease.json`, taken before the
first stage and given back after the last, on local disk and on object storage alike.

It names its holder (a random id, the host, the pid, when it started) and a heartbeat that a
thread renews every `HEARTBEAT_S`. A second run on the same folder is refused at once with a
message naming the holder, rather than made to wait: two runs on one folder are almost always
a mistake (a command started twice), and a refusal says so while the user is still watching,
where a wait would look like a hang for as long as the first run lasts. A lease whose holder is
gone is taken over: on the same host when its pid no longer runs, elsewhere when its heartbeat
is older than `STALE_S`.

Local disk takes the lease with an exclusive create, which the kernel makes atomic. Object
stores have no exclusive create that every S3-compatible server honours, so the lease is
written, then read back after `SETTLE_S`: with the strong read-after-write consistency of
today's S3 (and MinIO, and moto), of two runs racing for the lease both read the same last
writer, and only that one goes on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from posmine.io import background, storage

LEASE = "_lease.json"
HEARTBEAT_S = float(os.environ.get("POSMINE_LEASE_HEARTBEAT_S", "10"))
STALE_S = float(os.environ.get("POSMINE_LEASE_STALE_S", "60"))
SETTLE_S = float(os.environ.get("POSMINE_LEASE_SETTLE_S", "1"))
log = logging.getLogger(__name__)


class InUseError(storage.StorageError):
    """The output folder is held by another live run; the message names it."""


def _record(holder: str, started: float) -> dict[str, Any]:
    return {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(),
            "started": started, "heartbeat": time.time()}


def _alive(lease: dict[str, Any]) -> bool:
    """Whether the lease's holder may still be running."""
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            pass  # another user's live process, or a record we cannot read: trust the heartbeat
        else:
            return True
    return time.time() - float(lease.get("heartbeat", 0)) < STALE_S


def _describe(url: str, lease: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0))))
    beat = time.time() - float(lease.get("heartbeat", 0))
    return (f"{storage.redact(url)} is in use by pid {lease.get('pid')} on {lease.get('host')} "
            f"since {since} (last heartbeat {beat:.0f} s ago); wait for that run to finish or "
            "stop it, or choose another output.dir")


def _read(url: str) -> dict[str, Any] | None:
    try:
        return dict(storage.read_json(url))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        return {}  # a torn or foreign file: treated as a dead holder's


def _create_local(url: str, record: dict[str, Any]) -> bool:
    """Create the lease file only if none exists (atomic on a local filesystem)."""
    os.makedirs(os.path.dirname(url), exist_ok=True)
    try:
        fd = os.open(url, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    return True


def _acquire(out_dir: str, holder: str, started: float) -> None:
    url = storage.join(out_dir, LEASE)
    local = storage.is_local(url)
    path = url.removeprefix("file://")
    for _ in range(3):  # a stale lease removed, or a race lost to another taker: look again
        current = _read(url)
        if current is not None and current.get("holder") != holder:
            if _alive(current):
                raise InUseError(_describe(out_dir, current))
            log.warning("taking over %s: its holder (pid %s on %s) is gone",
                        storage.redact(url), current.get("pid"), current.get("host"))
            storage.remove(url)
        if local:
            if _create_local(path, _record(holder, started)):
                return
            continue
        storage.write_json(url, _record(holder, started))
        time.sleep(SETTLE_S)
        if (_read(url) or {}).get("holder") == holder:
            return
    current = _read(url) or {}
    raise InUseError(_describe(out_dir, current))


@contextmanager
def hold(out_dir: str) -> Iterator[None]:
    """Hold `out_dir` for one run: refuse if a live run holds it, renew the heartbeat while
    the body runs, give the lease back afterwards, whatever happened."""
    holder, started = uuid.uuid4().hex, time.time()
    url = storage.join(out_dir, LEASE)
    _acquire(out_dir, holder, started)

    def beat() -> None:
        try:
            if (_read(url) or {}).get("holder") == holder:
                storage.write_json(url, _record(holder, started))
        except OSError as e:  # a missed beat is not worth failing the run for
            log.debug("lease heartbeat: %s", e)

    try:
        with background.repeating(beat, HEARTBEAT_S, "posmine-lease"):
            yield
    finally:
        if (_read(url) or {}).get("holder") == holder:
            storage.remove(url)
