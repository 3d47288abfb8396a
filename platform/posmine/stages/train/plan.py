"""The training plan: mined rows expanded into one example per (query, positive), and the
seeded epoch plan of global batches (at most one example per query in a batch) that every worker
builds alike, so a restart from step n goes on with batch n + 1 everywhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from posmine.config import MiningConfig, TrainConfig
from posmine.core.mining import anchors, query_rng, rule_threshold, text_hash
from posmine.io import storage
from posmine.io.vectors import vectors_for

Row = dict[str, Any]  # query_id, query, positive, negatives, scores ([s+] + negatives'), hashes


@dataclass(frozen=True)
class TeacherBound:
    """`train.in_batch_bound=rule`: the teacher's embeddings (the embed stage's folder) and the
    mining rule whose bound in-batch negatives are held to."""

    embed_dir: str
    mining: MiningConfig


def expand(batch: pa.Table | dict[str, Any]) -> list[Row]:
    """Mined rows -> one training example per (query, positive), negatives shared by a row's
    positives. Each example carries `mining.text_hash` of its positive and negatives, and the
    hashes of all the query's labelled positives (`known`), for masking in the loss."""
    cols = batch.to_pydict() if isinstance(batch, pa.Table) else batch
    n = len(cols["query_id"])
    # Columns that rows made by hand (a test's, a user's) may lack: None per row.
    known_col = cols.get("query_positive_hashes") or [None] * n
    pos_id_col = cols.get("positive_ids") or [[None] * len(p) for p in cols["positives"]]
    neg_id_col = cols.get("negative_ids") or [None] * n
    out = []
    for i in range(n):
        known = known_col[i]
        if known is None:  # not given: the row's own positives
            known = [text_hash(t) for t in cols["positives"][i]]
        negatives = list(cols["negatives"][i])
        neg_hashes = [text_hash(t) for t in negatives]
        for pid, p, ps in zip(pos_id_col[i], cols["positives"][i], cols["positive_scores"][i],
                              strict=True):
            out.append({"query_id": cols["query_id"][i], "query": cols["query"][i],
                        "positive_id": pid, "positive": p, "negatives": negatives,
                        "negative_ids": neg_id_col[i],
                        "positive_hash": text_hash(p), "negative_hashes": neg_hashes,
                        "known": frozenset(known), "anchor_ids": pos_id_col[i],
                        "scores": [float(ps), *map(float, cols["negative_scores"][i])]})
    return out


def pack(order: Iterable[int], query_of: Sequence[str], size: int) -> list[list[int]]:
    """Batches of `size` in `order`, each example put in the first open batch without its query.

    A batch never holds two examples of one query (their positives would be each other's
    in-batch negatives); examples a full batch refuses wait for the next one, so the order
    stays close to `order`. The last batches may be smaller.
    """
    done: list[list[int]] = []
    open_: list[tuple[list[int], set[str]]] = []
    for i in order:
        q = query_of[i]
        slot = next((b for b in open_ if q not in b[1]), None)
        if slot is None:
            slot = ([], set())
            open_.append(slot)
        slot[0].append(i)
        slot[1].add(q)
        if len(slot[0]) == size:
            done.append(slot[0])
            open_.remove(slot)
    return done + [b for b, _ in open_]


def epoch_plan(examples: Sequence[Row], cfg: TrainConfig, epoch: int, world: int = 1) -> list[list[int]]:
    """Global batches (`batch_size * world` examples, indices into `examples`) of one epoch.

    A seeded shuffle of the whole set each epoch. `positives=sample` takes one example per
    query, its positive drawn without replacement across epochs: each query walks a seeded
    permutation of its positives (epoch e takes entry e mod P), so P epochs see every positive
    once, as NeMo AutoModel's `cycle_positive_docs` does in file order. `all` takes them all.
    A last batch too small to give every worker a row is left out.
    """
    query_of = [e["query_id"] for e in examples]
    rng = np.random.default_rng([cfg.seed, epoch])
    if cfg.positives == "sample":
        by_query: dict[str, list[int]] = {}
        for i, q in enumerate(query_of):
            by_query.setdefault(q, []).append(i)
        chosen = [idx[int(query_rng(cfg.seed, q).permutation(len(idx))[epoch % len(idx)])]
                  for q, idx in sorted(by_query.items())]
        order = [chosen[j] for j in rng.permutation(len(chosen))]
    else:
        order = [int(j) for j in rng.permutation(len(examples))]
    return [b for b in pack(order, query_of, cfg.batch_size * world) if len(b) >= world]


def epoch_batches(examples: Sequence[Row], cfg: TrainConfig, skip: int = 0,
                  world: int = 1) -> Iterator[list[Row]]:
    """Global batches over all epochs; the first `skip` are not built.

    The same order on every call, so a run restored at step n continues with batch n + 1.
    """
    for batch in index_batches(examples, cfg, skip, world):
        yield [examples[i] for i in batch]


