"""One writer per output folder, between real processes: a second `posmine` on a held folder is
refused with a message naming the holder, a dead holder's lease is taken over, and of two
processes racing for a lease on the loopback S3 server exactly one wins."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from posmine.io import lease, storage

# Once the file argv[4] appears (a starting gun, so that two racers start within milliseconds),
# takes the lease on argv[1], says so in the file argv[2], then holds it until killed or until
# the file argv[3] appears. Prints "held" or the refusal.
HOLDER = """
import sys, time, pathlib
from posmine.io import lease
while not pathlib.Path(sys.argv[4]).exists():
    time.sleep(0.005)
try:
    with lease.hold(sys.argv[1]):
        pathlib.Path(sys.argv[2]).write_text("held")
        while not pathlib.Path(sys.argv[3]).exists():
            time.sleep(0.05)
    print("held")
except lease.InUseError as e:
    print("refused:", e)
"""


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_holder_outlives_its_test() -> Iterator[None]:
    """A holder still waiting when its test failed is killed, not left polling for its cue."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _holder(out: str, tmp_path: Path, name: str) -> tuple[subprocess.Popen[str], Path, Path]:
    got, release = tmp_path / f"{name}.got", tmp_path / f"{name}.release"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, out, str(got), str(release),
                             str(tmp_path / "go")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "POSMINE_LEASE_HEARTBEAT_S": "0.2"})
    _STARTED.append(proc)
    return proc, got, release


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the holder never took the lease"
        time.sleep(0.05)


def test_a_second_run_is_refused_then_a_dead_holders_lease_is_taken_over(
        tmp_path: Path, tiny_beir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from posmine.cli import main

    out = str(tmp_path / "out")
    proc, got, _ = _holder(out, tmp_path, "a")
    (tmp_path / "go").write_text("")
    _wait_for(got, proc)
    # the CLI refuses before any stage: nothing written but the holder's lease
    code = main(["mine", "jobs/configs/scifact.yaml", f"data.path={tiny_beir}", f"output.dir={out}"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"posmine: error: {out} is in use by pid {proc.pid} on {socket.gethostname()}" in err, err
    assert sorted(os.listdir(out)) == [lease.LEASE]
    proc.send_signal(signal.SIGKILL)  # the holder dies without giving the lease back
    proc.wait()
    assert json.loads(Path(out, lease.LEASE).read_text())["pid"] == proc.pid
    with lease.hold(out):
        assert json.loads(Path(out, lease.LEASE).read_text())["pid"] == os.getpid()
    assert not Path(out, lease.LEASE).exists()  # given back


def test_a_lease_from_another_host_is_judged_by_its_heartbeat(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "out")
    record = {"holder": "x", "host": "elsewhere", "pid": 1, "started": time.time()}
    storage.write_json(f"{out}/{lease.LEASE}", {**record, "heartbeat": time.time()})
    with pytest.raises(lease.InUseError, match=r"in use by pid 1 on elsewhere"), lease.hold(out):
        pass
    monkeypatch.setattr(lease, "STALE_S", 5.0)
    storage.write_json(f"{out}/{lease.LEASE}", {**record, "heartbeat": time.time() - 6})
    with lease.hold(out):
        assert storage.read_json(f"{out}/{lease.LEASE}")["host"] == socket.gethostname()


def test_two_processes_racing_on_object_storage_leave_one_holder(s3_bucket: str,
                                                                 tmp_path: Path) -> None:
    out = f"{s3_bucket}/race"
    a, got_a, release_a = _holder(out, tmp_path, "a")
    b, got_b, release_b = _holder(out, tmp_path, "b")
    time.sleep(3)  # both have started Python and imported posmine, and wait for the gun
    (tmp_path / "go").write_text("")
    deadline = time.monotonic() + 60
    while not all(got.exists() or p.poll() is not None for p, got in ((a, got_a), (b, got_b))):
        assert time.monotonic() < deadline, "a racer neither took the lease nor gave up"
        time.sleep(0.05)
    assert got_a.exists() != got_b.exists(), "both or neither took the lease"
    loser = b if got_a.exists() else a
    assert "refused:" in loser.communicate(timeout=60)[0]
    release_a.write_text(""), release_b.write_text("")
    winner = a if got_a.exists() else b
    assert winner.communicate(timeout=60)[0].strip() == "held"
    assert not storage.exists(f"{out}/{lease.LEASE}")  # given back
