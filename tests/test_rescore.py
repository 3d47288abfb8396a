"""Cross-encoder rescoring with a tiny random sequence-classification model."""

import numpy as np
import pytest
import torch

from posmine.core.mining import QueryCandidates
from posmine.models.rescore import CrossEncoderScorer, rescore


def test_rescore_replaces_scores_and_resorts(tiny_cross_encoder: str) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = {"a": "cell protein gene", "b": "brain heart", "c": "drug trial dose", "p": "cell gene"}
    q = QueryCandidates("q", ["a", "b", "c"], np.array([0.9, 0.8, 0.7]), ["p"], np.array([0.95]))
    scorer = CrossEncoderScorer(tiny_cross_encoder, batch_size=2)
    [out] = rescore([q], scorer, texts, {"q": "cell"})
    tok = AutoTokenizer.from_pretrained(tiny_cross_encoder)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_cross_encoder).eval()
    with torch.no_grad():
        want = {d: float(torch.sigmoid(model(**tok("cell", texts[d], return_tensors="pt")).logits)[0, 0])
                for d in texts}
    assert list(out.cand_scores) == sorted(out.cand_scores, reverse=True)
    for d, s in zip(out.cand_ids, out.cand_scores, strict=True):
        assert s == pytest.approx(want[d], abs=1e-5)
    assert out.pos_scores[0] == pytest.approx(want["p"], abs=1e-5)