def index_batches(examples: Sequence[Row], cfg: TrainConfig, skip: int = 0,
                  world: int = 1) -> Iterator[list[int]]:
    """`epoch_batches` as indices into `examples` (which need only their `query_id`)."""
    seen = 0
    for epoch in range(cfg.epochs):
        for batch in epoch_plan(examples, cfg, epoch, world):
            seen += 1
            if seen > skip:
                yield batch


def plan_examples(mined_url: str) -> list[Row]:
    """One `{"query_id", "row", "positive"}` per training example (as `expand` orders them),
    read from two light columns: enough to plan every epoch's batches."""
    light = storage.read_parquet(mined_url, columns=["query_id", "positive_scores"])
    return [{"query_id": q, "row": r, "positive": j}
            for r, (q, ps) in enumerate(zip(light.column("query_id").to_pylist(),
                                            light.column("positive_scores").to_pylist(), strict=True))
            for j in range(len(ps))]


def planned_batches(mined_url: str, cfg: TrainConfig, skip: int, steps: int,
                    world: int = 1) -> tuple[list[list[Row]], int]:
    """The global batches of steps skip+1..steps, expanded from only the mined rows they use
    (read by row group); and how many mined rows were read."""
    plan = plan_examples(mined_url)
    batches = list(itertools.islice(index_batches(plan, cfg, skip, world), max(0, steps - skip)))
    needed = sorted({plan[i]["row"] for b in batches for i in b})
    table = storage.read_parquet_rows(mined_url, needed)  # rows in `needed` order
    full = expand(table)
    at: dict[tuple[int, int], Row] = {}
    k = 0
    # expand() lists each row's positives in order, row after row
    for r, ps in zip(needed, table.column("positive_scores").to_pylist(), strict=True):
        for j in range(len(ps)):
            at[r, j] = full[k]
            k += 1
    return [[at[plan[i]["row"], plan[i]["positive"]] for i in b] for b in batches], len(needed)


def total_steps(cfg: TrainConfig, examples: Sequence[Row], world: int = 1) -> int:
    """Optimiser steps the run will take: batches over all epochs, capped by `max_steps`."""
    steps = 0
    for e in range(cfg.epochs):
        steps += len(epoch_plan(examples, cfg, e, world))
        if cfg.max_steps and steps >= cfg.max_steps:  # no need to plan the epochs never run
            return cfg.max_steps
    return steps


def plan_counts(cfg: TrainConfig, mined_url: str, world: int) -> tuple[int, int, int]:
    """(examples, queries, steps) of the mined data: run as a Ray task by `run`, so the
    driver never holds a plan of every example (memory that grows with the data)."""
    examples = plan_examples(mined_url)  # query ids only: the texts stay on storage
    if not examples:
        raise ValueError(f"{storage.redact(mined_url)}: no training examples")
    return len(examples), len({e["query_id"] for e in examples}), total_steps(cfg, examples, world)


def attach_teacher(rows: Iterable[Row], bound: TeacherBound) -> None:
    """Give each example (in place) the teacher's vectors of its query (`teacher_query`, (d,))
    and of its positive and negatives (`teacher_docs`, (1 + n, d)), and its `bound`: the mining
    rule's threshold on the anchor, scored from those vectors as `mining.anchors` takes it (the
    example's own positive with anchor=pair, else the mined row's positives)."""
    rows = list({id(r): r for r in rows}.values())  # an example recurs across epochs
    if any(r.get("positive_id") is None or r.get("negative_ids") is None for r in rows):
        raise ValueError("train.in_batch_bound=rule needs the mined rows' document ids "
                         "(positive_ids, negative_ids), which these rows lack")
    docs = {d for r in rows for d in (*r["anchor_ids"], *r["negative_ids"])}
    qvec = vectors_for(storage.join(bound.embed_dir, "queries"), {r["query_id"] for r in rows})
    dvec = vectors_for(storage.join(bound.embed_dir, "corpus"), docs)
    for r in rows:
        if r["query_id"] not in qvec:
            raise ValueError(f"{storage.redact(bound.embed_dir)}: no teacher vector for query "
                             f"{r['query_id']!r}")
        if missing := next((d for d in (*r["anchor_ids"], *r["negative_ids"]) if d not in dvec), None):
            raise ValueError(f"{storage.redact(bound.embed_dir)}: no teacher vector for document "
                             f"{missing!r} (query {r['query_id']!r})")
        q = qvec[r["query_id"]]  # (d,)
        scores = np.stack([dvec[d] for d in r["anchor_ids"]]) @ q  # (P,)
        s_plus = (float(scores[r["anchor_ids"].index(r["positive_id"])])
                  if bound.mining.anchor == "pair" else anchors(scores, bound.mining.anchor)[0][1])
        r["teacher_query"] = q
        r["teacher_docs"] = np.stack([dvec[d] for d in (r["positive_id"], *r["negative_ids"])])
        r["bound"] = float(rule_threshold(np.array([s_plus]), bound.mining)[0])
