"""Queries with many positives: each anchor mode and the loss's known-positive mask against
plain per-example reference loops, the epoch plan's guarantees, and the starvation warning."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from posmine import pipeline
from posmine.config import DataConfig, MiningConfig, TrainConfig, default_beir_dir, load_config
from posmine.core.losses import contrastive_loss
from posmine.core.mining import (
    QueryCandidates,
    mine,
    normalize_text,
    rule_keep_reference,
    starvation_warning,
)
from posmine.io import prepared, storage
from posmine.stages import data
from posmine.stages import mine as mine_stage
from posmine.stages.train.plan import epoch_batches, epoch_plan, expand
from posmine.stages.train.trainer import known_positive_mask, masked_counts
from tests.conftest import CORPUS, write_beir

# One query, three positives of different strength among its candidates (best first).
CANDS = ["p1", "a", "b", "p2", "c", "d", "p3", "e", "f", "g"]
SCORES = np.array([0.90, 0.85, 0.80, 0.75, 0.70, 0.60, 0.50, 0.45, 0.40, 0.30])
POS, POS_SCORES = ["p1", "p2", "p3"], np.array([0.90, 0.75, 0.50])
Q = QueryCandidates("q", CANDS, SCORES, POS, POS_SCORES)


def reference(q: QueryCandidates, cfg: MiningConfig) -> list[tuple[list[str], list[str]]]:
    """(positive ids, negative ids) per example, by a plain loop over examples."""
    if cfg.anchor == "pair":
        examples = [([p], float(s)) for p, s in zip(q.pos_ids, q.pos_scores, strict=True)]
    else:
        s_plus = {"min": min, "max": max, "mean": lambda x: sum(x) / len(x)}[cfg.anchor](
            list(map(float, q.pos_scores)))
        examples = [(list(q.pos_ids), s_plus)]
    eligible = [d not in q.pos_ids for d in q.cand_ids]
    out = []
    for pos, s_plus in examples:
        keep = rule_keep_reference(list(q.cand_scores), eligible, s_plus, cfg)
        out.append((pos, [d for d, k in zip(q.cand_ids, keep, strict=True) if k][:cfg.num_negatives]))
    return out


@pytest.mark.parametrize("anchor, expected", [
    # pair: each positive its own example, bound s+ * 0.95 = 0.855, 0.7125, 0.475
    ("pair", [(["p1"], ["a", "b", "c", "d"]), (["p2"], ["c", "d", "e", "f"]), (["p3"], ["e", "f", "g"])]),
    ("min", [(POS, ["e", "f", "g"])]),  # s+ = 0.50: only candidates below 0.475
    ("max", [(POS, ["a", "b", "c", "d"])]),  # s+ = 0.90: below 0.855
    ("mean", [(POS, ["d", "e", "f", "g"])]),  # s+ = 0.7167: below 0.6808
])
def test_anchor_modes_on_hand_built_rows(anchor: str, expected: list) -> None:
    cfg = MiningConfig(anchor=anchor, num_negatives=4)  # type: ignore[arg-type]
    rows, stats = mine([Q], cfg)
    got = [(r["positive_ids"], r["negative_ids"]) for r in rows]
    assert got == expected == reference(Q, cfg)
    assert all(r["query_positive_ids"] == POS for r in rows)
    assert stats.examples == len(expected) and stats.queries_out == 1
    assert stats.examples_too_few == sum(len(n) < 4 for _, n in expected)


@pytest.mark.parametrize("anchor, rule", itertools.product(
    ["pair", "min", "max", "mean"], ["topk_percpos", "topk_marginpos", "topk_abs", "naive_topk"]))
def test_anchor_modes_equal_the_reference_on_random_queries(anchor: str, rule: str) -> None:
    rng = np.random.default_rng(7)
    cfg = MiningConfig(anchor=anchor, rule=rule, num_negatives=3, top_k=12)  # type: ignore[arg-type]
    for n in range(30):
        scores = np.sort(rng.uniform(-0.2, 1.0, 25))[::-1]
        ids = [f"d{i}" for i in range(25)]
        pos = sorted(rng.choice(25, size=int(rng.integers(1, 8)), replace=False))
        q = QueryCandidates(f"q{n}", ids, scores, [ids[i] for i in pos], scores[pos])
        rows, _ = mine([q], cfg)
        assert [(r["positive_ids"], r["negative_ids"]) for r in rows] == reference(q, cfg)


def test_pair_examples_sample_independently_and_reproducibly() -> None:
    cfg = MiningConfig(anchor="pair", rule="naive_topk", sampling="sample", sample_from=6,
                       num_negatives=2)
    rows, _ = mine([Q], cfg)
    assert rows == mine([Q], cfg)[0]
    assert len({tuple(r["negative_ids"]) for r in rows}) > 1  # seeded per (query, positive)


def test_starvation_warning_names_the_cause() -> None:
    _, stats = mine([Q], MiningConfig(anchor="min", num_negatives=4))
    msg = starvation_warning(stats, MiningConfig(anchor="min"))
    assert msg is not None and "100%" in msg and "mining.anchor=pair (the default)" in msg
    _, stats = mine([Q], MiningConfig(anchor="max", num_negatives=4))
    assert starvation_warning(stats, MiningConfig(anchor="max")) is None
    short = {"examples": 10, "examples_too_few": 3}
    causes = {  # each setting's likely cause names the key to change
        "pair rank": (MiningConfig(window="rank"), "mining.window=survivors"),
        "pair survivors": (MiningConfig(), "mining.max_depth=4096"),
        "max rank": (MiningConfig(anchor="max", window="rank"), "mining.perc"),
        "margin rank": (MiningConfig(rule="topk_marginpos", anchor="max", window="rank"), "mining.margin"),
        "abs": (MiningConfig(rule="topk_abs", window="rank"), "raise it"),
        "naive": (MiningConfig(rule="naive_topk"), "retrieved too few candidates"),
    }
    for name, (cfg, key) in causes.items():
        msg = starvation_warning(short, cfg)
        assert msg is not None and "30% of training examples (3 of 10)" in msg and key in msg, name
        others = [k for n, (_, k) in causes.items() if n != name and k != key]
        assert not any(k in msg for k in others), (name, msg)
    assert starvation_warning({"examples": 10, "examples_too_few": 2}, MiningConfig()) is None  # 20%


# ---------------------------------------------------------------- training


def mined_rows(n_queries: int, positives_each: int, shared: int = 0) -> list[dict]:
    """Mined rows (anchor=min style): query i has `positives_each` positives; the first `shared`
    of them are also positives of query i + 1; negatives are other queries' positives' twins."""
    cols: dict[str, list] = {k: [] for k in ("query_id", "query", "positive_ids", "positives",
                                             "positive_scores", "negative_ids", "negatives",
                                             "negative_scores", "query_positive_hashes")}
    for i in range(n_queries):
        pos = [f"d{i}-{j}" for j in range(positives_each)] + [f"d{i - 1}-{j}" for j in range(shared) if i]
        cols["query_id"].append(f"q{i}")
        cols["query"].append(f"query {i}")
        cols["positive_ids"].append(pos)
        cols["positives"].append([f"text of {d}" for d in pos])
        cols["positive_scores"].append([0.9] * len(pos))
        # a hard negative whose text equals (after normalisation) a positive of query i + 1
        negs = [f"n{i}-0", f"d{i + 1}-0"]
        cols["negative_ids"].append(negs)
        cols["negatives"].append([f"text of {negs[0]}", f"TEXT of {negs[1]}!"])
        cols["negative_scores"].append([0.5, 0.4])
        cols["query_positive_hashes"].append(None)  # derived from `positives` by expand
    return expand(cols)


def test_expand_carries_ids_and_the_query_positives() -> None:
    ex = mined_rows(2, 3)
    assert [e["positive_id"] for e in ex] == ["d0-0", "d0-1", "d0-2", "d1-0", "d1-1", "d1-2"]
    assert all(len(e["known"]) == 3 for e in ex)


@pytest.mark.parametrize("positives", ["sample", "all"])
def test_epoch_plan_never_puts_one_query_twice_in_a_batch(positives: str) -> None:
    ex = mined_rows(9, 5)
    cfg = TrainConfig(batch_size=4, positives=positives, epochs=3, seed=3)  # type: ignore[arg-type]
    plans = [epoch_plan(ex, cfg, e) for e in range(cfg.epochs)]
    for plan in plans:
        for batch in plan:
            assert len({ex[i]["query_id"] for i in batch}) == len(batch) <= 4
        used = Counter(i for b in plan for i in b)
        if positives == "all":  # every (query, positive) exactly once an epoch
            assert sorted(used) == list(range(len(ex))) and set(used.values()) == {1}
        else:  # one example per query an epoch
            assert len(used) == 9 and len({ex[i]["query_id"] for i in used}) == 9
    assert plans == [epoch_plan(ex, cfg, e) for e in range(cfg.epochs)]  # seeded
    assert plans[0] != plans[1]  # a fresh shuffle (and fresh positives) each epoch


def test_sample_sees_every_positive_once_in_as_many_epochs() -> None:
    """positives=sample draws without replacement: 5 epochs over queries of 5 positives use
    each (query, positive) once, in a seeded order that differs between queries."""
    ex = mined_rows(9, 5)
    cfg = TrainConfig(batch_size=4, positives="sample", epochs=5, seed=3)
    used = [i for e in range(5) for b in epoch_plan(ex, cfg, e) for i in b]
    assert sorted(used) == list(range(len(ex)))
    firsts = {ex[i]["positive"][-1] for b in epoch_plan(ex, cfg, 0) for i in b}
    assert len(firsts) > 1  # not every query starts with its first positive


def test_epoch_plan_for_workers_leaves_no_worker_without_rows() -> None:
    ex = mined_rows(9, 1)
    plan = epoch_plan(ex, TrainConfig(batch_size=2, positives="all"), 0, world=2)
    assert [len(b) for b in plan] == [4, 4]  # the 9th example would leave a worker empty


def reference_masked_loss(q: torch.Tensor, docs: torch.Tensor, doc_ids: list[str],
                          doc_texts: list[str], positives: list[set[str]], texts: list[set[str]],
                          k: int, t: float) -> torch.Tensor:
    """InfoNCE per query by a plain loop: every batch document except the query's other known
    positives (by id or normalised text); the label is the query's own positive."""
    losses = []
    for i in range(q.shape[0]):
        own = i * (1 + k)
        cols = [j for j in range(len(doc_ids)) if j == own or not (
            doc_ids[j] in positives[i] or normalize_text(doc_texts[j]) in texts[i])]
        logits = torch.stack([q[i] @ docs[j] for j in cols]) / t
        losses.append(-torch.log_softmax(logits, 0)[cols.index(own)])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("in_batch", [True, False])
