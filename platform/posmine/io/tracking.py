"""Tracked runs (`train.track`): the train stage's loss and lr, and its config, sent from Ray
Train's rank-0 worker to TensorBoard or MLflow through their own writers; `posmine tune` hands
Ray Tune the matching logger callbacks.

- `tensorboard`: event files in `<train dir>/tensorboard` (`SummaryWriter`; `tensorboard
  --logdir <output.dir>` shows every stage).
- `mlflow`: a run in experiment `posmine` at `$MLFLOW_TRACKING_URI`, else in MLflow's SQLite
  store `<output.dir>/mlflow.db` (`mlflow ui --backend-store-uri sqlite:///<output.dir>/mlflow.db`;
  MLflow 3 refuses its older plain-folder store). A worker restarted from a checkpoint
  continues the same run (found by the stage's key).

For an object-store output both write locally and copy to the output when the stage ends
(TensorBoard file by file, so earlier event files stay; the SQLite file fetched first).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from posmine.config import ConfigError
from posmine.io import storage

EXPERIMENT = "posmine"
log = logging.getLogger(__name__)


class Tracker:
    """No tracking (`track: none`); the interface of the others."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Scalars at `step`."""

    def close(self) -> None:
        """Flush and copy to the output."""


class _Local(Tracker):
    """A tracker writing under a local folder, copied to `url` at close when `url` is remote."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.tmp = None if storage.is_local(url) else tempfile.mkdtemp(prefix="posmine-track-")
        self.dir = self.tmp or storage.filesystem(url)[1]
        os.makedirs(self.dir, exist_ok=True)

    def close(self) -> None:
        if self.tmp is None:
            return
        for f in Path(self.tmp).rglob("*"):
            if f.is_file():
                storage.write_bytes(storage.join(self.url, str(f.relative_to(self.tmp))), f.read_bytes())


class TensorBoardTracker(_Local):
    def __init__(self, url: str, config: dict[str, Any]) -> None:
        super().__init__(url)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=self.dir)
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=2, default=str)}\n```")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        self.writer.close()
        super().close()


class MlflowTracker(Tracker):
    """A run in MLflow: at `$MLFLOW_TRACKING_URI`, else in the SQLite store `db_url` (MLflow's
    own local backend; its plain-folder store is deprecated and refused by MLflow 3)."""

    def __init__(self, db_url: str, config: dict[str, Any], key: str, run_name: str) -> None:
        from mlflow.tracking import MlflowClient

        self.db_url, self.tmp = db_url, None
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            if storage.is_local(db_url):
                path = storage.filesystem(db_url)[1]
                os.makedirs(os.path.dirname(path), exist_ok=True)
            else:  # the store travels as one file: fetched, written here, put back at close
                self.tmp = tempfile.mkdtemp(prefix="posmine-mlflow-")
                path = os.path.join(self.tmp, "mlflow.db")
                if storage.exists(db_url):
                    Path(path).write_bytes(storage.read_bytes(db_url))
            uri = f"sqlite:///{path}"
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(EXPERIMENT)
        # the same stage restarted (a worker failure) continues its run
        found = self.client.search_runs([exp_id], filter_string=f"tags.posmine_key = '{key}'")
        if found:
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name,
                                                 tags={"posmine_key": key}).info.run_id
            for name, value in flat(config).items():
                self.client.log_param(self.run_id, name, str(value)[:500])  # MLflow's limit

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(1000 * time.time())
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                    for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
        if self.tmp is not None:
            storage.write_bytes(self.db_url, Path(self.tmp, "mlflow.db").read_bytes())


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow params are flat."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def require(track: str) -> None:
    """Fail at once, naming the setting, when `track`'s package is not installed."""
    if track == "none":
        return
    try:
        __import__(track)
    except ImportError as e:
        raise ConfigError(f"train.track={track} needs the {track} package: "
                          "pip install 'posmine[track]'") from e


def open_tracker(track: str, train_dir: str, out_dir: str, config: dict[str, Any], key: str) -> Tracker:
    """The tracker `track` names, for the train stage at `train_dir` of the run at `out_dir`."""
    require(track)
    if track == "tensorboard":
        return TensorBoardTracker(storage.join(train_dir, "tensorboard"), config)
    if track == "mlflow":
        return MlflowTracker(storage.join(out_dir, "mlflow.db"), config, key,
                             run_name=train_dir.rstrip("/").rsplit("/", 1)[-1])
    return Tracker()


def tune_callbacks(track: str, out_dir: str) -> list[Any]:
    """Ray Tune's own logger callbacks for `track` (each trial's metrics and config)."""
    if track == "tensorboard":
        from ray.tune.logger import TBXLoggerCallback

        return [TBXLoggerCallback()]  # event files in each trial's folder
    if track == "mlflow":
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            if not storage.is_local(out_dir):
                log.warning("train.track=mlflow: Ray Tune's MLflow callback needs a local output "
                            "or MLFLOW_TRACKING_URI; the tune trials are not tracked")
                return []
            uri = f"sqlite:///{storage.filesystem(storage.join(out_dir, 'mlflow.db'))[1]}"
        class Callback(MLflowLoggerCallback):
            """MLflow refuses '@' in metric names: ndcg@10 is logged as ndcg_at_10."""

            def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
                super().log_trial_result(iteration, trial, {mlflow_name(k): v for k, v in result.items()})

        return [Callback(tracking_uri=uri, experiment_name=f"{EXPERIMENT}-tune", save_artifact=False)]
    return []


def mlflow_name(metric: str) -> str:
    """A metric name MLflow accepts (letters, digits, `_-. /:`): `ndcg@10` -> `ndcg_at_10`."""
    return metric.replace("@", "_at_")
