"""Bad embeddings, models and storage URLs: each a clear error naming the culprit.

(Corpus, queries, qrels and config cases live in test_data.py and test_config.py.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import s3fs

from posmine import pipeline
from posmine.config import IndexConfig, load_config
from posmine.io import storage
from posmine.io.vectors import EmbeddingError, embeddings_table, read_embeddings
from posmine.models.backbone import ModelError, resolve_model
from posmine.stages import search as index


def _write_embed_dir(root: Path, corpus: np.ndarray, queries: np.ndarray) -> str:
    for side, mat in (("corpus", corpus), ("queries", queries)):
        ids = [f"{side[0]}{i}" for i in range(len(mat))]
        storage.write_parquet(embeddings_table(ids, mat), str(root / side / "part-00000.parquet"))
    return str(root)


def test_query_vectors_of_another_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb = _write_embed_dir(tmp_path / "emb", rng.normal(size=(6, 32)).astype(np.float32),
                           rng.normal(size=(2, 16)).astype(np.float32))
    with pytest.raises(EmbeddingError, match=r"queries: vectors are 16-d, expected 32-d"):
        index.run(IndexConfig(num_shards=1), emb, str(tmp_path / "out"), "test", 3,
                         upstream="x", data_dir=str(tmp_path / "data"),
                         query_ids=pa.array(["q0"]))
    assert not list((tmp_path / "out").rglob("_manifest.json"))


def test_nan_vector_is_named(tmp_path: Path) -> None:
    corpus = np.ones((5, 8), np.float32)
    corpus[3, 2] = np.nan
    emb = _write_embed_dir(tmp_path / "emb", corpus, np.ones((1, 8), np.float32))
    with pytest.raises(EmbeddingError, match=r"corpus.*1 vector\(s\) with NaN or inf, first id 'c3'"):
        read_embeddings(f"{emb}/corpus")
    plans, _ = index.plan_shards(f"{emb}/corpus", 1)
    with pytest.raises(EmbeddingError, match="first id 'c3'"):
        index.load_rows(plans[0])


def test_corpus_files_of_different_sizes(tmp_path: Path) -> None:
    storage.write_parquet(embeddings_table(["a"], np.ones((1, 8), np.float32)),
                          str(tmp_path / "c" / "part-00000.parquet"))
    storage.write_parquet(embeddings_table(["b"], np.ones((1, 4), np.float32)),
                          str(tmp_path / "c" / "part-00001.parquet"))
    with pytest.raises(EmbeddingError, match=r"embedding files disagree|4-d, expected 8-d"):
        read_embeddings(str(tmp_path / "c"))
    plans, _ = index.plan_shards(str(tmp_path / "c"), 1)
    with pytest.raises(EmbeddingError, match=r"part-00001\.parquet: vectors are 4-d, expected 8-d"):
        index.load_rows(plans[0])


@pytest.mark.parametrize("where", ["driver", "ray"])
def test_model_that_outputs_nan_fails_the_embed_stage(ray_local: None, tiny_beir: Path, tiny_model: str,
                                                      tmp_path: Path, where: str) -> None:
    """A real (tiny) model whose weights hold NaN: the stage stops and leaves no manifest,
    whether the small corpus is embedded in the driver or (forced) on Ray Data."""
    import torch
    from transformers import BertModel

    broken = tmp_path / "nan-bert"
    shutil.copytree(tiny_model, broken)
    model = BertModel.from_pretrained(broken)
    with torch.no_grad():
        model.embeddings.LayerNorm.weight[0] = float("nan")
    model.save_pretrained(broken, safe_serialization=True)
    cfg = load_config(None, [f"data.path={tiny_beir}", f"teacher.model={broken}",
                             "teacher.cpus_per_actor=0.5", f"output.dir={tmp_path / 'out'}",
                             f"teacher.local_corpus_below={1000 if where == 'driver' else 0}"])
    with pytest.raises(EmbeddingError, match=r"corpus part part-00000\.parquet: 40 vector\(s\) with NaN"):
        pipeline.embed(cfg)
    assert not list((tmp_path / "out" / "embed").rglob("_manifest.json"))
    assert ray.is_initialized()


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("empty", r"not a model directory \(no config.json\)"),
    ("no_weights", r"no \*\.safetensors weights"),
    ("pickle_only", "only pickled weights \\(pytorch_model.bin\\), which posmine never loads"),
])
def test_bad_model_directories(case: str, message: str, tiny_model: str, tmp_path: Path) -> None:
    path = tmp_path / case
    if case != "missing":
        path.mkdir()
    if case in ("no_weights", "pickle_only"):
        shutil.copy(Path(tiny_model) / "config.json", path / "config.json")
    if case == "pickle_only":
        (path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelError, match=message):
        resolve_model(str(path))


def test_unknown_storage_scheme() -> None:
    with pytest.raises(storage.StorageError, match=r"nosuch://b/x: unknown or unavailable scheme 'nosuch'"):
        storage.exists("nosuch://b/x")


def test_missing_bucket(s3_server: str) -> None:
    with pytest.raises(storage.StorageError, match="bucket 'posmine-no-such-bucket' does not exist"):
        storage.write_bytes("s3://posmine-no-such-bucket/run/x.json", b"{}")


def test_no_credentials(s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
                        tmp_path: Path) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would still hold the keys
    try:
        with pytest.raises(storage.StorageError, match="no credentials: set AWS_ACCESS_KEY_ID"):
            storage.write_bytes(f"{s3_bucket}/run/x.json", b"{}")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
