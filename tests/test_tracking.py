"""train.track to an object-store output: TensorBoard events and the MLflow SQLite store are
written locally and land on the (loopback) S3 server when the stage ends; a second run adds
to them rather than replacing them."""

from __future__ import annotations

from pathlib import Path

from posmine.io import storage, tracking


def test_tensorboard_and_mlflow_reach_object_storage(s3_bucket: str, tmp_path: Path,
                                                     monkeypatch) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = f"{s3_bucket}/runs/a"
    for i, key in enumerate(("k1", "k2")):  # two train stages of one run
        for track in ("tensorboard", "mlflow"):
            t = tracking.open_tracker(track, f"{out}/train-{i}", out, {"train": {"lr": 0.1}}, key)
            t.log(1, {"loss": 2.0 + i})
            t.log(2, {"loss": 1.0 + i})
            t.close()
    fs, root = storage.filesystem(out)
    for i in range(2):
        events = fs.find(f"{root}/train-{i}/tensorboard")
        assert len(events) == 1
        local = tmp_path / f"tb{i}"
        storage.get_tree(f"{out}/train-{i}/tensorboard", str(local))
        acc = EventAccumulator(str(local))
        acc.Reload()
        assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.0 + i), (2, 1.0 + i)]
    db = tmp_path / "mlflow.db"
    db.write_bytes(storage.read_bytes(f"{out}/mlflow.db"))
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("posmine").experiment_id])
    assert sorted(r.data.tags["posmine_key"] for r in runs) == ["k1", "k2"]  # the second kept the first
    assert all(r.data.params["train.lr"] == "0.1" for r in runs)
