"""A 2-trial Ray Tune search with a tiny model on a real local Ray: table, best YAML, plot,
dev hold-out never trained on, a trial killed mid-run resumed, the experiment restored."""

import csv
import json
import os
from pathlib import Path

import pytest

from posmine import pipeline
from posmine.cli import main
from posmine.config import ConfigError, load_config
from posmine.io import prepared, storage
from posmine.stages import data, tune
from tests.conftest import QRELS, ray_with_env

SPACE = ("tune.space=[{rule: topk_percpos, perc: 0.95}, "
         "{rule: topk_marginpos, margin: {grid: [0.05]}, num_negatives: 2}]")


def _overrides(tiny_beir: Path, tiny_model: str, out: Path) -> list[str]:
    return [f"data.path={tiny_beir}", "data.dev_fraction=0.25", f"teacher.model={tiny_model}",
            "teacher.cpus_per_actor=0.5", "teacher.torch_threads=1", "index.num_shards=1",
            "mining.top_k=10", "mining.num_negatives=3", f"train.model={tiny_model}",
            "train.batch_size=4", "train.epochs=1", "train.lr=1e-3", "train.passage_max_length=32",
            "train.export_max_length=32", "evaluate.k_values=[1,10]", "evaluate.top_k=20",
            "tune.dev_pool=10", "tune.evals_per_trial=2", f"output.dir={out}", SPACE]


