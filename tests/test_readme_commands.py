"""The README's main commands as a user runs them: `posmine` in a fresh process, the working
directory the repository root, the shipped `jobs/configs/scifact.yaml` with its `beir:scifact`
data and relative `output.dir`. Overrides only make it small (a tiny model, a few queries,
two steps); `output.dir` stays relative, under a name of the test's own so that a user's
real `posmine-out/scifact` is never touched.

The README's `posmine mine` runs once for the module; each test starts from a copy of its folder,
as a user's rerun does: data, embedding, search and mining are found current (their keys do not
hold the folder's path) and the test's command does its own part (training, evaluation, the
failure). That part of the line took most of each test's time, three times over.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # the README's commands, each a fresh process with its own Ray

REPO = Path(__file__).resolve().parents[1]
CONFIG = "jobs/configs/scifact.yaml"


def posmine(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "posmine.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def small(tiny_model: str, rel_out: str) -> list[str]:
    """Size only: the tiny model as teacher and student, 6 queries per split, 2 steps."""
    return [f"teacher.model={tiny_model}", f"train.model={tiny_model}", "data.max_queries=6",
            "train.max_steps=2", "train.batch_size=4", "train.checkpoint_every=1",
            f"output.dir={rel_out}"]


@pytest.fixture(scope="module")
def mined_out(tiny_model: str) -> Iterator[str]:
    """The README's `posmine mine`, once: a folder whose stages up to mining are finished."""
    rel = f"posmine-out/test-readme-mined-{uuid.uuid4().hex[:8]}"
    try:
        r = posmine("mine", CONFIG, *small(tiny_model, rel))
        assert r.returncode == 0, r.stderr[-4000:]
        manifest = json.loads((REPO / rel / "mine" / "_manifest.json").read_text())
        assert manifest["rows"]["examples"] > 0 and r.stdout.rstrip().endswith("/mine")
        yield rel
    finally:
        shutil.rmtree(REPO / rel, ignore_errors=True)


@pytest.fixture
def rel_out(mined_out: str) -> Iterator[str]:
    """A test's own output folder: a copy of the mined one."""
    rel = f"posmine-out/test-readme-{uuid.uuid4().hex[:8]}"
    shutil.copytree(REPO / mined_out, REPO / rel)
    yield rel
    shutil.rmtree(REPO / rel, ignore_errors=True)


def check_model(manifest_dir: Path) -> Path:
    """The train manifest names an absolute model folder under the output dir, and it is there."""
    manifest = json.loads((manifest_dir / "_manifest.json").read_text())
    model = Path(manifest["model_dir"])
    assert model == manifest_dir / "model", manifest["model_dir"]
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "modules.json"):
        assert (model / name).is_file(), name
    assert manifest["rows"]["steps"] == 2
    return model


def test_readme_run_then_report(tiny_model: str, rel_out: str) -> None:
    """Command 1 of the README: `posmine run` prints base vs fine-tuned, `posmine report` draws."""
    r = posmine("run", CONFIG, *small(tiny_model, rel_out))
    assert r.returncode == 0, r.stderr[-4000:]
    out = REPO / rel_out
    model = check_model(out / "train")
    assert "fine-tuned" in r.stdout and f"model: {model}" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_dir"] == str(model)
    assert set(summary["base"]) == set(summary["fine_tuned"]) and "ndcg@10" in summary["base"]
    r = posmine("report", f"{rel_out}/mine")
    assert r.returncode == 0, r.stderr[-4000:]
    assert (out / "mine" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (out / "mine" / "report.html").read_text()
    r = posmine("report", rel_out)  # the whole run on one page
    assert r.returncode == 0, r.stderr[-4000:]
    page = (out / "report.html").read_text()
    train = json.loads((out / "train" / "_manifest.json").read_text())
    assert [s for s, _ in train["stats"]["loss_curve"]] == [2]  # log_every=5: the last step only
    assert page.count("data:image/png;base64,") == 2  # histogram and loss curve, inline
    assert f"{summary['fine_tuned']['ndcg@10']:.4f}" in page and "Mining" in page
    assert posmine("report", f"{rel_out}/data").returncode == 1  # not a stage it can report


def test_readme_train(tiny_model: str, rel_out: str) -> None:
    """`posmine train` alone leaves the model where its manifest says, loadable."""
    from transformers import AutoModel

    r = posmine("train", CONFIG, *small(tiny_model, rel_out))
    assert r.returncode == 0, r.stderr[-4000:]
    model = check_model(REPO / rel_out / "train")
    assert AutoModel.from_pretrained(model).config.hidden_size == 32
    assert r.stdout.rstrip().endswith(f"in: {model}"), r.stdout  # the summary names it


def test_failure_inside_ray_ends_with_one_line(tiny_model: str, rel_out: str,
                                               tmp_path: Path) -> None:
    """A student whose weights are corrupt fails inside the Ray Train worker: the user gets
    posmine's one-line error and exit status 1; no train manifest claims a model and no summary
    of an earlier run is left to look like this one's."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    stale = REPO / rel_out / "summary.json"  # an earlier run's: must not outlive this one
    stale.write_text("{}")
    r = posmine("run", CONFIG, *small(tiny_model, rel_out), f"train.model={broken}",
                "train.max_failures=0", "train.startup_retries=0")
    assert r.returncode == 1, r.stderr[-4000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("posmine: error: ")]
    assert len(errors) == 1, r.stderr[-4000:]
    assert "safetensors" in errors[0].lower() or "header" in errors[0].lower(), errors[0]
    log = REPO / rel_out / "posmine.log"  # the worker's traceback: in the log file, named
    assert f"its traceback is in {log}" in r.stderr and "Traceback" in log.read_text()
    assert "Traceback" not in r.stderr  # the terminal keeps to posmine's lines
    assert not (REPO / rel_out / "train" / "_manifest.json").exists()
    assert not stale.exists()
