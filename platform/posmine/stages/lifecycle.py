"""The one stage pattern: a stage's output folder is finished when it holds `_manifest.json`,
written last, for the key of what the stage read. A folder without one is unfinished whatever else
it holds, so a crash halfway never looks done, and the same call redoes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from posmine.io import storage

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage ran but cannot honestly be called finished; no manifest was written."""


def is_done(stage_dir: str, config_hash: str) -> bool:
    """True when `stage_dir` holds a manifest written for the same config hash."""
    m = storage.read_manifest(stage_dir)
    return m is not None and m.get("config_hash") == config_hash


def begin_stage(stage_dir: str) -> None:
    """Mark `stage_dir` unfinished (drop its manifest) before writing into it."""
    storage.makedirs(stage_dir)
    storage.remove(storage.join(stage_dir, storage.MANIFEST))


@dataclass(frozen=True)
class Done:
    """What a stage's work reports for its manifest: row counts, stats, other fields, and the
    outputs (relative to the stage folder) that must exist before the manifest names them."""

    rows: Mapping[str, int]
    stats: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    outputs: Sequence[str | tuple[str, ...]] = ()


_ANNOUNCED: set[tuple[str, str]] = set()


def run_stage(stage_dir: str, stage: str, config_hash: str, work: Callable[[], Done],
              current_because: str = "its inputs and settings are unchanged") -> dict[str, Any]:
    """The one stage pattern: skip when `stage_dir`'s manifest was written for `config_hash`
    (saying so, and why, in one line); otherwise mark the folder unfinished, do `work`, check its
    outputs, write the manifest last.

    A crash inside `work` leaves no manifest, so the folder never looks finished and the same
    call redoes it.
    """
    manifest = storage.read_manifest(stage_dir)
    if manifest is not None and manifest.get("config_hash") == config_hash:
        # a pipeline asks for the same stage more than once: say it once per process
        level = logging.DEBUG if (stage_dir, config_hash) in _ANNOUNCED else logging.INFO
        _ANNOUNCED.add((stage_dir, config_hash))
        log.log(level, "%s: current (finished %s): %s", stage,
                manifest.get("finished_at", "earlier"), current_because)
        return manifest
    started = time.time()
    log.info("%s: running", stage)
    try:
        begin_stage(stage_dir)
        done = work()
    except OSError as e:
        if storage.unfixable(e):
            raise storage.StorageError(f"the {stage} stage stopped: {e}") from e
        raise
    manifest = commit_stage(stage_dir, stage, config_hash, rows=done.rows, started=started,
                            stats=done.stats, extra=done.extra, outputs=done.outputs)
    _ANNOUNCED.add((stage_dir, config_hash))
    log.info("%s: ran in %.1f s (%s)", stage, manifest["seconds"],
             ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in done.rows.items()))
    return manifest



def require_outputs(stage_dir: str, names: Sequence[str | tuple[str, ...]]) -> None:
    """Raise `StageError` unless every output named (relative to `stage_dir`) exists.

    A tuple names alternatives (`("model.safetensors", "model.safetensors.index.json")`).
    """
    missing = [" or ".join(alts) for alts in ((n,) if isinstance(n, str) else n for n in names)
               if not any(storage.exists(storage.join(stage_dir, a)) for a in alts)]
    if missing:
        raise StageError(f"{storage.redact(stage_dir)}: the stage finished but its output is missing "
                           f"({', '.join(missing)}); no manifest written")


def commit_stage(stage_dir: str, stage: str, config_hash: str, *,
                 rows: Mapping[str, int], started: float,
                 stats: Mapping[str, Any] | None = None,
                 extra: Mapping[str, Any] | None = None,
                 outputs: Sequence[str | tuple[str, ...]] = ()) -> dict[str, Any]:
    """Write the manifest last: from now on the stage counts as finished.

    `outputs` (paths relative to `stage_dir`) are checked first: a manifest never names
    output that is not there.
    """
    require_outputs(stage_dir, outputs)
    manifest = {
        "stage": stage,
        "config_hash": config_hash,
        "rows": dict(rows),
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stats": dict(stats or {}),
        **dict(extra or {}),
    }
    storage.write_json(storage.join(stage_dir, storage.MANIFEST), manifest)
    return manifest
