"""Losses against naive per-example implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from posmine.core.losses import contrastive_loss, distillation_kl, own_logits


def _batch(b: int = 5, k: int = 3, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, p, n = (F.normalize(torch.randn(*s, generator=g), dim=-1) for s in ((b, d), (b, d), (b, k, d)))
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[1, 2] = False  # a row with one negative fewer
    return q, p, n, mask


def _naive_info_nce(q, p, n, mask, t, in_batch):
    total = 0.0
    b, k = mask.shape
    for i in range(b):
        docs = [(p[i], True)] + [(n[i, j], bool(mask[i, j])) for j in range(k)]
        if in_batch:
            docs = []
            for r in range(b):
                docs += [(p[r], True)] + [(n[r, j], bool(mask[r, j])) for j in range(k)]
        scores = [float(q[i] @ dvec) / t for dvec, ok in docs if ok]
        own = float(q[i] @ p[i]) / t
        total += -(own - math.log(sum(math.exp(s) for s in scores)))
    return total / b


@pytest.mark.parametrize("in_batch", [False, True])
def test_info_nce_equals_naive(in_batch: bool) -> None:
    q, p, n, mask = _batch()
    got = contrastive_loss(q, p, n, mask, None, temperature=0.05, in_batch_negatives=in_batch)
    assert float(got) == pytest.approx(_naive_info_nce(q, p, n, mask, 0.05, in_batch), rel=1e-5)


def test_distillation_equals_naive_kl_and_mixes() -> None:
    q, p, n, mask = _batch(seed=1)
    teacher = torch.rand(5, 4)
    own = own_logits(q, p, n, mask)
    full = torch.cat([torch.ones(5, 1, dtype=torch.bool), mask], 1)
    want = 0.0
    for i in range(5):
        idx = [j for j in range(4) if full[i, j]]
        ps = F.softmax(own[i, idx] / 0.05, -1)
        pt = F.softmax(teacher[i, idx] / 0.1, -1)
        want += float((pt * (pt.log() - ps.log())).sum())
    kl = distillation_kl(own, teacher, full, 0.05, 0.1)
    assert float(kl) == pytest.approx(want / 5, rel=1e-5)
    mixed = contrastive_loss(q, p, n, mask, teacher, temperature=0.05, in_batch_negatives=False,
                             distill_weight=0.3, teacher_temperature=0.1)
    nce = _naive_info_nce(q, p, n, mask, 0.05, False)
    assert float(mixed) == pytest.approx(0.7 * nce + 0.3 * want / 5, rel=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        contrastive_loss(q, p, n, mask, None, temperature=0.05, in_batch_negatives=False,
                         distill_weight=0.5)


def test_distillation_leaves_out_known_positives_and_padding() -> None:
    """A hard negative that is a labelled positive of its query (the known mask's own block)
    and a padded slot are both out of the teacher's and the student's softmax."""
    b, k = 5, 3
    q, p, n, mask = _batch(b, k, seed=2)  # row 1 has slot 2 padded
    teacher = torch.rand(b, 1 + k)
    known = torch.zeros(b, b * (1 + k), dtype=torch.bool)
    known[0, 0 * (1 + k) + 2] = True  # row 0's second hard negative is one of its positives
    known[3, 3 * (1 + k) + 1] = True
    known[2, 4 * (1 + k) + 0] = True  # another row's positive: in-batch only, not in the KL
    own = own_logits(q, p, n, mask)
    want = 0.0
    for i in range(b):
        idx = [0] + [1 + j for j in range(k) if mask[i, j] and not known[i, i * (1 + k) + 1 + j]]
        ps = F.softmax(own[i, idx] / 0.05, -1)
        pt = F.softmax(teacher[i, idx] / 0.1, -1)
        want += float((pt * (pt.log() - ps.log())).sum())
    got = contrastive_loss(q, p, n, mask, teacher, temperature=0.05, in_batch_negatives=True,
                           distill_weight=1.0, teacher_temperature=0.1, known_positives=known)
    assert float(got) == pytest.approx(want / b, rel=1e-5)


def test_loss_has_gradients() -> None:
    q, p, n, mask = _batch()
    q.requires_grad_(True)
    contrastive_loss(q, p, n, mask, None, temperature=0.05, in_batch_negatives=True).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_teacher_bound_equals_a_per_pair_loop_and_leaves_those_pairs_out() -> None:
    """The in-batch bound against plain loops: query i drops batch document j of another row
    when the teacher scores it at or above i's bound; the loss then equals the naive InfoNCE
    over the documents left."""
    from posmine.config import MiningConfig
    from posmine.core.losses import teacher_bound_mask
    from posmine.core.mining import rule_threshold

    b, k, d = 5, 3, 8
    q, p, n, mask = _batch(b, k, d, seed=2)
    tq, tp, tn, _ = _batch(b, k, d, seed=3)  # the teacher's own vectors
    docs = torch.cat([tp.unsqueeze(1), tn], 1)  # (B, 1+k, d)
    valid = torch.cat([torch.ones(b, 1, dtype=torch.bool), mask], 1)
    s_plus = (tq * tp).sum(-1)
    bound = torch.from_numpy(rule_threshold(s_plus.numpy(), MiningConfig(perc=0.5)))
    got = teacher_bound_mask(tq, docs, valid, bound)
    want = torch.zeros(b, b * (1 + k), dtype=torch.bool)
    for i in range(b):
        for r in range(b):
            for j in range(1 + k):
                if r != i and valid[r, j]:
                    want[i, r * (1 + k) + j] = float(tq[i] @ docs[r, j]) >= float(bound[i])
    assert torch.equal(got, want)
    assert 0 < int(want.sum()) < int(valid.sum()) * (b - 1)  # some pairs masked, not all

    loss = contrastive_loss(q, p, n, mask, None, temperature=0.05, in_batch_negatives=True,
                            bounded=got)
    ref = 0.0
    for i in range(b):
        scores = [float(q[i] @ (p[r] if j == 0 else n[r, j - 1])) / 0.05
                  for r in range(b) for j in range(1 + k)
                  if valid[r, j] and not want[i, r * (1 + k) + j]]
        ref += -(float(q[i] @ p[i]) / 0.05 - math.log(sum(math.exp(s) for s in scores)))
    assert float(loss) == pytest.approx(ref / b, rel=1e-5)
    unbounded = contrastive_loss(q, p, n, mask, None, temperature=0.05, in_batch_negatives=True)
    assert float(unbounded) != pytest.approx(float(loss), rel=1e-3)
