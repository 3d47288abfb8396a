"""`ray job submit` path: a real Ray head on loopback with its job server; a job submitted
through the Jobs API (as `ray job submit --working-dir .` does) mines and evaluates a tiny
dataset with a tiny model, joining the cluster through RAY_ADDRESS."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from posmine.io import storage

pytestmark = pytest.mark.e2e  # a Ray head started by the test, and `ray job submit`

ROOT = Path(__file__).parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ray_head(tmp_path: Path):
    gcs, dash = _port(), _port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_bin = Path(sys.executable).parent / "ray"
    # a short temp dir: Ray's Unix socket paths under it must stay below ~107 characters
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    head_log = open(tmp_path / "ray-head.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         "--num-cpus=2", f"--temp-dir={temp}",
         # free ports, not the defaults: another Ray on this machine may hold those
         f"--dashboard-agent-listen-port={_port()}", f"--dashboard-agent-grpc-port={_port()}",
         f"--runtime-env-agent-port={_port()}", f"--metrics-export-port={_port()}",
         f"--ray-client-server-port={_port()}"],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 120
    while True:
        try:
            client = JobSubmissionClient(url)
            client.list_jobs()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                print((tmp_path / "ray-head.log").read_text()[-3000:])
                raise
            time.sleep(2)
    yield client
    os.killpg(proc.pid, signal.SIGINT)  # --block: the head stops what it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    head_log.close()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.integration
def test_job_submit_mines_and_evaluates(ray_head, tiny_beir: Path, tiny_model: str,
                                        tmp_path: Path) -> None:
    from ray.job_submission import JobStatus

    out = tmp_path / "out"
    args = (f"--config jobs/configs/scifact.yaml data.path={tiny_beir} teacher.model={tiny_model} "
            "teacher.num_actors=1 teacher.cpus_per_actor=0.5 mining.top_k=10 mining.num_negatives=3 "
            f"evaluate.k_values=[10] evaluate.top_k=20 output.dir={out}")
    py = sys.executable
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a little after its dashboard
        try:
            job = ray_head.submit_job(
                entrypoint=f"{py} jobs/mine.py {args} && {py} jobs/evaluate.py {args}",
                runtime_env={"working_dir": str(ROOT),
                             "excludes": [".venv", ".git", "posmine-out", "**/__pycache__",
                                          "*.egg-info", ".*_cache", ".hypothesis"],
                             "env_vars": {"RAY_AUTH_MODE": "disabled"}})
            break
        except (RuntimeError, requests.exceptions.ConnectionError) as e:
            starting = isinstance(e, requests.exceptions.ConnectionError) or "No available agent" in str(e)
            if not starting or time.time() > deadline:
                raise
            time.sleep(3)
    deadline = time.time() + 420
    status = ray_head.get_job_status(job)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in time"
        time.sleep(3)
        status = ray_head.get_job_status(job)
    logs = ray_head.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "Started a local Ray instance" not in logs  # it joined the cluster (RAY_ADDRESS)
    mined = storage.read_parquet(str(out / "mine" / "mined.parquet"))
    assert mined.num_rows > 0
    [metrics] = list((out / "evaluate").rglob("metrics.json"))
    assert "ndcg@10" in storage.read_json(str(metrics))["metrics"]
