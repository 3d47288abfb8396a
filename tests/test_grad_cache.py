"""GradCache against one pass: the same loss and the same gradient for every weight."""

from dataclasses import replace

import pytest
import torch

from posmine.config import TrainConfig
from posmine.stages.train.trainer import StudentTrainer
from tests.test_train import ROWS

CPU = torch.device("cpu")


def _grads(trainer: StudentTrainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _trainer(cfg: TrainConfig, dropout: bool) -> StudentTrainer:
    trainer = StudentTrainer(cfg, 1, CPU)  # the same seed: the same weights
    trainer.model.train(dropout)
    return trainer


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=grad_atol(b[name]), rtol=1e-4, msg=name)


def grad_atol(want: torch.Tensor) -> float:
    """Absolute tolerance for a gradient summed over many tokens (token-type and position
    embeddings sum over the whole batch): fp32 sums taken in another order (chunks, workers)
    differ by ~1e-5 of the largest entry (seen: 1.1e-5 on entries up to 2.3), which a fixed
    1e-6 refuses near zero. A real error moves gradients by far more."""
    return max(1e-6, 1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
@pytest.mark.parametrize("in_batch, distill, bound", [(True, 0.0, "none"), (False, 0.5, "none"),
                                                      (True, 0.0, "rule")])
def test_grad_cache_equals_one_pass(tiny_model: str, chunk: int, in_batch: bool,
                                    distill: float, bound: str) -> None:
    """Without dropout chunking changes nothing but the padding: the loss, every gradient and
    the masked counts (the teacher's in-batch bound's too) equal one pass over the batch
    (6 queries, 6 x (1 + 3) passages)."""
    from tests.test_in_batch_bound import bound_rows

    rows = bound_rows() if bound == "rule" else ROWS
    cfg = TrainConfig(model=tiny_model, batch_size=6, num_negatives=3, in_batch_negatives=in_batch,
                      distill_weight=distill, in_batch_bound=bound)  # type: ignore[arg-type]
    plain = _trainer(cfg, dropout=False)
    want = plain.backward(rows)
    cached = _trainer(replace(cfg, grad_cache_chunk=chunk), dropout=False)
    got = cached.backward(rows)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    _assert_same(_grads(cached), _grads(plain))
    assert cached.masked == plain.masked and (plain.masked["in_batch_bound"] > 0) == (bound == "rule")


def test_grad_cache_replays_dropout(tiny_model: str) -> None:
    """With dropout on, each chunk's second forward draws the masks of its first: the gradients
    equal those of the same chunks embedded with the graph kept and one backward."""
    chunk, cfg = 5, TrainConfig(model=tiny_model, batch_size=6, num_negatives=3, grad_cache_chunk=5)
    ref = _trainer(cfg, dropout=True)
    queries, passages = ref.texts(ROWS)
    torch.manual_seed(7)
    q = torch.cat([ref._embed(queries[i:i + chunk], cfg.query_max_length, cfg.query_prefix)
                   for i in range(0, len(queries), chunk)])
    d = torch.cat([ref._embed(passages[i:i + chunk], cfg.passage_max_length, cfg.passage_prefix)
                   for i in range(0, len(passages), chunk)])
    want = ref.loss_from(ROWS, q, d)
    want.backward()
    want = want.detach()
    cached = _trainer(cfg, dropout=True)
    torch.manual_seed(7)
    got = cached.backward(ROWS)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    _assert_same(_grads(cached), _grads(ref))
    # and the dropout was real: another draw gives other gradients
    other = _trainer(cfg, dropout=True)
    torch.manual_seed(8)
    other.backward(ROWS)
    assert not torch.allclose(_grads(other)["embeddings.word_embeddings.weight"],
                              _grads(ref)["embeddings.word_embeddings.weight"])


def test_grad_cache_trains(tiny_model: str) -> None:
    """A few GradCache steps move the loss as plain steps do (the optimiser sees its grads)."""
    cfg = TrainConfig(model=tiny_model, lr=1e-3, warmup_ratio=0.0, batch_size=6, num_negatives=3)
    losses = {}
    for chunk in (0, 4):
        trainer = _trainer(replace(cfg, grad_cache_chunk=chunk), dropout=False)
        losses[chunk] = [trainer.step(ROWS) for _ in range(4)]
    assert losses[4] == pytest.approx(losses[0], rel=1e-4)
    assert losses[4][-1] < losses[4][0]


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_grad_cache_equals_one_pass_on_a_lora_decoder(tiny_decoders: dict[str, str], family: str) -> None:
    """The LLM recipe's student: bidirectional, last-token or mean pooling without the prefix,
    LoRA adapters (the only weights with gradients)."""
    from posmine.config import LoraConfig

    cfg = TrainConfig(model=tiny_decoders[family], batch_size=6, num_negatives=3,
                      attention="bidirectional", pool_prefix=False, query_prefix="query: ",
                      pooling="last" if family == "qwen2" else "mean",
                      lora=LoraConfig(r=4, alpha=8, dropout=0.0,
                                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    plain = _trainer(cfg, dropout=False)
    want = plain.backward(ROWS)
    cached = _trainer(replace(cfg, grad_cache_chunk=4), dropout=False)
    got = cached.backward(ROWS)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    grads = _grads(cached)
    assert grads and all("lora_" in n for n in grads)
    _assert_same(grads, _grads(plain))