@pytest.mark.e2e  # a Tune search of two Ray Train trials, one crashing
def test_two_trial_search(ray_local: None, tiny_beir: Path, tiny_model: str, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # a relative output dir, as in the shipped configs: Tune runs trials in their own cwd
    monkeypatch.chdir(tmp_path)
    args = [*_overrides(tiny_beir, tiny_model, Path("out")), "train.track=mlflow"]
    crash_marker = tmp_path / "train.step.fired"
    # trial processes read these: pass them through the runtime env; step 1's checkpoint gets
    # 3 s to land before the kill at step 2
    with ray_with_env({"POSMINE_FAULTS": "train.step=1:delay=3,train.step=2:kill",
                       "POSMINE_FAULT_DIR": str(tmp_path)}):
        assert main(["tune", str(_yaml(tmp_path)), *args]) == 0
    printed = capsys.readouterr().out
    cfg = load_config(_yaml(tmp_path), args)
    target = tune.stage_dir(cfg)
    manifest = storage.read_manifest(target)
    assert manifest is not None and manifest["stage"] == "tune" and manifest["split"] == "dev"
    trials = manifest["trials"]
    assert sorted(t["rule"] for t in trials) == ["topk_marginpos", "topk_percpos"]
    assert {t["num_negatives"] for t in trials} == {2, 3}
    for t in trials:
        assert 0.0 <= t["ndcg@10"] <= 1.0 and t["error"] is None
        assert t["step"] == t["steps"] and not t["stopped_early"]  # 2 trials: ASHA keeps both
    # The injected kill hit the first trial at step 2; it resumed from its step-1 checkpoint.
    assert crash_marker.exists()
    assert sorted(t["resumed_from"] for t in trials) == [0, 1]
    # ... and its clock went on from the checkpoint: trial_seconds never goes back
    histories = [[json.loads(line) for line in f.read_text().splitlines()]
                 for f in Path(target).rglob("result.json")]
    resumed = [h for h in histories if h and h[-1]["resumed_from"] == 1]
    assert len(resumed) == 1 and len(resumed[0]) >= 2
    seconds = [r["trial_seconds"] for r in resumed[0]]
    assert seconds == sorted(seconds), seconds
    assert "untrained" in printed and "topk_percpos" in printed and "best.yaml" in printed
    # train.track=mlflow: Ray Tune's MLflow callback logged each trial's dev metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/out/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("posmine-tune").experiment_id])
    assert len(runs) == 2 and all("ndcg_at_10" in r.data.metrics for r in runs)
    with open(Path(target) / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["rule"] for r in rows] == [t["rule"] for t in trials]
    assert storage.read_parquet(f"{target}/results.parquet").num_rows == 2
    assert (Path(target) / "metric_vs_param.png").read_bytes()[:4] == b"\x89PNG"
    # best.yaml is a config `posmine run` takes, with the best trial's mining setting
    best = load_config(Path(target) / "best.yaml")
    assert best.mining.rule == trials[0]["rule"] and trials[0]["ndcg@10"] == max(
        t["ndcg@10"] for t in trials)
    assert best.data.holdout_dev is False and best.train.model == tiny_model
    # trials never trained on a dev query, and dev is taken from train (test is never read)
    data_dir = data.stage_dir(cfg.output.dir)
    dev = set(prepared.read_prepared_qrels(data_dir, "dev").column("query_id").to_pylist())
    assert dev and dev <= {q for q, _, _ in QRELS["train"]}
    for trial_dir in Path(target, "trials").iterdir():
        mined = storage.read_parquet(str(trial_dir / "mine" / "mined.parquet"))
        assert not dev & set(mined.column("query_id").to_pylist())
    # a finished search is skipped; without its manifest, Tune's experiment is restored
    # (finished trials are not run again: same per-trial seconds)
    assert pipeline.tune(cfg)["finished_at"] == manifest["finished_at"]
    os.remove(Path(target) / "_manifest.json")
    again = pipeline.tune(cfg)
    assert [t["seconds"] for t in again["trials"]] == [t["seconds"] for t in trials]


def _yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tune.yaml"
    path.write_text("tune:\n  scheduler: asha\n  max_concurrent_trials: 1\n")
    return path


def test_param_space_and_eval_points() -> None:
    cfg = load_config(None, ["tune.space=[{rule: topk_percpos, perc: {uniform: [0.9, 1.0]}}, "
                             "{rule: topk_abs, threshold: {grid: [0.6, 0.7]}, "
                             "num_negatives: {randint: [1, 8]}}]"])
    space = tune.param_space(cfg.tune)
    arms = space["mining"]["grid_search"]
    assert arms[0]["rule"] == "topk_percpos" and arms[0]["perc"].lower == 0.9
    assert arms[1]["threshold"] == {"grid_search": [0.6, 0.7]}
    assert arms[1]["num_negatives"].upper == 9  # YAML randint bounds are inclusive
    assert tune.eval_points(10, 2) == [5, 10] and tune.eval_points(3, 5) == [1, 2, 3]
    assert tune.eval_points(1, 3) == [1]
    m = tune.trial_mining(cfg.mining, {"rule": "topk_abs", "threshold": 0.65})
    assert m.rule == "topk_abs" and m.threshold == 0.65 and m.perc == cfg.mining.perc


@pytest.mark.parametrize("override, message", [
    ("tune.space=[{rule: nope}]", "tune.space[0].rule='nope' is not allowed"),
    ("tune.space=[{perc: {grid: [3.0]}}]", "tune.space[0].perc: mining.perc must be in"),
    ("tune.space=[{percent: 0.9}]", "tune.space[0].percent: not a mining key"),
    ("tune.space=[{perc: {between: [0, 1]}}]", "a domain is one of"),
    ("tune.space=[{perc: {uniform: [1.0, 0.9]}}]", "expected [low, high]"),
    ("tune.space=[]", "tune.space is empty"),
    ("tune.metric=ndcg", "expected ndcg@k"),
])
def test_bad_space(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_extra_teachers_are_refused_before_any_work(tmp_path: Path) -> None:
    cfg = load_config("jobs/configs/scifact-tune.yaml",
                      [f"output.dir={tmp_path}", "extra_teachers=[{model: /models/other}]"])
    with pytest.raises(ConfigError, match="extra_teachers is not supported by tune"):
        pipeline.tune(cfg)
    assert not any(tmp_path.iterdir())  # nothing written, nothing that looks started


def test_a_crashed_trial_is_an_error_not_an_early_stop(tmp_path: Path) -> None:
    """Tune's own Result of a trial that died at step 1 of 4, and of one ASHA stopped there."""
    from ray.tune import Result

    cfg = load_config(None, [f"output.dir={tmp_path}"])
    metrics = {"step": 1, "steps": 4, "ndcg@10": 0.3, "trial_id": "t1",
               "config": {"mining": {"rule": "naive_topk"}}}  # where Tune keeps a trial's config
    crashed = tune._row(Result(metrics=metrics, checkpoint=None, error=RuntimeError("worker died"),
                               path=str(tmp_path)), cfg)
    stopped = tune._row(Result(metrics=metrics, checkpoint=None, error=None, path=str(tmp_path)), cfg)
    assert crashed["error"] == "worker died" and not crashed["stopped_early"]
    assert stopped["error"] is None and stopped["stopped_early"]
