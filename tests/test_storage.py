"""Storage helpers whose promises the stages lean on: a folder replaced whole, outputs checked
before a manifest names them."""

from __future__ import annotations

from pathlib import Path

import pytest

from posmine.io import storage
from posmine.stages import lifecycle


def _folder(root: Path, text: str) -> str:
    root.mkdir(parents=True)
    (root / "config.json").write_text(text)
    (root / "weights.bin").write_bytes(text.encode() * 100)
    return str(root)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_put_tree_replaces_a_folder_whole(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    base = str(tmp_path / "out") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/out"
    url = storage.join(base, "model")
    storage.put_tree(_folder(tmp_path / "a", "first"), url)
    storage.put_tree(_folder(tmp_path / "b", "second"), url)
    assert storage.read_text(storage.join(url, "config.json")) == "second"
    assert storage.listdir(base) == ["model"]  # no temporary or old copies left beside it
    assert storage.listdir(url) == ["config.json", "weights.bin"]


def test_commit_refuses_to_name_missing_outputs(tmp_path: Path) -> None:
    stage = str(tmp_path / "stage")
    lifecycle.begin_stage(stage)
    (tmp_path / "stage" / "a.parquet").write_bytes(b"x")
    with pytest.raises(lifecycle.StageError, match=r"output is missing \(b\.json or c\.json\)"):
        lifecycle.commit_stage(stage, "s", "k", rows={}, started=0.0,
                             outputs=["a.parquet", ("b.json", "c.json")])
    assert storage.read_manifest(stage) is None
    (tmp_path / "stage" / "c.json").write_text("{}")
    lifecycle.commit_stage(stage, "s", "k", rows={}, started=0.0, outputs=["a.parquet", ("b.json", "c.json")])
    assert lifecycle.is_done(stage, "k")


def test_a_full_disk_names_the_path_and_the_stage_and_leaves_no_temp_file(
        small_disk: Path, tiny_beir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`posmine mine` whose data stage fills the disk: one line naming the stage and the file,
    no traceback, no `.tmp-*` file, no manifest; with room again, the stage finishes."""
    from posmine.cli import main
    from posmine.config import DataConfig
    from posmine.stages import data

    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (256 - 12) * 1024)  # ~12 KiB left: a few corpus parts fit
    out = small_disk / "out"
    code = main(["mine", "jobs/configs/scifact.yaml", f"data.path={tiny_beir}",
                 "data.rows_per_part=5", f"output.dir={out}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("posmine: error: ")]
    assert code == 1 and len(lines) == 1, err[-3000:]
    assert "the data stage stopped: " in lines[0] and "No space left on device" in lines[0]
    assert f"{out}/data/" in lines[0], lines[0]
    assert "Traceback" not in err
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not (out / "data" / storage.MANIFEST).exists()
    filler.unlink()
    data.run(DataConfig(path=str(tiny_beir), rows_per_part=5), str(out))
    assert storage.read_manifest(str(out / "data"))["rows"]["corpus"] == 40