def test_masked_loss_equals_the_per_query_loop(in_batch: bool) -> None:
    examples = mined_rows(6, 2, shared=1)
    rows = [next(e for e in examples if e["query_id"] == f"q{i}") for i in range(6)]  # d{i}-0 each
    b, k, dim = len(rows), 2, 8
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(b, dim), dim=-1)
    docs = torch.nn.functional.normalize(torch.randn(b, 1 + k, dim), dim=-1)  # (B, 1+k, d)
    known = known_positive_mask(rows, k)  # (B, B*(1+k))
    loss = contrastive_loss(q, docs[:, 0], docs[:, 1:], torch.ones(b, k, dtype=torch.bool), None,
                            temperature=0.05, in_batch_negatives=in_batch,
                            known_positives=torch.from_numpy(known))
    doc_ids = [d for r in rows for d in [r["positive_id"], *r["negative_ids"]]]
    doc_texts = [t for r in rows for t in [r["positive"], *r["negatives"]]]
    positives = [{e["positive_id"] for e in examples if e["query_id"] == r["query_id"]} for r in rows]
    texts = [{normalize_text(f"text of {d}") for d in p} for p in positives]
    if in_batch:
        ref = reference_masked_loss(q, docs.reshape(-1, dim), doc_ids, doc_texts, positives, texts,
                                    k, 0.05)
    else:  # own candidates only: the block of each query's own row
        ref = torch.stack([reference_masked_loss(
            q[i:i + 1], docs[i], doc_ids[i * (1 + k):(i + 1) * (1 + k)],
            doc_texts[i * (1 + k):(i + 1) * (1 + k)], positives[i:i + 1], texts[i:i + 1], k, 0.05)
            for i in range(b)]).mean()
    torch.testing.assert_close(loss, ref)
    in_batch_masked, hard_masked = masked_counts(known, k)
    # query i (positives d{i}-0, d{i}-1, d{i-1}-0) meets, in other rows: row i-1's positive
    # d{i-1}-0 and its hard negative "TEXT of d{i}-0!" (i >= 1), row i-2's hard negative
    # "TEXT of d{i-1}-0!" (i >= 2); its own hard negatives name only query i+1's positive
    assert in_batch_masked == 2 * (b - 1) + (b - 2) and hard_masked == 0
    unmasked = contrastive_loss(q, docs[:, 0], docs[:, 1:], torch.ones(b, k, dtype=torch.bool), None,
                                temperature=0.05, in_batch_negatives=True)
    if in_batch:
        assert not torch.allclose(loss, unmasked)  # the mask changed the loss


