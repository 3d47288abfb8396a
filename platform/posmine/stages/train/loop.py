"""The one training loop. A plain process (`train_plain`, the reference and the benchmarks), each
Ray Train worker and each Tune trial call `fit`, and restore and save checkpoints the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from posmine.config import TrainConfig
from posmine.stages import faults
from posmine.stages.train.plan import Row, epoch_batches, total_steps
from posmine.stages.train.trainer import StudentTrainer

AfterStep = Callable[[StudentTrainer, list[float]], None]
EXTRA = "loop.json"  # in a checkpoint: what its caller saved beside the trainer's state


def fit(trainer: StudentTrainer, batches: Iterable[list[Row]], steps: int,
        after_step: AfterStep | None = None, rank: int = 0, world: int = 1) -> list[float]:
    """Train on the global `batches` until `trainer.step_no` reaches `steps`; a worker trains
    its slice `batch[rank::world]` of each. After each step the fault hook, then `after_step`
    (logging, checkpoints, dev scoring). Returns this call's losses."""
    losses: list[float] = []
    for batch in batches:
        if trainer.step_no >= steps:
            break
        losses.append(trainer.step(batch[rank::world], batch))
        faults.hook("train", "step", trainer.step_no)
        if after_step is not None:
            after_step(trainer, losses)
    return losses


def restore(trainer: StudentTrainer, checkpoint: Any) -> dict[str, Any]:
    """Load a Ray Train or Tune checkpoint (None: nothing) into `trainer`; returns what `save`
    put beside the state."""
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as d:
        trainer.load_state(d)
        extra = Path(d, EXTRA)
        return dict(json.loads(extra.read_text())) if extra.exists() else {}


def save(trainer: StudentTrainer, directory: str | None, extra: dict[str, Any] | None = None) -> None:
    """The trainer's state (None: a sharded worker that only joins the collective) and `extra`."""
    trainer.save_state(directory)
    if directory is not None and extra:
        Path(directory, EXTRA).write_text(json.dumps(extra))


def train_plain(cfg: TrainConfig, rows: list[Row], steps: int | None = None,
                device: str = "cpu") -> StudentTrainer:
    """`fit` without Ray: one process, rows shuffled per epoch with the seed."""
    steps = steps or total_steps(cfg, rows)
    trainer = StudentTrainer(cfg, steps, torch.device(device))
    fit(trainer, epoch_batches(rows, cfg), steps)
    return trainer


class StepTimer:
    """Samples per second over all steps but the first (which pays for warm-up)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.samples = 0

    def tick(self, samples: int) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        else:
            self.samples += samples
        self.end = time.perf_counter()

    def rate(self) -> float:
        if self.start is None or self.samples == 0:
            return 0.0
        return round(self.samples / (self.end - self.start), 3)
