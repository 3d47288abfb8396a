"""Training: the step learns, Ray Train runs and exports a model that transformers and
sentence-transformers load, and a killed worker resumes from its checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from posmine import pipeline, report
from posmine.config import TeacherConfig, TrainConfig, load_config
from posmine.io import storage
from posmine.models.encoder import Encoder
from posmine.stages.train.loop import train_plain
from posmine.stages.train.plan import expand
from posmine.stages.train.trainer import StudentTrainer
from tests.conftest import TRAIN_QRELS_SHARED, ray_with_env

WORDS6 = ("virus", "cancer", "mouse", "human", "sleep", "diet")
ROWS = expand({"query_id": list(WORDS6), "query": [f"cell protein {w}" for w in WORDS6],
               "positives": [[f"{w} gene study"] for w in WORDS6],
               "positive_scores": [[0.9]] * 6,
               "negatives": [["brain heart", "drug trial dose", "liver kidney"]] * 6,
               "negative_scores": [[0.5, 0.4, 0.3]] * 6})


def test_expand_one_row_per_positive() -> None:
    mined = {"query_id": ["q"], "query": ["x"], "positives": [["p1", "p2"]],
             "positive_scores": [[0.9, 0.8]], "negatives": [["n1"]], "negative_scores": [[0.1]]}
    rows = expand(mined)
    assert [r["positive"] for r in rows] == ["p1", "p2"]
    assert rows[1]["scores"] == pytest.approx([0.8, 0.1])


@pytest.mark.parametrize("in_batch, distill", [(True, 0.0), (False, 0.0), (False, 0.5)])
def test_steps_reduce_the_loss(tiny_model: str, in_batch: bool, distill: float) -> None:
    cfg = TrainConfig(model=tiny_model, lr=1e-3, warmup_ratio=0.0, batch_size=6, num_negatives=3,
                      in_batch_negatives=in_batch, distill_weight=distill)
    before, after = _loss_before_after(cfg, steps=15)
    assert after < before * 0.85


def test_in_batch_negatives_only(tiny_model: str) -> None:
    """num_negatives=0: the ablation's "no hard negatives" row trains on in-batch negatives."""
    cfg = TrainConfig(model=tiny_model, lr=1e-3, warmup_ratio=0.0, batch_size=6, num_negatives=0)
    before, after = _loss_before_after(cfg, steps=10)
    assert after < before


def _loss_before_after(cfg: TrainConfig, steps: int) -> tuple[float, float]:
    """The loss on ROWS before and after `steps` steps on ROWS."""
    trainer = StudentTrainer(cfg, 2 * steps, torch.device("cpu"))
    with torch.no_grad():
        before = float(trainer.loss(ROWS))
    for _ in range(steps):
        trainer.step(ROWS)
    with torch.no_grad():
        return before, float(trainer.loss(ROWS))


def test_rows_with_fewer_negatives(tiny_model: str) -> None:
    rows = [dict(ROWS[0], negatives=["brain heart"]), ROWS[1]]
    trainer = train_plain(TrainConfig(model=tiny_model, batch_size=2, num_negatives=3), rows)
    assert trainer.step_no == 1


def _overrides(tiny_beir: Path, tiny_model: str, out: str, *extra: str) -> list[str]:
    return [
        f"data.path={tiny_beir}", f"teacher.model={tiny_model}", "teacher.cpus_per_actor=0.5",
        "teacher.torch_threads=1", "mining.top_k=10", "mining.num_negatives=3",
        "mining.rule=naive_topk", f"train.model={tiny_model}", "train.batch_size=2",
        "train.num_negatives=3", "train.checkpoint_every=2", "train.log_every=1",
        "train.lr=1e-4", "train.epochs=1", "train.cpus_per_worker=0.5",
        "evaluate.k_values=[10]", "evaluate.top_k=20", f"output.dir={out}", *extra]


def _cfg(tiny_beir: Path, tiny_model: str, out: str, *extra: str):
    return load_config(None, _overrides(tiny_beir, tiny_model, out, *extra))