@pytest.mark.parametrize("share", [True, False])
def test_queries_of_the_same_text_share_their_positives(tmp_path: Path, share: bool) -> None:
    """Two train queries with one text (case and punctuation apart) and different ids, each
    with its own positive: the data stage gives each the other's (with its grade), so mining
    never makes one's positive the other's hard negative. The test split is left as it is."""
    queries = [{"_id": "q1", "text": "Cell growth, in mice?"}, {"_id": "q2", "text": "cell GROWTH in mice"},
               {"_id": "q3", "text": "liver kidney"}]
    qrels = {"train": [("q1", "d1", 1), ("q2", "d2", 2), ("q3", "d3", 1)],
             "test": [("q1", "d4", 1), ("q2", "d5", 1)]}
    root = write_beir(tmp_path / "twins", CORPUS, queries, qrels)
    manifest = data.run(DataConfig(path=str(root), share_positives_by_text=share), str(tmp_path / "out"))
    data_dir = f"{tmp_path}/out/data"
    train = prepared.read_prepared_qrels(data_dir, "train")
    cols = [train.column(c).to_pylist() for c in ("query_id", "doc_id", "score")]
    got = {(q, d): s for q, d, s in zip(*cols, strict=True)}
    own = {("q1", "d1"): 1, ("q2", "d2"): 2, ("q3", "d3"): 1}
    assert got == ({**own, ("q1", "d2"): 2, ("q2", "d1"): 1} if share else own)
    assert manifest["stats"]["queries_given_same_text_positives"] == (2 if share else 0)
    test = prepared.read_prepared_qrels(data_dir, "test")
    assert sorted(zip(test.column("query_id").to_pylist(), test.column("doc_id").to_pylist(),
                      strict=True)) == [("q1", "d4"), ("q2", "d5")]
    # q1's teacher ranks q2's positive first: a hard negative unless it is known as q1's positive
    positives = prepared.positives_by_query(train)
    q1 = QueryCandidates("q1", ["d2", "d7", "d1", "d8", "d9"], np.array([0.9, 0.5, 0.45, 0.3, 0.2]),
                         positives["q1"], np.array([0.45, 0.9][:len(positives["q1"])]))
    rows, _ = mine([q1], MiningConfig(rule="naive_topk", num_negatives=2))
    assert ("d2" in rows[0]["negative_ids"]) is not share
    assert all("d2" in r["query_positive_ids"] for r in rows) is share


