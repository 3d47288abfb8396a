"""Hypothesis-made corruptions of BEIR files (plain and gzip): the data stage either prepares a
correct dataset or stops with a DataError naming the file (and the line, where the fault has
one); never another exception, never a manifest for a failed run."""

from __future__ import annotations

import gzip
import re
import shutil
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from posmine.config import DataConfig
from posmine.io import prepared, storage
from posmine.io.inputs import DataError
from posmine.stages import data
from tests.conftest import write_beir

FILES = ["corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"]


def corrupt(blob: bytes, how: str, at: float, junk: bytes) -> bytes:
    """One corruption of `blob` at relative position `at`."""
    i = int(at * len(blob))
    lines = blob.split(b"\n")
    j = int(at * len(lines))
    return {
        "flip": blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:] if blob else blob,
        "truncate": blob[:i],
        "insert": blob[:i] + junk + blob[i:],
        "drop_line": b"\n".join(lines[:j] + lines[j + 1:]),
        "repeat_line": b"\n".join(lines[:j + 1] + lines[j:]),
        "empty": b"",
        # a JSON escape of a lone surrogate, a number past int64, and ids padded with spaces
        "surrogate": blob[:i] + b"\\ud800" + blob[i:],
        "huge_number": blob[:i] + b"99999999999999999999" + blob[i:],
        "pad_ids": re.sub(rb"\t(d\d+)", rb"\t \1 ", blob.replace(b'"_id": "', b'"_id": " ')),
    }[how]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_beir(tmp_path_factory.mktemp("fuzz") / "beir")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FILES), how=st.sampled_from(["flip", "truncate", "insert", "drop_line",
                                                         "repeat_line", "empty", "surrogate",
                                                         "huge_number", "pad_ids"]),
       at=st.floats(0, 0.999), junk=st.binary(min_size=1, max_size=12),
       gz=st.sampled_from(["plain", "text_in_gzip", "gzip_bytes"]))
def test_corrupt_files_fail_clearly_or_load(pristine: Path, tmp_path: Path, name: str, how: str,
                                            at: float, junk: bytes, gz: str) -> None:
    root = tmp_path / f"case-{uuid.uuid4().hex}"  # hypothesis replays examples: a fresh folder each
    shutil.copytree(pristine, root)
    target = root / name
    blob = target.read_bytes()
    if gz != "plain" and name.endswith(".jsonl"):  # corrupt the text inside, or the gzip itself
        target.unlink()
        target, name = target.with_name(target.name + ".gz"), name + ".gz"
        blob = (gzip.compress(corrupt(blob, how, at, junk)) if gz == "text_in_gzip"
                else corrupt(gzip.compress(blob), how, at, junk))
    else:
        blob = corrupt(blob, how, at, junk)
    target.write_bytes(blob)
    out = str(root / "out")
    try:
        manifest = data.run(DataConfig(path=str(root)), out)
    except DataError as e:
        msg = str(e)
        event("refused")
        assert Path(name).name.split(".")[0] in msg or "qrels" in msg, msg  # names the file
        if re.search(r"line|JSON|UTF-8|field", msg):
            assert re.search(r":\d+: ", msg), msg  # ... and the line
        assert storage.read_manifest(f"{out}/data") is None
        return
    event("loaded")  # a corruption that leaves valid data (a repeated qrels line, say)
    corpus_ids = set(prepared.read_texts(f"{out}/data/corpus"))
    query_ids = set(prepared.read_texts(f"{out}/data/queries.parquet"))
    for split in ("train", "test"):
        qrels = prepared.read_prepared_qrels(f"{out}/data", split)
        assert set(qrels.column("doc_id").to_pylist()) <= corpus_ids
        assert set(qrels.column("query_id").to_pylist()) <= query_ids
    assert manifest["rows"]["corpus"] == len(corpus_ids)
