"""Contrastive and distillation losses (pure torch, no Ray).

Embeddings are L2-normalised, so scores are cosine similarities; dividing by the temperature
0.05 equals sentence-transformers' MultipleNegativesRankingLoss scale 20.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def own_logits(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor,
               neg_mask: torch.Tensor) -> torch.Tensor:
    """Each query against its own positive (column 0) and hard negatives.

    Args:
        q: (B, d) queries; p: (B, d) positives; n: (B, k, d) hard negatives.
        neg_mask: (B, k) True where a hard negative exists (rows may have fewer than k).

    Returns:
        (B, 1 + k) scores, -inf where a negative is missing.
    """
    scores = torch.cat([(q * p).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", q, n)], 1)
    return scores.masked_fill(~_with_positive(neg_mask), float("-inf"))


def in_batch_logits(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor,
                    neg_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query against every positive and hard negative in the batch.

    Returns:
        (B, B * (1 + k)) scores (-inf where a negative is missing) and (B,) the column of each
        query's own positive: i * (1 + k).
    """
    b, k, d = n.shape
    docs = torch.cat([p.unsqueeze(1), n], 1).reshape(b * (1 + k), d)  # (B*(1+k), d)
    valid = _with_positive(neg_mask).reshape(1, -1)  # (1, B*(1+k))
    scores = (q @ docs.T).masked_fill(~valid, float("-inf"))  # (B, B*(1+k))
    return scores, torch.arange(b, device=q.device) * (1 + k)


def _with_positive(neg_mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([neg_mask.new_ones(neg_mask.shape[0], 1), neg_mask], 1)  # (B, 1+k)


def teacher_bound_mask(teacher_q: torch.Tensor, teacher_docs: torch.Tensor,
                       valid: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """In-batch documents the mining rule would have dropped, laid out as `in_batch_logits`.

    Args:
        teacher_q: (B, d) the teacher's query vectors; teacher_docs: (B, 1 + k, d) its vectors of
        each row's positive and hard negatives; valid: (B, 1 + k) True where a document exists;
        bound: (B,) each example's exclusive upper bound on a negative's teacher score
        (`mining.rule_threshold` of its anchor).

    Returns:
        (B, B * (1 + k)) True where query i's teacher scores document j at or above i's bound and
        j is another row's: a likely false negative. A row's own block is the miner's to judge.
    """
    b, width, d = teacher_docs.shape
    scores = teacher_q @ teacher_docs.reshape(b * width, d).T  # (B, B*(1+k))
    over = (scores >= bound[:, None]) & valid.reshape(1, -1)
    rows = torch.arange(b, device=over.device)
    own = rows.repeat_interleave(width)[None, :] == rows[:, None]  # (B, B*(1+k))
    return over & ~own


def info_nce(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of -log softmax(logits / T)[label]."""
    return F.cross_entropy(logits / temperature, labels)


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                    temperature: float, teacher_temperature: float) -> torch.Tensor:
    """KL(teacher || student) over each query's own candidates.

    Args:
        student: (B, 1 + k) student scores; teacher: (B, 1 + k) teacher scores from mining.
        mask: (B, 1 + k) True where a candidate exists.
    """
    neg_inf = torch.finfo(student.dtype).min
    log_s = F.log_softmax((student / temperature).masked_fill(~mask, neg_inf), -1)
    log_t = F.log_softmax((teacher / teacher_temperature).masked_fill(~mask, neg_inf), -1)
    kl = (log_t.exp() * (log_t - log_s)).masked_fill(~mask, 0.0).sum(-1)  # (B,)
    return kl.mean()


def contrastive_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, neg_mask: torch.Tensor,
                     teacher_scores: torch.Tensor | None, *, temperature: float,
                     in_batch_negatives: bool, distill_weight: float = 0.0,
                     teacher_temperature: float | None = None,
                     known_positives: torch.Tensor | None = None,
                     bounded: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - w) * InfoNCE + w * KL(teacher || student), w = `distill_weight`.

    `teacher_scores` (B, 1 + k) are the mining stage's positive and negative teacher scores.
    `known_positives` (B, B * (1 + k)), laid out as `in_batch_logits`' columns, is True where a
    batch document is a labelled positive of the query (never its own label column): such a
    document is left out of that query's softmax, as a hard and as an in-batch negative.
    `bounded`, laid out alike (`teacher_bound_mask`), leaves out the in-batch documents the
    mining rule would have dropped.
    """
    b, k = neg_mask.shape
    own = own_logits(q, p, n, neg_mask)  # (B, 1+k)
    own_valid = _with_positive(neg_mask)  # (B, 1+k)
    if known_positives is not None:
        rows = torch.arange(b, device=q.device)
        own_known = known_positives.reshape(b, b, 1 + k)[rows, rows]  # (B, 1+k): own block
        own = own.masked_fill(own_known, float("-inf"))
        own_valid = own_valid & ~own_known
    loss = own.new_zeros(())
    if distill_weight < 1.0:
        if in_batch_negatives:
            logits, labels = in_batch_logits(q, p, n, neg_mask)
            if known_positives is not None:
                logits = logits.masked_fill(known_positives, float("-inf"))
            if bounded is not None:
                logits = logits.masked_fill(bounded, float("-inf"))
        else:
            logits, labels = own, torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = (1 - distill_weight) * info_nce(logits, labels, temperature)
    if distill_weight > 0.0:
        if teacher_scores is None:
            raise ValueError("distill_weight > 0 needs the teacher's scores from mining")
        kl = distillation_kl(own, teacher_scores, own_valid, temperature,
                             teacher_temperature or temperature)
        loss = loss + distill_weight * kl
    return loss