# ---------------------------------------------------------------- real data


@pytest.mark.e2e  # the real MiniLM on real CISI
def test_cisi_default_config_mines_enough_and_never_trains_on_known_positives(
        ray_local: None, tmp_path: Path) -> None:
    """CISI (41 labelled positives per query) with the packaged MiniLM teacher: the default
    (anchor=pair, window=survivors) leaves at most 20% of its examples short of 4 negatives,
    by searching deeper the queries that need it, with the same examples as mining one search
    of the whole corpus; the rank window leaves most short and warns. No labelled positive of a
    query (by id or by normalised text) is ever its hard negative or an unmasked in-batch
    negative in any batch of any epoch, with either positive sampling."""
    cisi = default_beir_dir("cisi")
    args = [f"data.path={cisi}", f"output.dir={tmp_path / 'out'}", "teacher.cpus_per_actor=0.5",
            "teacher.torch_threads=1"]
    cfg = load_config(None, args)
    manifest = pipeline.mine(cfg)
    stats = manifest["stats"]
    assert stats["examples"] == 2242 and stats["short_share"] <= 0.20, stats["short_share"]
    assert len(manifest["candidate_dirs"]) > 1  # it searched deeper
    rank = pipeline.mine(load_config(None, [*args, "mining.window=rank"]), name="mine-rank")["stats"]
    assert rank["short_share"] > 0.5 and f"{rank['short_share']:.0%}" in rank["warning"]
    data_dir, _ = pipeline.prepare(cfg)
    whole, _ = pipeline.search(cfg, cfg.teacher, "train", 1460)  # every CISI document
    ref_rows, ref_stats = mine_stage.mine_rows(cfg.mining, data_dir, pipeline.embed(cfg)["dir"],
                                               [whole], "train")
    key = ("query_id", "positive_ids", "negative_ids")
    got = storage.read_parquet(f"{manifest['dir']}/mined.parquet").to_pylist()
    # the stage writes a shard per search round and query block: the same examples, in another order
    assert sorted([[r[k] for k in key] for r in got]) == sorted([[r[k] for k in key] for r in ref_rows])
    assert ref_stats.examples_too_few == stats["examples_too_few"]
    positives = {q: set(d) for q, d in prepared.positives_by_query(
        prepared.read_prepared_qrels(data_dir, "train")).items()}
    corpus = prepared.read_texts(f"{data_dir}/corpus")
    pos_texts = {q: {normalize_text(corpus[d]) for d in ds} for q, ds in positives.items()}
    mined = storage.read_parquet(f"{manifest['dir']}/mined.parquet")
    examples = expand(mined)
    for e in examples:
        assert not set(e["negative_ids"]) & positives[e["query_id"]]
        assert not {normalize_text(t) for t in e["negatives"]} & pos_texts[e["query_id"]]
    collisions = 0
    for mode in ("sample", "all"):
        train_cfg = TrainConfig(positives=mode, epochs=2, batch_size=32)  # type: ignore[arg-type]
        for batch in itertools.chain.from_iterable(
                epoch_plan(examples, train_cfg, ep) for ep in range(2)):
            rows = [examples[i] for i in batch]
            k = 4
            known = known_positive_mask(rows, k)  # (B, B*(1+k))
            ids = [[r["positive_id"], *(r["negative_ids"] + [None] * k)[:k]] for r in rows]
            flat = [d for slots in ids for d in slots]
            for i, r in enumerate(rows):
                for j, d in enumerate(flat):
                    if d is None or j == i * (1 + k):
                        continue
                    if d in positives[r["query_id"]]:  # a labelled positive of query i ...
                        collisions += 1
                        assert known[i, j], (r["query_id"], d)  # ... is masked
    assert collisions > 0  # CISI's queries share positives: the check above ran


