"""Faults survived: object storage going away mid-stage (a real S3 server behind a loopback
proxy that drops), an embedding actor killed, the driver interrupted and rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from posmine import pipeline
from posmine.config import TeacherConfig, load_config
from posmine.io import storage
from posmine.io.vectors import read_embeddings
from posmine.models.encoder import Encoder
from posmine.stages import data, faults
from tests.conftest import CORPUS, TRAIN_QRELS_SHARED, ray_with_env
from tests.proxy import FlakyProxy

ROOT = Path(__file__).parents[1]


@pytest.fixture
def s3_via(s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch):
    """Make a proxy in front of the S3 server and point the S3 endpoint at it."""
    proxies: list[FlakyProxy] = []

    def make(trigger: bytes, down_for: float | None) -> FlakyProxy:
        proxy = FlakyProxy(int(s3_server.rsplit(":", 1)[1]), trigger, down_for)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        proxies.append(proxy)
        return proxy

    yield make
    for p in proxies:
        p.close()


def test_s3_outage_mid_stage_is_retried(s3_via, s3_bucket: str, tiny_beir: Path) -> None:
    proxy = s3_via(b"/data/qrels/", down_for=3.0)
    out = f"{s3_bucket}/outage"
    cfg = load_config(None, [f"data.path={tiny_beir}", f"output.dir={out}"])
    started = time.monotonic()
    manifest = data.run(cfg.data, out)
    assert proxy.triggered.is_set()  # the endpoint really went down halfway through ...
    assert time.monotonic() - started >= 3.0  # ... and the stage waited it out
    assert manifest["rows"]["corpus"] == 40
    assert storage.read_parquet(f"{out}/data/qrels/train.parquet").num_rows == TRAIN_QRELS_SHARED
    assert storage.read_manifest(f"{out}/data")["config_hash"] == manifest["config_hash"]


def test_s3_outage_too_long_fails_clearly_then_rerun_finishes(
        s3_via, s3_bucket: str, tiny_beir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = s3_via(b"/data/qrels/", down_for=None)
    monkeypatch.setenv("POSMINE_STORAGE_RETRIES", "1")
    monkeypatch.setenv("POSMINE_STORAGE_BACKOFF_S", "0.1")
    out = f"{s3_bucket}/down"
    cfg = load_config(None, [f"data.path={tiny_beir}", f"output.dir={out}"])
    with pytest.raises(storage.StorageError, match=r"qrels/.*storage unreachable after 2 attempts"):
        data.run(cfg.data, out)
    proxy.up()
    # what was written before the outage does not look finished ...
    assert storage.exists(f"{out}/data/corpus") and storage.read_manifest(f"{out}/data") is None
    # ... and the same call finishes the stage
    assert data.run(cfg.data, out)["rows"]["corpus"] == 40


def _embed_overrides(tiny_beir: Path, tiny_model: str, out: Path) -> list[str]:
    # 4 corpus parts of 10 rows; Ray Data bundles 2 blocks of 5 rows per task: one task per
    # part, two actor calls (8 + 2 rows) each, on 2 actors
    # (local_corpus_below=0: through Ray Data, whose actors these tests kill)
    return [f"data.path={tiny_beir}", "data.rows_per_part=10", f"teacher.model={tiny_model}",
            "teacher.local_corpus_below=0", "teacher.num_actors=2", "teacher.cpus_per_actor=0.5",
            "teacher.torch_threads=1",
            "teacher.batch_size=1", f"output.dir={out}"]


def _corpus_vectors(out: Path) -> dict[str, np.ndarray]:
    [emb] = list((out / "embed").iterdir())
    ids, mat = read_embeddings(str(emb / "corpus"))
    assert len(ids) == len(set(ids))  # every document exactly once
    return dict(zip(ids, mat, strict=True))


def _reference(tiny_model: str) -> dict[str, np.ndarray]:
    enc = Encoder(TeacherConfig(model=tiny_model))
    mat = enc.encode([f"{d['title']} {d['text']}" for d in CORPUS])
    return {d["_id"]: v for d, v in zip(CORPUS, mat, strict=True)}


@pytest.mark.e2e  # a Ray of its own, one of whose actors dies
def test_embed_actor_killed_mid_run(tiny_beir: Path, tiny_model: str, tmp_path: Path) -> None:
    marker = tmp_path / "embed.batch.fired"
    # the actors read these: pass them through the runtime env
    with ray_with_env({"POSMINE_FAULTS": "embed.batch=2:kill", "POSMINE_FAULT_DIR": str(tmp_path)}):
        cfg = load_config(None, _embed_overrides(tiny_beir, tiny_model, tmp_path / "out"))
        manifest = pipeline.embed(cfg)
    assert marker.exists()  # an actor process really died on its second batch
    assert manifest["rows"]["corpus"] == len(CORPUS)
    got, ref = _corpus_vectors(tmp_path / "out"), _reference(tiny_model)
    assert set(got) == set(ref)
    for d, v in ref.items():
        np.testing.assert_allclose(got[d], v, atol=1e-5)


# The CLI as started from a terminal. A shell without job control (a CI script, `cmd &`) starts
# its background children with SIGINT ignored, and Python then installs no Ctrl-C handler: the
# signal would be ignored, as Unix wants for background jobs (the cause of the hangs in earlier
# full-suite runs). Restore the handler a terminal's foreground process has.
_AS_FROM_A_TERMINAL = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                       "from posmine.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.e2e  # the CLI twice in a fresh process, signalled
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_embed_resumes_by_part(sig: signal.Signals, tiny_beir: Path, tiny_model: str,
                                           tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM at a known point (the driver stalls after writing one corpus part,
    says so in a file, and waits): exit 130, that part kept, no manifest; the rerun embeds the
    other parts only and equals an uninterrupted run."""
    with ray_with_env(None):  # the CLI starts its own local Ray, as a user's shell would
        out = tmp_path / "out"
        cmd = [sys.executable, "-c", _AS_FROM_A_TERMINAL, "embed", str(ROOT / "jobs/configs/scifact.yaml"),
               *_embed_overrides(tiny_beir, tiny_model, out)]
        stalled = tmp_path / "embed.part.stalled"
        env = {**os.environ, "POSMINE_FAULTS": "embed.part=1:stall", "POSMINE_FAULT_DIR": str(tmp_path)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        parts = out / "embed"
        deadline = time.monotonic() + 240
        while not stalled.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "embed ended before the stall"
            time.sleep(0.2)
        proc.send_signal(sig)
        log = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == 130, log[-2000:]
        assert "run the same command again to resume" in log
        finished = {p.name: p.stat().st_mtime_ns for p in parts.glob("*/corpus/part-*.parquet")}
        assert len(finished) == 1  # interrupted after exactly one of the four parts
        assert not list(parts.glob("*/_manifest.json"))  # nothing looks finished
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert "kept from an earlier run" in rerun.stderr
        after = {p.name: p.stat().st_mtime_ns for p in parts.glob("*/corpus/part-*.parquet")}
        assert len(after) == 4 and all(after[n] == t for n, t in finished.items())  # not redone
        got, ref = _corpus_vectors(out), _reference(tiny_model)
        assert set(got) == set(ref)  # equal to an uninterrupted run: each vector as the encoder's
        for d, v in ref.items():
            np.testing.assert_allclose(got[d], v, atol=1e-5)


@pytest.mark.e2e  # the CLI twice in a fresh process, signalled
@pytest.mark.parametrize("where", ["driver", "actors"])
def test_interrupted_embed_resumes_within_a_part(where: str, tiny_beir: Path, tiny_model: str,
                                                 tmp_path: Path) -> None:
    """A corpus of one part, interrupted after two pieces of 8 or more rows were saved: the
    rerun embeds only the rows the pieces lack, and equals an uninterrupted run."""
    with ray_with_env(None):  # the CLI starts its own local Ray, as a user's shell would
        out = tmp_path / "out"
        overrides = [*_embed_overrides(tiny_beir, tiny_model, out), "data.rows_per_part=100",
                     "teacher.piece_rows=8", "teacher.num_actors=1"]
        if where == "driver":
            overrides.append("teacher.local_corpus_below=1000")
        cmd = [sys.executable, "-c", _AS_FROM_A_TERMINAL, "embed", str(ROOT / "jobs/configs/scifact.yaml"),
               *overrides]
        env = {**os.environ, "POSMINE_FAULTS": "embed.piece=2:stall", "POSMINE_FAULT_DIR": str(tmp_path)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not (tmp_path / "embed.piece.stalled").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "embed ended before the stall"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        log = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == 130, log[-2000:]
        pieces = list(out.glob("embed/*/corpus/_pieces/part-00000.parquet/*.parquet"))
        saved = sum(len(storage.read_parquet(str(p))) for p in pieces)
        assert len(pieces) == 2 and 16 <= saved < len(CORPUS), (pieces, saved)
        assert not list(out.glob("embed/*/corpus/part-*.parquet"))  # the part is unfinished
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert "and 2 pieces of the others" in rerun.stderr
        todo = len(CORPUS) - saved
        assert f"{todo}/{todo}" in rerun.stderr  # only the rows the pieces lack were embedded
        assert not list(out.glob("embed/*/corpus/_pieces"))
        got, ref = _corpus_vectors(out), _reference(tiny_model)
        assert set(got) == set(ref)
        for d, v in ref.items():
            np.testing.assert_allclose(got[d], v, atol=1e-5)


# ---------------------------------------------------------------- the one fault hook

HOOK = ("from posmine.stages import faults\n"
        "for n in range(1, 6): faults.hook('train', 'step', n)\n"
        "print('survived')")


def _hook_process(spec: str, where: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSMINE_FAULTS": spec, "POSMINE_FAULT_DIR": str(where)}
    return subprocess.run([sys.executable, "-c", HOOK], env=env, capture_output=True, text=True,
                          timeout=60)


def test_a_kill_fault_kills_once_at_its_step(tmp_path: Path) -> None:
    first = _hook_process("train.step=3:kill", tmp_path)
    assert first.returncode == -signal.SIGKILL and "survived" not in first.stdout
    assert (tmp_path / "train.step.fired").exists()
    again = _hook_process("train.step=3:kill", tmp_path)  # a restart: the marker holds it back
    assert again.returncode == 0 and "survived" in again.stdout


def test_faults_of_other_points_and_steps_do_nothing(tmp_path: Path) -> None:
    ran = _hook_process("train.step=9:kill,embed.batch=1:kill,train.epoch=1:kill", tmp_path)
    assert ran.returncode == 0 and not list(tmp_path.iterdir())


def test_points_without_a_count_are_counted_over_processes(tmp_path: Path) -> None:
    """An embed batch has no number of its own: the second call, whichever process makes it."""
    code = ("from posmine.stages import faults; faults.hook('embed', 'batch'); print('survived')")
    env = {**os.environ, "POSMINE_FAULTS": "embed.batch=2:kill", "POSMINE_FAULT_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=60).returncode for _ in range(3)]
    assert runs == [0, -signal.SIGKILL, 0]


@pytest.mark.parametrize("spec", ["train.step=3", "train:kill", "train.step=x:kill",
                                  "train.step:explode", "train.step:delay", "train.step:kill=2"])
def test_a_malformed_fault_is_named(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSMINE_FAULTS", spec)
    with pytest.raises(ValueError, match="POSMINE_FAULTS: cannot read"):
        faults.hook("train", "step", 1)
