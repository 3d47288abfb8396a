"""Sharded FAISS search on Ray equals brute force; the merge is exact and shard-independent."""

import itertools
from pathlib import Path

import numpy as np
import pytest

from posmine.config import IndexConfig, config_hash
from posmine.core.merge import brute_force_topk, merge_topk
from posmine.io import storage
from posmine.io.vectors import embeddings_table, pair_scores
from posmine.stages.search import (
    IndexShard,
    ShardedSearch,
    build_index,
    plan_shards,
    search_key,
    sharded_search,
)


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_merge_equals_brute_force_for_any_split() -> None:
    corpus, queries = _vectors(500, 16, 0), _vectors(20, 16, 1)
    corpus[7] = corpus[3]  # an exact tie: the smaller global id must come first
    want_s, want_i = brute_force_topk(corpus, queries, 10)
    for bounds in ([0, 500], [0, 100, 500], [0, 3, 4, 250, 499, 500]):
        parts = []
        for a, b in itertools.pairwise(bounds):
            s, i = brute_force_topk(corpus[a:b], queries, min(10, b - a))
            parts.append((s, i + a))
        got_s, got_i = merge_topk(parts, 10)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_s, want_s, rtol=1e-6)


def test_merge_drops_padding() -> None:
    s = np.array([[0.5, -3e38]], np.float32)
    i = np.array([[4, -1]])
    _got_s, got_i = merge_topk([(s, i), (np.array([[0.7]], np.float32), np.array([[9]]))], 3)
    assert got_i.tolist() == [[9, 4, -1]]
    # a pad (id -1) ranks last whatever score a backend leaves in its slot, even above the
    # real ones (all negative here, as inner products of unrelated vectors can be)
    s = np.array([[-0.2, 9.0], [-0.4, -0.1]], np.float32)
    i = np.array([[3, -1], [-1, 7]])
    got_s, got_i = merge_topk([(s, i), (np.array([[-0.3], [-0.5]], np.float32), np.array([[8], [2]]))], 3)
    assert got_i.tolist() == [[3, 8, -1], [7, 2, -1]]
    assert np.isneginf(got_s[:, 2]).all() and np.isfinite(got_s[:, :2]).all()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_kinds(kind: str) -> None:
    corpus, queries = _vectors(2000, 16, 2), _vectors(10, 16, 3)
    index = build_index(corpus, IndexConfig(kind=kind, nlist=16, nprobe=16, use_gpu="never"))
    _, got = index.search(queries, 5)
    _, want = brute_force_topk(corpus, queries, 5)
    if kind == "flat":
        np.testing.assert_array_equal(got, want)
    else:  # approximate: most of the true top-5 found
        assert np.mean([len(set(g) & set(w)) / 5 for g, w in zip(got, want, strict=True)]) > 0.8


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_a_shard_scores_the_pairs_it_holds_exactly(kind: str, tmp_path: Path) -> None:
    """`IndexShard.score_pairs` (the positives' teacher scores) reads each document's vector back
    from the index, of every kind, and scores it as `pair_scores` does on the stored vectors;
    documents of other shards are NaN."""
    corpus, queries = _vectors(600, 16, 6), _vectors(40, 16, 7)
    ids = [f"doc{i}" for i in range(len(corpus))]
    storage.write_parquet(embeddings_table(ids, corpus), str(tmp_path / "corpus" / "part-0.parquet"))
    plans, _ = plan_shards(str(tmp_path / "corpus"), 2)
    shard = IndexShard(plans[1], IndexConfig(kind=kind, nlist=8, use_gpu="never"), threads=1)
    rows = np.random.default_rng(8).integers(0, len(corpus), 40)
    got = shard.score_pairs(queries, np.array([ids[r] for r in rows], dtype=object))
    mine = rows >= plans[1].start
    assert mine.any() and (~mine).any()
    np.testing.assert_array_equal(got[mine], pair_scores(queries[mine], corpus[rows[mine]]))
    assert np.isnan(got[~mine]).all()


def test_sharded_ray_search_equals_single_index(ray_local: None, tmp_path: Path) -> None:
    corpus, queries = _vectors(3001, 24, 4), _vectors(57, 24, 5)
    ids = [f"doc{i}" for i in range(len(corpus))]
    # uneven files, so shards straddle file boundaries
    for n, (a, b) in enumerate([(0, 1000), (1000, 1001), (1001, 3001)]):
        storage.write_parquet(embeddings_table(ids[a:b], corpus[a:b]),
                              str(tmp_path / "corpus" / f"part-{n}.parquet"))
    want_s, want_i = brute_force_topk(corpus, queries, 20)
    # the default CPU split, and an explicit reservation per shard (cluster setting); shard
    # actors (local_below=0), and the same shards held in this process (the default here)
    for shards, cpus, local_below in ((1, 0.0, 0), (3, 0.0, 0), (4, 0.0, 0), (2, 1.0, 0),
                                      (1, 0.0, 10**5), (3, 0.0, 10**5)):
        cfg = IndexConfig(num_shards=shards, query_batch_size=16, cpus_per_shard=cpus,
                          local_below=local_below)
        got_s, got_ids = sharded_search(str(tmp_path / "corpus"), queries, 20, cfg)
        assert got_ids == [[ids[j] for j in row] for row in want_i]
        np.testing.assert_allclose(got_s, want_s, rtol=1e-5)


def test_pairs_scored_on_actors_and_in_process_are_the_stored_vectors_scores(
        ray_local: None, tmp_path: Path) -> None:
    """`ShardedSearch.score_pairs` gathers each pair's score from the shard that holds the
    document: with shard actors and with the shards held in this process, bit for bit."""
    corpus, queries = _vectors(700, 16, 9), _vectors(50, 16, 10)
    ids = [f"doc{i}" for i in range(len(corpus))]
    storage.write_parquet(embeddings_table(ids, corpus), str(tmp_path / "corpus" / "part-0.parquet"))
    rows = np.random.default_rng(11).integers(0, len(corpus), len(queries))
    want = pair_scores(queries, corpus[rows])
    for local_below, local in ((0, False), (701, True)):
        search = ShardedSearch(str(tmp_path / "corpus"), IndexConfig(num_shards=2, local_below=local_below))
        try:
            assert search.local is local
            np.testing.assert_array_equal(search.score_pairs(queries, [ids[r] for r in rows]), want)
            with pytest.raises(ValueError, match="no embedding in the corpus"):
                search.score_pairs(queries[:1], ["nope"])
        finally:
            search.close()


def test_where_the_shards_are_searched_is_not_in_the_search_key() -> None:
    """`index.local_below` moves the search, not its lists: a search stage (and the mining and
    training keyed on it) made with other values or before the setting existed stays current."""
    base = IndexConfig()
    assert "local_below" not in search_key(base)
    assert config_hash(search_key(IndexConfig(local_below=0))) == config_hash(search_key(base))
    assert config_hash(search_key(IndexConfig(num_shards=3))) != config_hash(search_key(base))
