"""Optional cross-encoder rescoring of mining candidates before the positive-aware rule.

Any Hugging Face sequence-classification model scores (query, passage) pairs; one logit is
squashed with a sigmoid, several labels give the softmax probability of the last (relevant)
label, so scores live in [0, 1] where `topk_abs` thresholds make sense.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from posmine.core.mining import QueryCandidates
from posmine.models.backbone import ModelError, resolve_model
from posmine.models.encoder import pick_device


class CrossEncoderScorer:
    def __init__(self, model: str, max_length: int = 512, batch_size: int = 32) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model(model)
        self.device = pick_device("auto")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ModelError(f"cross-encoder {model!r}: cannot load: {e}") from e
        self.model.to(self.device).eval()
        self.max_length, self.batch_size = max_length, batch_size

    @torch.inference_mode()
    def score(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """(n,) relevance in [0, 1] for n (query, passage) pairs."""
        out = []
        for i in range(0, len(queries), self.batch_size):
            enc = self.tokenizer(list(queries[i:i + self.batch_size]),
                                 list(passages[i:i + self.batch_size]), padding=True,
                                 truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits.float()  # (batch, labels)
            if logits.shape[1] == 1:
                out.append(torch.sigmoid(logits[:, 0]))
            else:
                out.append(torch.softmax(logits, dim=-1)[:, -1])
        return torch.cat(out).cpu().numpy() if out else np.zeros(0, np.float32)


def rescore(batch: Sequence[QueryCandidates], scorer: CrossEncoderScorer,
            texts: Mapping[str, str], query_texts: Mapping[str, str]) -> list[QueryCandidates]:
    """Replace teacher scores of candidates and positives by cross-encoder scores, re-sorted."""
    out = []
    for q in batch:
        qt = query_texts[q.query_id]
        ids = list(q.cand_ids) + list(q.pos_ids)
        s = scorer.score([qt] * len(ids), [texts.get(d, "") for d in ids])
        cand, pos = s[:len(q.cand_ids)], s[len(q.cand_ids):]
        order = np.argsort(-cand, kind="stable")
        out.append(QueryCandidates(q.query_id, [q.cand_ids[i] for i in order], cand[order],
                                   q.pos_ids, pos))
    return out
