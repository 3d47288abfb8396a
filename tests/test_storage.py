"""Storage helpers whose promises the stages lean on: a folder replaced whole, outputs checked
before a manifest names them."""

from __future__ import annotations

from pathlib import Path

import pytest

from posmine import storage


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
    storage.begin_stage(stage)
    (tmp_path / "stage" / "a.parquet").write_bytes(b"x")
    with pytest.raises(storage.StageError, match=r"output is missing \(b\.json or c\.json\)"):
        storage.commit_stage(stage, "s", "k", rows={}, started=0.0,
                             outputs=["a.parquet", ("b.json", "c.json")])
    assert storage.read_manifest(stage) is None
    (tmp_path / "stage" / "c.json").write_text("{}")
    storage.commit_stage(stage, "s", "k", rows={}, started=0.0, outputs=["a.parquet", ("b.json", "c.json")])
    assert storage.is_done(stage, "k")