def test_ray_train_exports_a_loadable_model(ray_local: None, tiny_beir: Path, tiny_model: str,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A short `posmine run` through the CLI (on the session's Ray): data, embed, search, mine,
    Ray Train, evaluation of base and fine-tuned, the table on stdout."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from posmine.cli import main

    out = str(tmp_path / "out")
    args = _overrides(tiny_beir, tiny_model, out, "train.track=mlflow", "mining.rule=topk_percpos",
                      "mining.perc=auto")
    assert main(["run", "jobs/configs/scifact.yaml", *args]) == 0
    summary = storage.read_json(f"{out}/summary.json")
    printed = capsys.readouterr().out
    assert f"model: {summary['model_dir']}" in printed and "fine-tuned" in printed
    manifest = storage.read_manifest(f"{out}/train")
    # 13 (query, positive) examples of 8 queries; positives=sample trains 8 a epoch: 4 batches of 2
    assert manifest is not None and manifest["rows"]["examples"] == TRAIN_QRELS_SHARED
    assert manifest["rows"]["steps"] == manifest["rows"]["steps_planned"] == 4
    model_dir = summary["model_dir"]
    AutoModel.from_pretrained(model_dir)
    st = SentenceTransformer(model_dir, device="cpu")
    ours = Encoder(TeacherConfig(model=model_dir)).encode(["cell protein gene", "brain"])
    np.testing.assert_allclose(st.encode(["cell protein gene", "brain"]), ours, atol=1e-5)
    base = Encoder(TeacherConfig(model=tiny_model)).encode(["cell protein gene"])
    assert not np.allclose(base, ours[:1])  # the weights moved
    assert set(summary["base"]) == set(summary["fine_tuned"]) == {"ndcg@10", "recall@10", "map@10",
                                                                   "mrr@10"}
    assert "ndcg@10" in pipeline.format_table(summary)
    assert pipeline.format_table(summary).startswith("scored on the test split\n")
    # train.track=mlflow: a run in the SQLite store under the output, with the loss at each step
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("posmine").experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, round(m.value, 5)) for m in history] == [
        (s, round(v, 5)) for s, v in manifest["stats"]["loss_curve"]]
    assert run.data.params["lr"] == "0.0001" and run.info.status == "FINISHED"
    # the model card: the base, the rule, the steps, the evaluation table, the config
    card = (Path(model_dir) / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n") and "posmine" in card
    mined = storage.read_manifest(f"{out}/mine")
    picked = mined["mining"]["perc"]  # perc=auto: picked once, said in the manifest, card and report
    assert mined["auto"]["picked"] == picked in pipeline.AUTO_VALUES["perc"]
    assert f"Rule `topk_percpos (perc={picked})`, anchored per `pair`" in card
    assert "4 steps of batch 2" in card
    assert f"mining.perc=auto picked {picked}: {mined['auto']['why']}." in card
    assert f"mining.perc=auto picked {picked}: " in report.run_page(out)
    assert f"| ndcg@10 | {summary['base']['ndcg@10']:.4f} | {summary['fine_tuned']['ndcg@10']:.4f} |" in card
    assert "posmine run config.yaml" in card and "rule: topk_percpos" in card
    # The same command again, in a fresh process: every stage current, answered from the
    # manifests without starting Ray, the same table printed.
    rerun = subprocess.run([sys.executable, "-c", NO_RAY_AFTER, "run", "jobs/configs/scifact.yaml", *args],
                           capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout == printed
    for stage in ("data", "embed", "search", "mine", "train", "evaluate"):
        assert f"{stage}: current" in rerun.stderr, (stage, rerun.stderr[-3000:])


# The CLI, then a check that it never started Ray (exit 3 if it did).
NO_RAY_AFTER = ("import sys, ray; from posmine.cli import main; code = main(sys.argv[1:]); "
                "sys.exit(3 if ray.is_initialized() else code)")


@pytest.mark.e2e  # two Ray Train runs on a Ray of its own
def test_killed_worker_resumes_from_checkpoint(ray_local: None, tiny_beir: Path, tiny_model: str,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "out")
    cfg = _cfg(tiny_beir, tiny_model, out)
    pipeline.mine(cfg)
    # the worker process reads these: pass them through the job's runtime env. The hook runs
    # after a step's update, before its report; Ray Train registers a reported checkpoint
    # asynchronously: step 2's gets step 3 and 3 s more to land before the kill at step 4.
    with ray_with_env({"POSMINE_FAULTS": "train.step=3:delay=3,train.step=4:kill",
                       "POSMINE_FAULT_DIR": str(tmp_path)}):
        manifest = pipeline.train(cfg)
    assert (tmp_path / "train.step.fired").exists()  # the worker really died at step 4
    assert manifest["stats"]["resumed_from_step"] == 2  # ... and restarted from the step-2 checkpoint
    assert manifest["rows"]["steps"] == 4
    assert (Path(out) / "train" / "model" / "model.safetensors").exists()


@pytest.mark.e2e  # a Ray Train run on a full disk, and the rerun with room
@pytest.mark.disk_kib(8192)
def test_a_full_disk_stops_training_at_once_with_the_path(
        ray_local: None, small_disk: Path, tiny_beir: Path, tiny_model: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The first checkpoint fills the disk: one line naming the stage and the error, no retry
    (Ray Train would retry a worker's error `max_failures` times), no manifest, no unfinished
    checkpoint; with room again the same command trains."""
    max_failures = 5
    from posmine.cli import main

    args = ["train", "jobs/configs/scifact.yaml",
            *_overrides(tiny_beir, tiny_model, str(small_disk / "out"), "train.checkpoint_every=1",
                        f"train.max_failures={max_failures}")]
    assert main(["mine", *args[1:]]) == 0
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * max(0, free - 64 * 1024))  # 64 KiB left: less than a checkpoint
    capsys.readouterr()
    # every worker that starts training is counted (a kill at a start that never comes); a
    # restart after the error stops at the error Ray's key-value store holds, before that
    with ray_with_env({"POSMINE_FAULTS": "train.start=1000:kill", "POSMINE_FAULT_DIR": str(tmp_path)}):
        code = main(args)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("posmine: error: ")]
        assert code == 1 and len(lines) == 1, err[-3000:]
        assert "the train stage stopped: " in lines[0] and "No space left on device" in lines[0]
        assert f"{small_disk}/out/train/ray" in lines[0], lines[0]  # where it was writing
        # No retry on the error: retried, it would start 1 + max_failures times. On a loaded
        # machine Ray Train may restart a worker group once for its own reasons, before the error.
        starts = len((tmp_path / "train.start.calls").read_text())
        assert 1 <= starts <= 2 < 1 + max_failures, starts
        train = small_disk / "out" / "train"
        assert not (train / storage.MANIFEST).exists()
        assert not [p for p in train.rglob("*.safetensors") if p.stat().st_size == 0]
        assert not [p for p in train.rglob("*") if ".tmp-" in p.name]
        filler.unlink()
        assert main(args) == 0
    assert storage.read_manifest(str(train))["rows"]["steps"] > 0


@pytest.mark.e2e  # a Ray of its own and a start timeout
def test_workers_that_cannot_start_fail_the_stage(ray_local: None, tiny_beir: Path,
                                                  tiny_model: str, tmp_path: Path) -> None:
    """A GPU worker on a cluster without GPUs: the stage fails after `startup_retries` tries
    (Ray Train's own default is to wait forever) and leaves no finished-looking output."""
    out = str(tmp_path / "out")
    cfg = _cfg(tiny_beir, tiny_model, out, "train.use_gpu=always", "train.startup_retries=0")
    pipeline.mine(cfg)
    # the controller reads the start timeout from its environment
    with ray_with_env({"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"}), \
            pytest.raises(Exception, match=r"(?i)start"):
        pipeline.train(cfg)
    assert storage.read_manifest(f"{out}/train") is None


@pytest.mark.e2e  # two stages: two minings, two Ray Train runs
def test_two_stages_remine_with_the_student(ray_local: None, tiny_beir: Path, tiny_model: str,
                                            tmp_path: Path) -> None:
    """The paper's recipe: stage 2 turns in-batch negatives off and mines with the student
    (alone: the extra teacher joins the configured teacher only)."""
    out = str(tmp_path / "out")
    cfg = _cfg(tiny_beir, tiny_model, out, "train.max_steps=2", "extra_teachers=[{pooling: cls}]",
               "stages=[{}, {train: {in_batch_negatives: false}, remine_with_student: true}]")
    last = pipeline.train(cfg)
    m0, m1 = storage.read_manifest(f"{out}/train-0"), storage.read_manifest(f"{out}/train-1")
    assert m0 is not None and m1 is not None and last["model_dir"] == m1["model_dir"]
    assert m1["train"]["model"] == m0["model_dir"]  # stage 2 trains stage 1's student
    assert m1["train"]["in_batch_negatives"] is False
    s0 = storage.read_parquet(f"{out}/mine-0/mined.parquet").column("positive_scores").to_pylist()
    s1 = storage.read_parquet(f"{out}/mine-1/mined.parquet").column("positive_scores").to_pylist()
    assert not np.allclose(np.concatenate(s0), np.concatenate(s1))  # scored by the student
    assert storage.read_manifest(f"{out}/mine-0")["combine"] == "intra_sample"
    assert storage.read_manifest(f"{out}/mine-0-t1") is not None
    assert storage.read_manifest(f"{out}/mine-1-t0") is None  # stage 2: the student alone
    assert len(storage.listdir(f"{out}/embed")) == 3  # teacher (mean), teacher (cls), student


# two Ray Train runs (~90 s): out of the default run, whose numerics tests/test_gather.py checks
@pytest.mark.slow
def test_two_ray_train_workers_gather_negatives_with_grad_cache(ray_local: None, tiny_beir: Path,
                                                                tiny_model: str, tmp_path: Path) -> None:
    """Through Ray Train: 2 DDP (gloo) workers, each half of the global batch, passages
    gathered across them, GradCache chunks of 2; the run trains every planned step and counts
    the masked pairs of the whole batch once (the numerics are tests/test_gather.py's)."""
    out = str(tmp_path / "out")
    cfg = _cfg(tiny_beir, tiny_model, out, "train.num_workers=2", "train.cpus_per_worker=0.5",
               "train.torch_threads=1", "train.gather_across_workers=true",
               "train.grad_cache_chunk=2")
    pipeline.mine(cfg)
    manifest = pipeline.train(cfg)
    assert manifest["rows"]["steps"] == manifest["rows"]["steps_planned"] >= 2
    assert (Path(out) / "train" / "model" / "model.safetensors").exists()
    single = pipeline.train(_cfg(tiny_beir, tiny_model, str(tmp_path / "one"),
                                 "train.num_workers=1", "train.batch_size=4"))
    # the global batch of 2 x 2 masks what one worker with batch 4 masks
    assert manifest["stats"]["masked_in_batch_pairs"] == single["stats"]["masked_in_batch_pairs"]
