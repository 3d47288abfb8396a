"""What the CLI shows: posmine's own lines on the terminal, everything else in a log file.

Quiet by default: one line as each stage starts and ends, progress bars, and a short summary.
Ray's, Ray Data's and the libraries' INFO lines go to `<output.dir>/posmine.log` only, the Ray
workers' output stays in Ray's session logs, and transformers' expected notices (a pooler its
checkpoint does not carry, weights-loading bars) are silenced; `-v` brings them all back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posmine.io import background, storage
from posmine.io.redaction import RedactingFilter

QUIET_ENV = "POSMINE_QUIET"  # read by `remote.ensure_ray`, inherited by Ray's workers
LOG_NAME = "posmine.log"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet() -> bool:
    return os.environ.get(QUIET_ENV) == "1"


TRACE = "posmine.trace"  # whole tracebacks: always in the log file, on the terminal with -v


class _OwnOrWarning(logging.Filter):
    """Terminal lines: posmine's own INFO, and anyone's warnings and errors; no tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == TRACE:
            return False
        return record.name.startswith("posmine") or record.levelno >= logging.WARNING


def setup(verbose: bool) -> None:
    """The terminal's handler: every line with `-v`, else posmine's own lines, bare."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())  # no credentials in any line
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("botocore", "aiobotocore", "s3fs", "urllib3", "fsspec"):
        # Their DEBUG lines carry signed request headers (the access key id): never log them.
        logging.getLogger(noisy).setLevel(logging.INFO)
    if verbose:
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        os.environ.pop(QUIET_ENV, None)
        return
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_OwnOrWarning())
    os.environ[QUIET_ENV] = "1"
    # Read by transformers and huggingface_hub at import, here and in Ray's workers.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@contextlib.contextmanager
def session(verbose: bool) -> Iterator[None]:
    """`setup` for one CLI call; afterwards the loggers as they were and the call's log files
    closed, so that a program (or a test) that calls the CLI again gets no handler of the last
    call writing to a stream that has gone."""
    root = logging.getLogger()
    saved_root, saved_level, saved_quiet = root.handlers[:], root.level, os.environ.get(QUIET_ENV)
    saved_ray = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
                 for name in RAY_LOGGERS}
    opened = len(_FILES)
    setup(verbose)
    try:
        yield
    finally:
        for handler in _FILES[opened:]:
            handler.close()
        del _FILES[opened:]
        root.handlers = saved_root
        root.setLevel(saved_level)
        for name, (handlers, propagate) in saved_ray.items():
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = handlers, propagate
        if saved_quiet is None:
            os.environ.pop(QUIET_ENV, None)
        else:
            os.environ[QUIET_ENV] = saved_quiet


def log_to_file(out_dir: str) -> str:
    """Every log line, at INFO and up, also to `<out_dir>/posmine.log` (a local file under
    `$POSMINE_CACHE/logs` when `out_dir` is object storage); returns its path."""
    if storage.is_local(out_dir):
        path = Path(out_dir) / LOG_NAME
    else:
        cache = Path(os.environ.get("POSMINE_CACHE", Path.home() / ".cache" / "posmine"))
        path = cache / "logs" / f"posmine-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.addFilter(RedactingFilter())
    logging.getLogger().addHandler(handler)
    _FILES.append(handler)
    return str(path)


_FILES: list[logging.FileHandler] = []
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")  # each with its own stderr handler


def log_file() -> str | None:
    """The log file this process writes, once a verb has named it."""
    return _FILES[-1].baseFilename if _FILES else None


def quiet_ray() -> None:
    """Ray's driver-side loggers into the log file, not the terminal (Ray gives them their own
    stderr handler); Ray Data's progress bars off. Called once Ray is imported and started."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    for name in RAY_LOGGERS:
        lg = logging.getLogger(name)
        kept = [h for h in lg.handlers if not isinstance(h, logging.StreamHandler)
                or isinstance(h, logging.FileHandler)]
        lg.handlers = [*kept, *_FILES]
        lg.propagate = False


def _n(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)


def summary(stage: str, manifest: dict[str, Any]) -> str:
    """A few lines on what a stage's manifest holds; the manifest itself stays in its folder."""
    rows, stats = manifest.get("rows", {}), manifest.get("stats", {})
    where = storage.redact(str(manifest.get("dir") or manifest.get("model_dir") or ""))
    if stage == "mine":
        lines = [f"mined {_n(rows.get('examples', 0))} examples "
                 f"({_n(stats.get('negatives_kept', 0))} negatives) for "
                 f"{_n(stats.get('queries_out', 0))} queries"]
        if stats.get("examples_too_few"):
            lines.append(f"{_n(stats['examples_too_few'])} examples have fewer than "
                         f"mining.num_negatives negatives")
        lines.append(f"passed over as too close to the positive: {_n(stats.get('dropped_by_rule', 0))} "
                     "(once per candidate per example)")
    elif stage == "embed":
        lines = ["embedded " + ", ".join(f"{_n(v)} {k}" for k, v in rows.items())]
    elif stage == "train":
        curve = stats.get("loss_curve") or []
        loss = f", last loss {curve[-1][1]:.4f}" if curve and isinstance(curve[-1], list | tuple) else ""
        lines = [f"trained {_n(rows.get('steps', 0))} steps{loss}"]
        where = storage.redact(str(manifest.get("model_dir", where)))
    elif stage == "evaluate":
        metrics = manifest.get("metrics", {})
        lines = [f"scored on the {manifest.get('split', '?')} split"]
        lines += [f"{name:<12}{value:.4f}" for name, value in sorted(metrics.items())]
    else:
        lines = [f"{stage}: " + ", ".join(f"{k} {_n(v)}" for k, v in rows.items())]
    return "\n".join([*lines, f"in: {where}"] if where else lines)


class Progress:
    """A tqdm bar on a terminal; elsewhere (a log, a CI job) a line every `every` seconds."""

    def __init__(self, total: int, desc: str, unit: str, every: float = 30.0) -> None:
        from tqdm import tqdm

        self.desc, self.total, self.every, self.n = desc, total, every, 0
        self.bar = tqdm(total=total, desc=desc, unit=unit) if sys.stderr.isatty() else None
        self.last_line = time.monotonic()

    def update_to(self, n: int, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(n - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in postfix.items()})
        elif n != self.n and time.monotonic() - self.last_line >= self.every:
            self.last_line = time.monotonic()
            rest = "".join(f", {k} {v:.4f}" for k, v in postfix.items())
            logging.getLogger("posmine").info("%s: %d/%d%s", self.desc, n, self.total, rest)
        self.n = n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def watch(url: str, total: int, desc: str, unit: str, poll: float = 2.0,
          every: float = 30.0) -> Iterator[None]:
    """While the block runs, a `Progress` fed from the JSON file at `url` (`step`, `loss`), which
    a worker anywhere writes to the output folder."""
    storage.remove(url)  # an earlier attempt's
    bar = Progress(total, desc, unit, every)

    def poll_file() -> None:
        with contextlib.suppress(Exception):  # absent, or half-written by another node
            state = storage.read_json(url)
            bar.update_to(int(state["step"]), loss=float(state["loss"]))

    try:
        with background.repeating(poll_file, poll, "posmine-progress"):
            yield
    finally:
        bar.close()
