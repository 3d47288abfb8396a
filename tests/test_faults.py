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

from posmine import data, pipeline, storage
from posmine.config import TeacherConfig, load_config
from posmine.embed import Encoder, read_embeddings
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
    manifest = data.prepare(cfg.data, out)
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
        data.prepare(cfg.data, out)
    proxy.up()
    # what was written before the outage does not look finished ...
    assert storage.exists(f"{out}/data/corpus") and storage.read_manifest(f"{out}/data") is None
    # ... and the same call finishes the stage
    assert data.prepare(cfg.data, out)["rows"]["corpus"] == 40


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
    marker = tmp_path / "killed"
    # the actors read the marker path: pass it through the runtime env
    with ray_with_env({"POSMINE_EMBED_CRASH_MARKER": str(marker)}):
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
        stalled = tmp_path / "stalled"
        env = {**os.environ, "POSMINE_STALL_AFTER_PARTS": "1", "POSMINE_STALL_FILE": str(stalled)}
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
