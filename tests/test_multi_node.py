"""A real multi-node Ray cluster on this machine: a head and two worker nodes started with
`ray start` (loopback only, each node its own ports and CPUs), `posmine run` submitted to it as a
driver with data and outputs on the loopback S3 server only; one worker node is killed mid-embed
(and replaced, as KubeRay replaces a lost pod), another mid-train. The run must finish with
every document embedded exactly once, every training example mined once, and training resumed
from its last checkpoint rather than from scratch."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from posmine.config import load_config
from posmine.io import storage
from posmine.io.vectors import read_embeddings
from posmine.stages import embed
from tests.conftest import _free_port
from tests.test_faults import _reference

pytestmark = pytest.mark.e2e  # a cluster of three `ray start` nodes, two of them killed

ROOT = Path(__file__).parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


class LocalCluster:
    """Ray nodes as separate `ray start` process trees, each tagged in its environment
    (`POSMINE_TEST_CLUSTER`, `POSMINE_NODE_NAME`) so one node can be killed like a lost machine
    without touching any other Ray on the box (`ray stop` would stop them all)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.token = f"pm{os.getpid()}-{random.randrange(10**9)}"
        # short: Ray's Unix sockets live under the temp dir and paths are capped at 107 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="pmray-", dir="/tmp")
        self.env = {**env, "POSMINE_TEST_CLUSTER": self.token}
        self._taken: set[int] = set()
        self.port = self._port()
        self.address = f"127.0.0.1:{self.port}"
        # Worker ports below the kernel's ephemeral range (32768-60999 by default), where
        # `_free_port` picks the components' ports: the two never meet. Ray refuses to start a
        # node whose component port falls inside its own worker range.
        self._next_worker_port = random.randrange(10000, 30000 - 600, 200)

    def _port(self) -> int:
        """A free loopback port not yet given to any component of this cluster."""
        while (port := _free_port()) in self._taken:
            pass
        self._taken.add(port)
        return port

    def start(self, name: str, cpus: int, head: bool = False) -> None:
        lo = self._next_worker_port
        self._next_worker_port += 200
        ports = ["--node-manager-port", self._port(), "--object-manager-port", self._port(),
                 "--dashboard-agent-listen-port", self._port(),
                 "--dashboard-agent-grpc-port", self._port(),
                 "--runtime-env-agent-port", self._port(), "--metrics-export-port", self._port(),
                 "--min-worker-port", lo, "--max-worker-port", lo + 199]
        where = (["--head", "--port", self.port, "--temp-dir", self.temp_dir,
                  "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                  "--dashboard-port", self._port(), "--ray-client-server-port", self._port()]
                 if head else ["--address", self.address])
        cmd = [RAY, "start", *where, "--node-ip-address", "127.0.0.1", "--num-cpus", cpus,
               "--object-store-memory", 200 * 2**20, "--disable-usage-stats", *ports]
        r = subprocess.run([str(c) for c in cmd], env={**self.env, "POSMINE_NODE_NAME": name},
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, f"ray start {name}: {r.stdout[-2000:]}{r.stderr[-2000:]}"

    def pids(self, name: str | None = None) -> list[int]:
        """The processes of one node (or of the whole cluster), found by their environment."""
        want = [f"POSMINE_TEST_CLUSTER={self.token}".encode()]
        if name is not None:
            want.append(f"POSMINE_NODE_NAME={name}".encode())
        found = []
        for p in Path("/proc").iterdir():
            try:
                env = (p / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if p.name.isdigit() and all(w in env for w in want) and int(p.name) != os.getpid():
                found.append(int(p.name))
        return found

    def kill(self, name: str | None = None) -> int:
        """SIGKILL every process of the node (None: of the cluster) at once: the machine is gone."""
        pids = self.pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def close(self) -> None:
        for _ in range(3):  # processes may be spawning children while we kill
            self.kill()
            time.sleep(0.5)


@pytest.fixture
def cluster(s3_server: str) -> Iterator[Callable[[dict[str, str]], LocalCluster]]:
    made: list[LocalCluster] = []

    def make(env: dict[str, str]) -> LocalCluster:
        made.append(LocalCluster(env))
        return made[-1]

    yield make
    for c in made:
        c.close()


def _wait_for(what: str, found: Callable[[], str | None], proc: subprocess.Popen[str],
              timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while (hit := found()) is None:
        assert proc.poll() is None, f"posmine run ended before {what}: {proc.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)
    return hit


def _node_doing(trace: Path, stage: str, min_step: int = 0) -> Callable[[], str | None]:
    """The node whose worker traced `stage` (at `min_step` or later), if any yet."""
    def found() -> str | None:
        for f in trace.glob(f"{stage}-*"):
            text = f.read_text()
            if int(text or 0) >= min_step:
                return f.name.split("-", 1)[1]
        return None
    return found


@pytest.mark.integration
def test_run_survives_losing_a_node_mid_embed_and_mid_train(
        cluster: Callable[[dict[str, str]], LocalCluster], s3_bucket: str, tiny_beir: Path,
        tiny_model: str, tmp_path: Path) -> None:
    beir, out = f"{s3_bucket}/beir/tiny", f"{s3_bucket}/run"
    storage.put_tree(str(tiny_beir), beir)
    trace = tmp_path / "trace"
    trace.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # every node's workers get the S3 endpoint and keys from their node, as pods do from a Secret
    c = cluster({**env, "POSMINE_TRACE_DIR": str(trace),
                 "POSMINE_FAULTS": "embed.batch:delay=1,train.step:delay=1"})
    c.start("head", cpus=0, head=True)  # schedules nothing, as on KubeRay; the driver runs here
    c.start("a", cpus=2)
    c.start("b", cpus=2)
    cmd = [sys.executable, "-m", "posmine.cli", "run", str(ROOT / "jobs/configs/scifact.yaml"),
           f"data.path={beir}", f"output.dir={out}", f"teacher.model={tiny_model}",
           f"train.model={tiny_model}", "teacher.batch_size=4", "data.rows_per_part=10",
           "teacher.local_corpus_below=0",  # the corpus through Ray Data on the nodes
           "train.batch_size=4", "train.epochs=10", "train.max_steps=8", "train.checkpoint_every=2",
           "train.log_every=1", "train.max_failures=2"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env={**env, "RAY_ADDRESS": c.address}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        first = _wait_for("an embedding batch", _node_doing(trace, "embed"), proc)
        assert c.kill(first) > 0
        killed_embed = time.monotonic() - started
        c.start("c", cpus=2)  # the replacement node
        # mid-train, after the checkpoint of step 2 has had a step's time to land
        second = _wait_for("training step 4", _node_doing(trace, "train", min_step=4), proc)
        assert second != first
        killed_at_step = int((trace / f"train-{second}").read_text())
        assert c.kill(second) > 0
        killed_train = time.monotonic() - started
        # what the lost node costs training: the restart, and the steps since the checkpoint
        third = _wait_for("training on another node",
                          lambda: next((n for n in ("a", "b", "c") if n not in (first, second)
                                        and (trace / f"train-{n}").exists()), None), proc)
        resumed_after = time.monotonic() - started - killed_train
        log = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-6000:]
    took = time.monotonic() - started

    # embedded: every document exactly once, each vector as the encoder's own
    teacher = load_config(cmd[4], cmd[5:]).teacher
    ids, mat = read_embeddings(storage.join(embed.stage_dir(out, teacher), "corpus"))
    assert len(ids) == len(set(ids))
    ref = _reference(tiny_model)
    assert set(ids) == set(ref)
    for d, v in zip(ids, mat, strict=True):
        np.testing.assert_allclose(v, ref[d], atol=1e-5)
    # mined: every training (query, positive) example once
    qrels = storage.read_parquet(f"{out}/data/qrels/train.parquet").to_pylist()
    mined = storage.read_parquet(f"{out}/mine/mined.parquet").to_pylist()
    pairs = [(r["query_id"], p) for r in mined for p in r["positive_ids"]]  # anchor=pair: one each
    assert len(pairs) == len(set(pairs)) == len(mined)
    assert set(pairs) == {(r["query_id"], r["doc_id"]) for r in qrels if r["score"] > 0}
    # trained: all 8 steps, the last attempt resumed from a checkpoint, not from step 0
    train = json.loads(storage.read_text(f"{out}/train/_manifest.json"))
    assert train["rows"]["steps"] == 8
    resumed = train["stats"]["resumed_from_step"]
    assert 2 <= resumed <= killed_at_step, train["stats"]
    print(f"multi-node run: node {first} killed mid-embed at {killed_embed:.0f} s; node {second} "
          f"killed at training step {killed_at_step} ({killed_train:.0f} s); training went on "
          f"on node {third} {resumed_after:.0f} s later from the step-{resumed} checkpoint "
          f"({killed_at_step - resumed} step(s) redone); finished at {took:.0f} s")
    summary = json.loads(storage.read_text(f"{out}/summary.json"))
    assert set(summary["base"]) == set(summary["fine_tuned"])
