"""`train.in_batch_bound=rule`: in-batch negatives held to the mining rule's bound, with the
teacher's vectors read from the embed stage's files, against per-pair references (GradCache:
tests/test_grad_cache.py; gathering across workers: tests/test_gather.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from posmine.config import MiningConfig, TrainConfig
from posmine.core.losses import contrastive_loss
from posmine.core.mining import rule_threshold
from posmine.io import storage
from posmine.io.vectors import embeddings_table
from posmine.stages.train.plan import TeacherBound, attach_teacher, expand
from posmine.stages.train.trainer import StudentTrainer, teacher_bound
from tests.test_train import ROWS

CPU = torch.device("cpu")


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal((*shape, 8)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def bound_rows() -> list[dict]:
    """ROWS with random teacher vectors (8-d) and one bound, 0.2: about a third of the in-batch
    pairs score at or above it."""
    rng = np.random.default_rng(0)
    return [dict(r, teacher_query=_unit(rng), teacher_docs=_unit(rng, 1 + len(r["negatives"])),
                 bound=0.2) for r in ROWS]


def _reference_mask(rows: list[dict], k: int) -> np.ndarray:
    """Per pair, in plain Python: query i masks document (row r, slot j) of another row when
    the teacher's score reaches i's bound."""
    b = len(rows)
    out = np.zeros((b, b * (1 + k)), bool)
    for i, qi in enumerate(rows):
        for r, rr in enumerate(rows):
            for j in range(min(1 + k, 1 + len(rr["negatives"]))):
                score = float(np.dot(qi["teacher_query"], rr["teacher_docs"][j]))
                out[i, r * (1 + k) + j] = r != i and score >= qi["bound"]
    return out


def test_the_trainer_masks_the_pairs_a_per_pair_loop_finds(tiny_model: str) -> None:
    rows = bound_rows()
    k = 3
    want = _reference_mask(rows, k)
    assert 0 < want.sum() < want.size // 2
    assert np.array_equal(teacher_bound(rows, k).numpy(), want)
    cfg = TrainConfig(model=tiny_model, batch_size=6, num_negatives=k, in_batch_bound="rule")
    trainer = StudentTrainer(cfg, 1, CPU)
    trainer.model.eval()
    queries, passages = trainer.texts(rows)
    with torch.no_grad():
        q = trainer._embed(queries, cfg.query_max_length, cfg.query_prefix)
        d = trainer._embed(passages, cfg.passage_max_length, cfg.passage_prefix)
        got = trainer.loss_from(rows, q, d)
        p, n = d[:6], d[6:].reshape(6, k, -1)
        mask = torch.ones(6, k, dtype=torch.bool)
        plain = contrastive_loss(q, p, n, mask, None, temperature=cfg.temperature,
                                 in_batch_negatives=True)
    # the reference: each query's softmax over the batch's documents the loop left in
    docs = torch.cat([p.unsqueeze(1), n], 1).reshape(6 * (1 + k), -1)
    ref = 0.0
    for i in range(6):
        kept = [j for j in range(6 * (1 + k)) if not want[i, j]]
        logits = (q[i] @ docs[kept].T) / cfg.temperature
        ref -= float(logits[kept.index(i * (1 + k))] - torch.logsumexp(logits, 0))
    assert float(got) == pytest.approx(ref / 6, rel=1e-5)
    assert float(got) != pytest.approx(float(plain), rel=1e-3)
    assert trainer.masked["in_batch_bound"] == int(want.sum())


def test_without_vectors_the_rule_is_refused(tiny_model: str) -> None:
    cfg = TrainConfig(model=tiny_model, batch_size=6, num_negatives=3, in_batch_bound="rule")
    with pytest.raises(ValueError, match="in_batch_bound=rule"):
        StudentTrainer(cfg, 1, CPU).loss(ROWS)


def _write_embeddings(root: Path, vectors: dict[str, dict[str, np.ndarray]]) -> str:
    for side, vecs in vectors.items():
        storage.write_parquet(embeddings_table(list(vecs), np.stack(list(vecs.values()))),
                              str(root / side / "part-00000.parquet"))
    return str(root)


@pytest.mark.parametrize("anchor", ["pair", "min", "max"])
def test_attach_reads_the_teachers_vectors_and_anchors_the_bound(tmp_path: Path, anchor: str) -> None:
    """Two positives (scores 0.8 and 0.4 from the stored vectors) and a negative: each example's
    bound is the rule's threshold on its anchor, scored from the files."""
    e = np.eye(8, dtype=np.float32)
    vectors = {"queries": {"q1": e[0]},
               "corpus": {"p1": 0.8 * e[0] + 0.6 * e[1], "p2": 0.4 * e[0] + np.sqrt(0.84) * e[2],
                          "n1": e[3]}}
    embed_dir = _write_embeddings(tmp_path, vectors)
    rows = expand({"query_id": ["q1"], "query": ["x"], "positives": [["a", "b"]],
                   "positive_ids": [["p1", "p2"]], "positive_scores": [[0.8, 0.4]],
                   "negatives": [["c"]], "negative_ids": [["n1"]], "negative_scores": [[0.0]]})
    mining = MiningConfig(perc=0.9, anchor=anchor)
    attach_teacher(rows, TeacherBound(embed_dir, mining))
    s_plus = {"pair": [0.8, 0.4], "min": [0.4, 0.4], "max": [0.8, 0.8]}[anchor]
    want = rule_threshold(np.array(s_plus), mining)
    assert [r["bound"] for r in rows] == pytest.approx(want.tolist(), abs=1e-6)
    np.testing.assert_allclose(rows[1]["teacher_docs"], np.stack([vectors["corpus"]["p2"], e[3]]))
    np.testing.assert_array_equal(rows[0]["teacher_query"], e[0])
    rows[0]["negative_ids"] = ["gone"]
    with pytest.raises(ValueError, match="no teacher vector for document 'gone'"):
        attach_teacher(rows[:1], TeacherBound(embed_dir, mining))