@pytest.mark.parametrize("positives", ["sample", "all"])
def test_planned_batches_read_only_what_the_steps_use(tmp_path, positives: str) -> None:
    """Training plans batches from two light columns and expands only the mined rows its steps
    use, read by row group: the batches equal `epoch_batches` over the whole expanded file."""
    from posmine.stages.train.plan import planned_batches

    cols = {k: [] for k in ("query_id", "query", "positive_ids", "positives", "positive_scores",
                            "negative_ids", "negatives", "negative_scores")}
    for i in range(40):  # 40 rows of 1-3 positives, written in row groups of 3 rows
        pos = [f"d{i}-{j}" for j in range(1 + i % 3)]
        for k, v in (("query_id", f"q{i}"), ("query", f"query {i}"), ("positive_ids", pos),
                     ("positives", [f"text {d}" for d in pos]), ("positive_scores", [0.9] * len(pos)),
                     ("negative_ids", [f"n{i}"]), ("negatives", [f"neg {i}"]),
                     ("negative_scores", [0.1])):
            cols[k].append(v)
    url = str(tmp_path / "mined.parquet")
    storage.write_parquet(pa.table(cols), url, row_group_size=3)
    examples = expand(pa.table(cols))
    cfg = TrainConfig(batch_size=4, positives=positives, epochs=2, seed=5)  # type: ignore[arg-type]
    everything = list(epoch_batches(examples, cfg))
    for skip, steps in ((0, 3), (2, 5), (0, len(everything)), (len(everything) - 1, len(everything))):
        batches, rows_read = planned_batches(url, cfg, skip, steps)
        assert batches == everything[skip:steps]
        used = {e["query_id"] for b in batches for e in b}
        assert rows_read == len(used)  # one mined row per query here
    assert planned_batches(url, cfg, 0, 2)[1] <= 8 < 40
    # read_parquet_rows: any rows, in the order asked, of one file or of a folder of shards
    # (the mine stage's output: rows numbered across its files in name order)
    folder = tmp_path / "shards.parquet"
    for i, (a, b) in enumerate(((0, 7), (7, 22), (22, 40))):
        storage.write_parquet(pa.table(cols).slice(a, b - a), str(folder / f"part-0-{i:05d}.parquet"),
                              row_group_size=3)
    for rows in ([5, 0, 39, 6], [], [38, 2], [21, 7, 6, 22]):
        want = pa.table(cols).take(pa.array(rows, pa.int64()))
        assert storage.read_parquet_rows(url, rows).equals(want)
        assert storage.read_parquet_rows(str(folder), rows).equals(want)
    assert planned_batches(str(folder), cfg, 0, 3) == planned_batches(url, cfg, 0, 3)
