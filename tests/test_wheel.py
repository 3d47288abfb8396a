"""posmine installed as a library: the wheel, not the editable tree, in a fresh environment,
used from a directory outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # builds a wheel (pip fetches the build backend) and a venv

REPO = Path(__file__).resolve().parents[1]

API_CHECK = """
import sys, datasets, posmine
assert sys.argv[1] in posmine.__file__, posmine.__file__   # the installed copy
pairs = datasets.Dataset.from_dict({"anchor": ["cell protein", "virus study", "brain scan"],
                                    "positive": ["gene study of cells", "a virus study", "the brain"]})
corpus = [f"filler text number {i}" for i in range(12)]
out = posmine.mine_hard_negatives(pairs, sys.argv[2], corpus=corpus, num_negatives=2, range_max=8,
                                  output_format="n-tuple", cache_folder=sys.argv[3])
assert out.column_names == ["anchor", "positive", "negative_1", "negative_2"], out.column_names
print("rows", len(out))
"""


def test_the_wheel_works_from_any_directory(tmp_path: Path, tiny_model: str) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                    str(REPO)], check=True, timeout=600)
    wheel = next(wheels.glob("posmine-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # The dependencies come from this environment's site-packages, added as a plain path: its
    # editable-install hook (a .pth file there) is not run, so `posmine` can only be the wheel's.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                    "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*cmd: str) -> str:
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    assert run(str(venv / "bin" / "posmine"), "--version").startswith("posmine ")
    run(str(venv / "bin" / "posmine"), "config", "init", "cisi.yaml", "--preset", "cisi")
    assert "beir:cisi" in (work / "cisi.yaml").read_text()  # the presets ship in the wheel
    rows = run(str(venv / "bin" / "python"), "-c", API_CHECK, str(site), tiny_model,
               str(tmp_path / "cache")).splitlines()[-1]
    assert rows.startswith("rows ") and int(rows.split()[1]) >= 1  # a random model leaves some short
