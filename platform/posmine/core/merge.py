"""The pure merge of sharded search results (no Ray, no FAISS): per-shard top lists ->
the global top-k, exactly as one index over the whole corpus would return it."""

from __future__ import annotations

import numpy as np


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results into the global top-k.

    Args:
        parts: per shard, (scores (nq, k_s) float32, global row ids (nq, k_s) int64); id -1 pads.
        k: how many to keep.

    Returns:
        (scores (nq, k), ids (nq, k)), best first; ties broken by the smaller global id, so
        the result does not depend on how the corpus was sharded.
    """
    scores = np.concatenate([p[0] for p in parts], axis=1)  # (nq, sum k_s)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]  # primary key: -score
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def brute_force_topk(corpus: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference exact inner-product top-k in numpy, same tie rule as `merge_topk`."""
    scores = queries @ corpus.T  # (nq, n)
    ids = np.broadcast_to(np.arange(corpus.shape[0]), scores.shape)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), order.astype(np.int64)
