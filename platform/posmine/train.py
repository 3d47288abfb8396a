"""The train stage: contrastive fine-tuning of the student on mined examples, on Ray Train.

Reads `<out>/mine/mined.parquet` (each worker reads it and expands it into one example per
(query, positive); the epoch plan, a seeded shuffle with at most one example per query in a
batch, is the same on every worker, which trains its slice of each global batch);
writes checkpoints under `<out>/train/ray/` every `checkpoint_every` steps, the exported model
in `<out>/train/model/` (safetensors, tokenizer, sentence-transformers pooling/normalise
configs: loadable by `transformers.AutoModel` and `sentence_transformers.SentenceTransformer`),
and a manifest. A worker that dies is restarted (`max_failures`) from the last checkpoint.

`StudentTrainer` holds the loop body so that a plain torch loop (`train_plain`, used by the
benchmarks and as the reference) runs exactly the same steps without Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from posmine import backbone, faults, remote, storage, terminal, tracking
from posmine.backbone import model_fingerprint, resolve_model
from posmine.config import TrainConfig, absolute_path, config_hash, to_dict
from posmine.losses import contrastive_loss
from posmine.mining import query_rng, text_hash

log = logging.getLogger(__name__)

# What an exported model folder must hold before the stage may say it is there.
MODEL_FILES = ("model/config.json", ("model/model.safetensors", "model/model.safetensors.index.json"),
               "model/tokenizer_config.json", "model/modules.json")

Row = dict[str, Any]  # query_id, query, positive, negatives, scores ([s+] + negatives'), hashes


def expand(batch: pa.Table | dict[str, Any]) -> list[Row]:
    """Mined rows -> one training example per (query, positive), negatives shared by a row's
    positives. Each example carries `mining.text_hash` of its positive and negatives, and the
    hashes of all the query's labelled positives (`known`), for masking in the loss."""
    cols = batch.to_pydict() if isinstance(batch, pa.Table) else batch
    n = len(cols["query_id"])
    # Columns that mined files of older versions (or hand-made rows) lack: None per row.
    known_col = cols.get("query_positive_hashes") or [None] * n
    pos_id_col = cols.get("positive_ids") or [[None] * len(p) for p in cols["positives"]]
    neg_id_col = cols.get("negative_ids") or [None] * n
    out = []
    for i in range(n):
        known = known_col[i]
        if known is None:  # mined before the column existed: the row's own positives
            known = [text_hash(t) for t in cols["positives"][i]]
        negatives = list(cols["negatives"][i])
        neg_hashes = [text_hash(t) for t in negatives]
        for pid, p, ps in zip(pos_id_col[i], cols["positives"][i], cols["positive_scores"][i],
                              strict=True):
            out.append({"query_id": cols["query_id"][i], "query": cols["query"][i],
                        "positive_id": pid, "positive": p, "negatives": negatives,
                        "negative_ids": neg_id_col[i],
                        "positive_hash": text_hash(p), "negative_hashes": neg_hashes,
                        "known": frozenset(known),
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


def known_positive_mask(rows: Sequence[Row], k: int) -> np.ndarray:
    """(B, B * (1 + k)) bool: batch document j is a labelled positive of query i (by id, or by
    equal normalised text), other than i's own positive (its label). Document j is row
    j // (1 + k)'s positive (slot 0) or its hard negative (slots 1..k); missing slots are False.
    """
    b = len(rows)
    doc = np.zeros((b, 1 + k), np.int64)
    valid = np.zeros((b, 1 + k), bool)
    for i, r in enumerate(rows):
        negs = r["negative_hashes"][:k]
        doc[i, 0], doc[i, 1:1 + len(negs)] = r["positive_hash"], negs
        valid[i, :1 + len(negs)] = True
    flat, flat_valid = doc.reshape(-1), valid.reshape(-1)
    known = np.stack([np.isin(flat, np.fromiter(r["known"], np.int64)) & flat_valid for r in rows])
    known[np.arange(b), np.arange(b) * (1 + k)] = False
    return known


def masked_counts(known: np.ndarray, k: int) -> tuple[int, int]:
    """(in-batch pairs masked, own hard negatives masked) in a `known_positive_mask`."""
    b = known.shape[0]
    own = known.reshape(b, b, 1 + k)[np.arange(b), np.arange(b)]  # (B, 1+k)
    return int(known.sum() - own.sum()), int(own.sum())


def _all_gather(local: torch.Tensor, sizes: list[int], rank: int) -> list[torch.Tensor]:
    """Every worker's (sizes[w], dim) tensor, this worker's being `local` itself (with its
    graph); the others arrive as constants. Padded to the largest, as all_gather needs."""
    most = max(sizes)
    padded = local.new_zeros(most, local.shape[1])
    padded[:len(local)] = local.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded)
    out = [p[:n] for p, n in zip(parts, sizes, strict=True)]
    out[rank] = local
    return out


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU (and this device's CUDA) RNG state, to replay a forward pass's dropout."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _rng_restored(state: tuple[torch.Tensor, torch.Tensor | None],
                  device: torch.device) -> Iterator[None]:
    """Run the block from `state`, then carry on from where the RNG was before it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


_PAD = ["."]  # a chunk embedded only to keep sharded workers' collectives in step


class StudentTrainer:
    """Model, tokenizer, optimiser and schedule; `step(rows)` does one update."""

    def __init__(self, cfg: TrainConfig, steps: int, device: torch.device) -> None:
        from transformers import AutoTokenizer

        torch.manual_seed(cfg.seed)
        self.cfg, self.device, self.steps = cfg, device, steps
        path = resolve_model(cfg.model)
        self.tokenizer = backbone.prepare_tokenizer(AutoTokenizer.from_pretrained(path))
        self.model = backbone.load_model(path)
        self.bidirectional = backbone.wants_bidirectional(self.model, cfg.attention)
        if self.bidirectional:
            backbone.make_bidirectional(self.model)
        if cfg.gradient_checkpointing:
            # non-reentrant: gradients reach LoRA adapters even though the inputs need none
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = self._adapted(self.model)
        self.model.to(device).train()
        self.sharded = False
        self._make_optimizer()
        self.step_no = 0
        dist = torch.distributed
        self.rank, self.world = ((dist.get_rank(), dist.get_world_size())
                                 if dist.is_available() and dist.is_initialized() else (0, 1))
        self.batch: list[Row] = []  # the global batch of the step in progress
        # Known positives masked out of the loss so far: as a hard negative, as an in-batch one.
        self.masked = {"hard": 0, "in_batch": 0}

    def _adapted(self, model: Any) -> Any:
        """`model` with `train.lora`'s adapters, or as it is when every weight trains."""
        lo = self.cfg.lora
        return model if lo is None else backbone.add_lora(model, lo.r, lo.alpha, lo.dropout,
                                                          lo.target_modules)

    def _make_optimizer(self) -> None:
        from transformers import get_linear_schedule_with_warmup

        cfg, steps = self.cfg, self.steps
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(cfg.warmup_ratio * steps), max(steps, 1))

    def shard(self) -> None:
        """FSDP2 over the process group: each transformer block (the model's `_no_split_modules`)
        and then the whole model become sharded units; the optimiser is rebuilt over the
        sharded parameters. Gradients are averaged as DDP averages them."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        blocks = set(getattr(inner, "_no_split_modules", None) or ())
        for module in self.model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.sharded = True
        self._make_optimizer()

    def _embed(self, texts: list[str], max_length: int, prefix: str) -> torch.Tensor:
        spec = backbone.EmbedSpec(self.cfg.pooling, max_length, prefix, self.cfg.pool_prefix,
                                  self.bidirectional)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            emb = backbone.embed(self.model, self.tokenizer, texts, spec, self.device)  # (n, d)
        return torch.nn.functional.normalize(emb.float(), dim=-1)  # (n, d)

    def texts(self, rows: list[Row]) -> tuple[list[str], list[str]]:
        """(queries, passages) of a batch, unprefixed: passages are each row's positive, then
        every row's hard negatives in row order."""
        k = self.cfg.num_negatives
        docs = [r["positive"] for r in rows] + [n for r in rows for n in r["negatives"][:k]]
        return [r["query"] for r in rows], docs

    def sides(self) -> tuple[tuple[int, str], tuple[int, str]]:
        """(max_length, prefix) of queries, then of passages."""
        cfg = self.cfg
        return (cfg.query_max_length, cfg.query_prefix), (cfg.passage_max_length, cfg.passage_prefix)

    def loss(self, rows: list[Row]) -> torch.Tensor:
        """The batch's loss in one pass (the graph of every text kept)."""
        queries, passages = self.texts(rows)
        (ql, qp), (pl, pp) = self.sides()
        q = self._embed(queries, ql, qp)  # (B, dim)
        d = self._embed(passages, pl, pp)  # (B + negatives, dim)
        return self.loss_from(rows, q, d)

    def loss_from(self, rows: list[Row], q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The loss from query embeddings (B, dim) and passage embeddings laid out as `texts`;
        with `gather_across_workers`, `rows` are this worker's and the loss is the global
        batch's (`self.batch`), over every worker's queries and passages."""
        gathered = self.world > 1 and self.cfg.gather_across_workers
        if gathered:
            rows, q, d = self._gathered(rows, q, d)
        cfg, b, k = self.cfg, len(rows), self.cfg.num_negatives
        neg_mask = torch.tensor([[j < len(r["negatives"]) for j in range(k)] for r in rows],
                                dtype=torch.bool).reshape(b, k)  # (B, k); k = 0: in-batch only
        p = d[:b]  # (B, dim)
        n = d.new_zeros(b * k, d.shape[1])
        n[neg_mask.reshape(-1).to(self.device)] = d[b:]
        teacher = torch.tensor([(r["scores"] + [0.0] * k)[:1 + k] for r in rows], device=self.device)
        known = None
        if cfg.mask_known_positives:
            mask = known_positive_mask(rows, k)  # (B, B*(1+k))
            in_batch, hard = masked_counts(mask, k)
            if not gathered or self.rank == 0:  # a gathered batch is counted once, not per worker
                self.masked["hard"] += hard
                self.masked["in_batch"] += in_batch if cfg.in_batch_negatives else 0
            known = torch.from_numpy(mask).to(self.device)
        return contrastive_loss(q, p, n.reshape(b, k, d.shape[1]), neg_mask.to(self.device), teacher,
                                temperature=cfg.temperature,
                                in_batch_negatives=cfg.in_batch_negatives,
                                distill_weight=cfg.distill_weight, known_positives=known)

    def _gathered(self, rows: list[Row], q: torch.Tensor,
                  d: torch.Tensor) -> tuple[list[Row], torch.Tensor, torch.Tensor]:
        """Every worker's (rows, queries (B, dim), passages laid out as `texts`) in rank order;
        this worker's embeddings keep their graph, the others' are constants."""
        k = self.cfg.num_negatives
        shards = [self.batch[w::self.world] for w in range(self.world)]  # as the loop splits it
        assert shards[self.rank] == rows, "rows are not this worker's slice of the batch"
        qs = _all_gather(q, [len(s) for s in shards], self.rank)
        ds = _all_gather(d, [len(s) + sum(len(r["negatives"][:k]) for r in s) for s in shards],
                         self.rank)
        positives = [x[:len(s)] for x, s in zip(ds, shards, strict=True)]
        negatives = [x[len(s):] for x, s in zip(ds, shards, strict=True)]
        return [r for s in shards for r in s], torch.cat(qs), torch.cat(positives + negatives)

    def backward(self, rows: list[Row]) -> torch.Tensor:
        """Fill the parameters' gradients for the batch; returns its loss (detached)."""
        if not self.cfg.grad_cache_chunk:
            loss = self.loss(rows)
            (loss * self.grad_scale).backward()
            return loss.detach()
        return self._grad_cache_backward(rows, self.cfg.grad_cache_chunk)

    @property
    def grad_scale(self) -> float:
        """Gathered, every worker's loss is the whole batch's and its backward gives the part of
        the gradient that flows through its own embeddings; DDP averages over workers, so
        scaling by the world size makes the average the sum: the whole gradient."""
        return float(self.world) if self.world > 1 and self.cfg.gather_across_workers else 1.0

    def _grad_cache_backward(self, rows: list[Row], chunk: int) -> torch.Tensor:
        """GradCache: the same gradients as `loss(rows).backward()`, holding one chunk's
        activations at a time.

        1. embed every chunk without the graph, keeping each chunk's RNG state (dropout);
        2. the loss over the whole batch from those embeddings, as leaves: its backward gives
           d loss / d embedding (B + passages, dim), cheap;
        3. per chunk, embed again with the graph and the same RNG state (so dropout masks
           match) and backpropagate the cached embedding gradient into the weights.
        """
        queries, passages = self.texts(rows)
        q_pieces, d_pieces = ([t[i:i + chunk] for i in range(0, len(t), chunk)] for t in (queries, passages))
        q_pieces, d_pieces = self._even(q_pieces), self._even(d_pieces)
        pieces = [(t, side) for ts, side in zip((q_pieces, d_pieces), self.sides(), strict=True) for t in ts]
        states, cached = [], []
        with torch.no_grad():
            for texts, side in pieces:
                states.append(_rng_state(self.device))
                cached.append(self._embed(texts, *side))  # (chunk, dim)
        real = [c for (t, _), c in zip(pieces, cached, strict=True) if t is not _PAD]
        nq = sum(t is not _PAD for t in q_pieces)  # real chunks of queries, then of passages
        q = torch.cat(real[:nq]).requires_grad_(True)
        d = torch.cat(real[nq:]).requires_grad_(True)
        loss = self.loss_from(rows, q, d)
        (loss * self.grad_scale).backward()
        assert q.grad is not None and d.grad is not None  # leaves of the loss just backpropagated
        real_grads = iter(torch.cat([q.grad, d.grad]).split([len(c) for c in real]))
        grads = [torch.zeros_like(c) if t is _PAD else next(real_grads)
                 for (t, _), c in zip(pieces, cached, strict=True)]
        for i, ((texts, side), state, grad) in enumerate(zip(pieces, states, grads, strict=True)):
            with _rng_restored(state, self.device), self._sync_grads(i == len(pieces) - 1):
                emb = self._embed(texts, *side)
                # d(emb . g)/d theta = g^T d emb/d theta: the chunk's share of d loss/d theta
                torch.dot(emb.reshape(-1), grad.reshape(-1)).backward()
        return loss.detach()

    def _even(self, pieces: list[list[str]]) -> list[list[str]]:
        """Sharded, every forward is a collective (it gathers each block's weights), so every
        worker must embed as many chunks: the ones with fewer add `_PAD` chunks, whose
        embeddings are dropped and whose gradient is zero."""
        if not self.sharded:
            return pieces
        most = torch.tensor([len(pieces)], dtype=torch.int64)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        return pieces + [_PAD] * (int(most.item()) - len(pieces))

    @contextlib.contextmanager
    def _sync_grads(self, last: bool) -> Iterator[None]:
        """DDP all-reduces and FSDP reduce-scatters once, with the last chunk's backward."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
            yield
            return
        no_sync = getattr(self.model, "no_sync", None)
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            yield

    def step(self, rows: list[Row], batch: list[Row] | None = None) -> float:
        """One update on `rows`; `batch` is the global batch they are this worker's slice of
        (needed with `gather_across_workers`)."""
        self.batch = batch if batch is not None else rows
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.backward(rows)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step_no += 1
        return float(loss)

    # ---------------------------------------------------------------- state

    def unwrapped(self) -> Any:
        return getattr(self.model, "module", self.model)

    def save_state(self, directory: str | None) -> None:
        """The trained weights (every weight, or the LoRA adapters alone) as safetensors;
        optimiser and schedule via torch.save of tensors and numbers. Sharded, every worker
        must call it (the full state is gathered); the one given a directory writes."""
        from safetensors.torch import save_file

        weights, optimizer = self.trainable_state(), self._optimizer_state()
        if directory is None:
            return
        save_file(weights, os.path.join(directory, STATE_WEIGHTS))
        torch.save({"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                    "step": self.step_no}, os.path.join(directory, "trainer_state.pt"))

    def full_state(self) -> dict[str, torch.Tensor]:
        """{name: tensor} of every weight of the sharded model, gathered to rank 0 on the CPU (the
        others get {}): a collective every worker calls."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))
        return {n: t for n, t in full.items() if isinstance(t, torch.Tensor)}

    def trainable_names(self) -> set[str]:
        return {n for n, p in self.unwrapped().named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """{name: tensor} of the weights that train, on the CPU (copies: safetensors refuses
        shared memory); sharded, gathered to rank 0 as `full_state`."""
        if not self.sharded:  # the adapters alone, not a copy of a 7B base on every checkpoint
            return {n: p.detach().cpu().clone().contiguous()
                    for n, p in self.unwrapped().named_parameters() if p.requires_grad}
        names = self.trainable_names()
        return {n: t.clone().contiguous() for n, t in self.full_state().items() if n in names}

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))

    def load_state(self, directory: str) -> None:
        from safetensors.torch import load_file

        saved = load_file(os.path.join(directory, STATE_WEIGHTS))
        want = self.trainable_names()
        # a checkpoint missing a trained weight, or holding one the model lacks, is not ours
        if set(saved) != want:
            odd = sorted(set(saved) ^ want)[:3]
            raise ValueError(f"checkpoint {directory}: its weights do not match the model's "
                             f"trainable ones (e.g. {odd}); another model or LoRA setting?")
        # weights_only: never unpickle arbitrary objects, even from our own checkpoints.
        state = torch.load(os.path.join(directory, "trainer_state.pt"), weights_only=True)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            full = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, dict(saved.items()), options=full)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=full)
        else:
            self.unwrapped().load_state_dict(saved, strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_no = int(state["step"])

    def export(self, directory: str | None) -> None:
        """A directory both transformers and sentence-transformers load. With LoRA the adapter
        is merged into the base weights (this trainer's model is then the merged one), or saved
        alone with `export_adapter`. Sharded, every worker calls it; the one given a directory
        writes, from an unsharded copy of the gathered weights."""
        model = self.unwrapped()
        if self.sharded:
            full = self.full_state()
            if directory is None:
                return
            model = self.unsharded_copy(full)
        elif directory is None:
            return
        if self.cfg.lora is not None and not self.cfg.export_adapter:
            model = model.merge_and_unload()
            if not self.sharded:
                self.model = model
        export_model(model, self.tokenizer, directory, self.cfg, self.bidirectional)

    def unsharded_copy(self, full: dict[str, torch.Tensor]) -> Any:
        """The student as built at the start (base weights, adapters) holding `full`."""
        model = self._adapted(backbone.load_model(resolve_model(self.cfg.model)))
        model.load_state_dict(full)
        return model


STATE_WEIGHTS = "trainable.safetensors"  # in each checkpoint


def model_files(cfg: TrainConfig) -> tuple[str | tuple[str, ...], ...]:
    """What an exported model folder must hold before the stage may say it is there."""
    if cfg.export_adapter:
        return ("model/adapter_config.json", "model/adapter_model.safetensors",
                "model/tokenizer_config.json", "model/modules.json")
    return MODEL_FILES


def export_model(model: Any, tokenizer: Any, directory: str, cfg: TrainConfig,
                 bidirectional: bool = False) -> None:
    d = Path(directory)
    model.save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    if bidirectional and not cfg.export_adapter:
        write_bidirectional_code(d, type(model).__name__)
    dim = backbone.hidden_size(model)
    (d / "1_Pooling").mkdir(exist_ok=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim, "pooling_mode_cls_token": cfg.pooling == "cls",
        "pooling_mode_mean_tokens": cfg.pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": cfg.pooling == "last", "include_prompt": cfg.pool_prefix},
        indent=2))
    (d / "2_Normalize").mkdir(exist_ok=True)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}], indent=2))
    (d / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": cfg.export_max_length, "do_lower_case": False}, indent=2))
    (d / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": cfg.query_prefix, "document": cfg.passage_prefix},
        "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2))


BIDIRECTIONAL_CODE = '''"""{base} without its causal mask, as posmine fine-tuned it (attention:
bidirectional). Written by posmine; load with trust_remote_code=True (transformers,
sentence-transformers)."""

import torch
from transformers import {base} as _Base
from transformers.masking_utils import create_bidirectional_mask


class BidirectionalModel(_Base):
    def __init__(self, config):
        super().__init__(config)
        for module in self.modules():  # flash attention reads the flag
            if getattr(module, "is_causal", False):
                module.is_causal = False

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        if attention_mask.ndim == 2:  # padding alone: every token sees every other
            stub = torch.empty(*attention_mask.shape, 1, dtype=self.dtype, device=attention_mask.device)
            full = create_bidirectional_mask(config=self.config, inputs_embeds=stub,
                                             attention_mask=attention_mask,
                                             allow_is_bidirectional_skip=False)
            if isinstance(full, torch.Tensor):
                attention_mask = full
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
'''


def write_bidirectional_code(d: Path, base: str) -> None:
    """A decoder trained bidirectionally is only that model with its mask removed: ship the few
    lines that remove it (`auto_map`, as NV-Embed and NeMo AutoModel's exports do), and mark the
    config so posmine's `attention=auto` removes it too."""
    (d / "modeling_posmine.py").write_text(BIDIRECTIONAL_CODE.format(base=base))
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_posmine.BidirectionalModel"}
    config[backbone.BIDIRECTIONAL_KEY] = True
    (d / "config.json").write_text(json.dumps(config, indent=2))


def train_plain(cfg: TrainConfig, rows: list[Row], steps: int | None = None,
                device: str = "cpu") -> StudentTrainer:
    """The same loop without Ray: one process, rows shuffled per epoch with the seed."""
    steps = steps or total_steps(cfg, rows)
    trainer = StudentTrainer(cfg, steps, torch.device(device))
    for batch in epoch_batches(rows, cfg):
        if trainer.step_no >= steps:
            break
        trainer.step(batch)
    return trainer


# ---------------------------------------------------------------- Ray Train


def _worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) // world))
    trainer = StudentTrainer(cfg, config["steps"], ray.train.torch.get_device())
    fsdp = cfg.strategy == "fsdp" and world > 1
    if fsdp:
        trainer.shard()  # before loading: the optimiser state is restored into the sharded one
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.load_state(d)
    if not fsdp:
        # every parameter that trains reaches the loss (BERT's pooler is dropped at load), so
        # DDP needs no extra pass over the graph looking for unused ones
        trainer.model = ray.train.torch.prepare_model(trainer.model)
    # Every worker builds the same seeded plan of global batches and trains its slice of each,
    # so a restart from step n continues with batch n + 1 on every worker.
    done_before, steps = trainer.step_no, config["steps"]
    # only the mined rows that steps done_before+1..steps use are read and expanded
    batches, _ = planned_batches(config["mined_url"], cfg, done_before, steps, world)
    losses: list[float] = []
    curve: list[list[float]] = []  # [step, mean loss of the last log_every steps]
    timer = StepTimer()
    tracker = (tracking.open_tracker(cfg.track, config["target"], config["out_dir"], to_dict(cfg),
                                     config["key"]) if rank == 0 else tracking.Tracker())
    for batch in batches:
        losses.append(trainer.step(batch[rank::world], batch))
        timer.tick(len(batch))
        if trainer.step_no % cfg.log_every == 0 or trainer.step_no == steps:
            curve.append([trainer.step_no, float(np.mean(losses[-cfg.log_every:]))])
            tracker.log(trainer.step_no, {"loss": curve[-1][1],
                                          "lr": trainer.scheduler.get_last_lr()[0]})
        _report(trainer, losses, steps, cfg, storage.join(config["target"], PROGRESS))
        crash_hook(trainer.step_no)
        faults.trace("train", trainer.step_no)
    tracker.close()
    masked = _sum_over_workers([trainer.masked["hard"], trainer.masked["in_batch"]])
    final = {"step": trainer.step_no, "loss": float(np.mean(losses[-10:] or [0.0])),
             "resumed_from": done_before, "steady_samples_per_s": timer.rate(), "done": 1,
             "masked_hard": masked[0], "masked_in_batch": masked[1], "loss_curve": curve}
    with tempfile.TemporaryDirectory() as d:
        trainer.export(d if rank == 0 else None)  # sharded: a collective every worker joins
        if rank == 0:
            storage.put_tree(d, config["model_dir"])
        # Ray Train keeps the metrics of checkpointed reports: the export is the last checkpoint.
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def _sum_over_workers(values: list[int]) -> list[int]:
    """Counts summed over the DDP workers (as they are with one worker)."""
    t = torch.tensor(values, dtype=torch.int64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)  # gloo and NCCL both sum int64 on CPU/GPU tensors
    return [int(v) for v in t.tolist()]


class StepTimer:
    """Samples per second over all steps but the first (which pays for warm-up)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.samples = 0

    def tick(self, samples: int) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        else:
            self.samples += samples
        self.end = time.perf_counter()

    def rate(self) -> float:
        if self.start is None or self.samples == 0:
            return 0.0
        return round(self.samples / (self.end - self.start), 3)


def crash_hook(step: int) -> None:
    """Fault injection for tests: kill this worker once at step POSMINE_CRASH_AT_STEP.

    The marker file makes it fire on the first attempt only, like a real one-off failure.
    """
    at, marker = os.environ.get("POSMINE_CRASH_AT_STEP"), os.environ.get("POSMINE_CRASH_MARKER")
    if at and marker and step == int(at) and not os.path.exists(marker):
        Path(marker).touch()
        # Ray Train registers a reported checkpoint asynchronously; give the last one time to
        # land, so the test asserts resume-from-checkpoint rather than a race.
        time.sleep(3)
        os.kill(os.getpid(), 9)


PROGRESS = "_progress.json"  # rank 0's last step and loss, which the driver's bar reads


def _report(trainer: StudentTrainer, losses: list[float], steps: int, cfg: TrainConfig,
            progress_url: str) -> None:
    import ray.train

    step = trainer.step_no
    metrics = {"step": step, "loss": float(np.mean(losses[-cfg.log_every:])),
               "lr": trainer.scheduler.get_last_lr()[0]}
    if (step % cfg.log_every == 0 or step == steps) and ray.train.get_context().get_world_rank() == 0:
        # The worker's own line (Ray's logs, or the terminal with -v); the driver's progress
        # bar reads the file, which reaches it from any node through the output folder.
        print(f"[posmine train] step {step}/{steps} loss {metrics['loss']:.4f} "
              f"lr {metrics['lr']:.2e}", flush=True)
        with contextlib.suppress(OSError):  # progress is for the eye: never fail a step on it
            storage.write_json(progress_url, {**metrics, "steps": steps})
    if step % cfg.checkpoint_every == 0 and step < steps:
        with tempfile.TemporaryDirectory() as d:
            is_rank0 = ray.train.get_context().get_world_rank() == 0
            trainer.save_state(d if is_rank0 else None)  # sharded: a collective every worker joins
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d)
                             if is_rank0 else None)
    elif step % cfg.log_every == 0:
        ray.train.report(metrics)


def run(cfg: TrainConfig, mined_dir: str, out_dir: str, upstream: str,
        name: str = "train") -> dict[str, Any]:
    """Fine-tune on `<mined_dir>/mined.parquet` with a TorchTrainer (skipped when current)."""
    # Ray Train runs workers in its own artifact folder: a relative path would land there.
    out_dir, mined_dir = absolute_path(out_dir), absolute_path(mined_dir)
    target = storage.join(out_dir, name)
    # the starting weights too; tracking changes nothing the stage writes
    key = config_hash(dataclasses.replace(cfg, track="none"), model_fingerprint(cfg.model), upstream)

    def work() -> storage.Done:
        resolve_model(cfg.model)  # a missing student folder fails here, not in every worker
        tracking.require(cfg.track)
        remote.ensure_ray()
        started = time.time()
        mined_url = storage.join(mined_dir, "mined.parquet")
        n_examples, n_queries, steps = remote.in_task(plan_counts, cfg, mined_url, cfg.num_workers)
        metrics = _fit(cfg, key, target, {"cfg": cfg, "steps": steps, "mined_url": mined_url,
                                          "model_dir": storage.join(target, "model"),
                                          "target": target, "out_dir": out_dir, "key": key})
        ran = int(metrics.get("step", 0))
        return storage.Done(
            {"examples": n_examples, "queries": n_queries, "steps": ran, "steps_planned": steps},
            stats={"final_loss": metrics.get("loss"), "resumed_from_step": metrics.get("resumed_from"),
                   "steady_samples_per_s": metrics.get("steady_samples_per_s"),
                   "samples_per_s": round(ran * cfg.batch_size * cfg.num_workers
                                          / max(time.time() - started, 1e-9), 3),
                   # labelled positives kept out of the loss (counted over the steps of the last
                   # attempt when a worker was restarted)
                   "masked_hard_negatives": metrics.get("masked_hard"),
                   "masked_in_batch_pairs": metrics.get("masked_in_batch"),
                   # the last attempt's steps (from resumed_from_step on after a restart)
                   "loss_curve": metrics.get("loss_curve", [])},
            extra={"model_dir": storage.join(target, "model"), "train": to_dict(cfg)},
            outputs=model_files(cfg))

    return storage.run_stage(target, name, key, work)


def _fit(cfg: TrainConfig, key: str, target: str, loop_config: dict[str, Any]) -> dict[str, Any]:
    """One TorchTrainer run of `_worker`; the final metrics rank 0 reported."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = cfg.use_gpu == "always" or (cfg.use_gpu == "auto" and torch.cuda.is_available())
    ray_fs, ray_path = storage.arrow_filesystem(storage.join(target, "ray"))
    failure_kwargs: dict[str, Any] = {"max_failures": cfg.max_failures}
    if "controller_failure_limit" in inspect.signature(FailureConfig).parameters:  # Train v2
        failure_kwargs["controller_failure_limit"] = cfg.startup_retries
    trainer = TorchTrainer(
        _worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=f"run-{key}", storage_path=ray_path, storage_filesystem=ray_fs,
            failure_config=FailureConfig(**failure_kwargs),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    steps = int(loop_config["steps"])
    with terminal.watch(storage.join(target, PROGRESS), steps, "train", "step"):
        return dict(trainer.fit().metrics or {})
