"""teacher.backend=compile: torch.compile with Inductor's freezing gives the eager encoder's
vectors, and a one-row batch reuses the compiled graph instead of compiling a second."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from posmine import storage
from posmine.config import DataConfig, TeacherConfig
from posmine.data import prepare
from posmine.embed import Encoder, output_key, read_embeddings, run

TEXTS = ["cell protein", "the brain and the heart of a mouse study with a long text here",
         "drug", "vitamin diet sleep stress immune response infection liver kidney lung " * 6]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()  # graphs and counters of other tests' compiles do not count here
    counters.clear()


def test_gives_the_eager_vectors_with_one_graph(tiny_model: str) -> None:
    cfg = TeacherConfig(model=tiny_model, batch_size=3)
    ours, eager = Encoder(replace(cfg, backend="compile")), Encoder(cfg)
    # first: 3 rows of 3 tokens ([CLS] cell [SEP]), where duck shaping would tie rows to length
    np.testing.assert_allclose(ours.encode(["cell"] * 3), eager.encode(["cell"] * 3), atol=1e-5)
    for prefix in ("", "query: "):  # batches of 3 texts and of 1, of several lengths
        np.testing.assert_allclose(ours.encode(TEXTS, prefix), eager.encode(TEXTS, prefix), atol=1e-5)
    np.testing.assert_allclose(ours.encode(TEXTS[:1]), eager.encode(TEXTS[:1]), atol=1e-5)
    # the one-row batches went through the graph the first batch compiled
    assert counters["stats"]["unique_graphs"] == 1


def test_bidirectional_decoder_gives_the_eager_vectors(tiny_decoders: dict[str, str]) -> None:
    cfg = TeacherConfig(model=tiny_decoders["llama"], pooling="last", attention="bidirectional",
                        batch_size=3)
    np.testing.assert_allclose(Encoder(replace(cfg, backend="compile")).encode(TEXTS),
                               Encoder(cfg).encode(TEXTS), atol=1e-5)


def test_vectors_are_kept_apart_from_eager() -> None:
    # within ~1e-7 of torch's, but not bit-identical: a stage never mixes them
    assert output_key(TeacherConfig(backend="compile")) != output_key(TeacherConfig())


@pytest.mark.slow  # ~80 s: a Ray actor and the driver each compile (`-m slow` runs it)
def test_ray_data_actors_compile_and_give_the_eager_vectors(ray_local: None, tiny_beir: Path,
                                                             tiny_model: str, tmp_path: Path) -> None:
    """Each actor compiles its own model (Inductor in a Ray worker process)."""
    out = str(tmp_path / "out")
    manifest = prepare(DataConfig(path=str(tiny_beir)), out)
    cfg = TeacherConfig(model=tiny_model, num_actors=1, cpus_per_actor=0.5, batch_size=4,
                        torch_threads=1, local_corpus_below=0, backend="compile")
    run(cfg, f"{out}/data", out, manifest["config_hash"])
    [folder] = storage.listdir(storage.join(out, "embed"))
    ids, mat = read_embeddings(f"{out}/embed/{folder}/corpus")
    text = {r["id"]: f"{r['title']} {r['text']}".strip()
            for r in storage.read_parquet(f"{out}/data/corpus").to_pylist()}
    eager = Encoder(replace(cfg, backend="torch")).encode([text[i] for i in ids])
    np.testing.assert_allclose(mat, eager, atol=1e-5)
