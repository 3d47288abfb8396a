"""`StudentTrainer`: the student, its tokenizer, optimiser and schedule; one `step` is one update
of the contrastive loss (labelled positives masked, GradCache, gathering across workers, FSDP).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from posmine.config import TrainConfig
from posmine.core.losses import contrastive_loss, teacher_bound_mask
from posmine.models import backbone
from posmine.models.backbone import resolve_model
from posmine.stages.train.plan import Row
from posmine.stages.train.saving import export_model


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


def teacher_bound(rows: Sequence[Row], k: int) -> torch.Tensor:
    """`losses.teacher_bound_mask` of a batch whose rows carry the teacher's vectors and bound
    (`plan.attach_teacher`): (B, B * (1 + k)) bool."""
    if any("teacher_query" not in r for r in rows):
        raise ValueError("train.in_batch_bound=rule: the batch's rows carry no teacher vectors "
                         "(plan.attach_teacher gives them)")
    b, dim = len(rows), len(rows[0]["teacher_query"])
    docs = np.zeros((b, 1 + k, dim), np.float32)  # (B, 1+k, d)
    valid = np.zeros((b, 1 + k), bool)
    for i, r in enumerate(rows):
        n = min(1 + k, 1 + len(r["negatives"]))  # the positive and the negatives the loss uses
        docs[i, :n], valid[i, :n] = r["teacher_docs"][:n], True
    query = np.stack([r["teacher_query"] for r in rows]).astype(np.float32)  # (B, d)
    bound = np.array([r["bound"] for r in rows], np.float32)  # (B,)
    return teacher_bound_mask(*(torch.from_numpy(x) for x in (query, docs, valid, bound)))


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
        # Known positives masked out of the loss so far: as a hard negative, as an in-batch one;
        # and the in-batch pairs the teacher's bound masked besides (`train.in_batch_bound`).
        self.masked = {"hard": 0, "in_batch": 0, "in_batch_bound": 0}

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
        counted = not gathered or self.rank == 0  # a gathered batch is counted once, not per worker
        known = bounded = None
        if cfg.mask_known_positives:
            mask = known_positive_mask(rows, k)  # (B, B*(1+k))
            in_batch, hard = masked_counts(mask, k)
            if counted:
                self.masked["hard"] += hard
                self.masked["in_batch"] += in_batch if cfg.in_batch_negatives else 0
            known = torch.from_numpy(mask)
        if cfg.in_batch_bound == "rule" and cfg.in_batch_negatives:
            bounded = teacher_bound(rows, k)  # (B, B*(1+k))
            if counted:
                self.masked["in_batch_bound"] += int((bounded if known is None
                                                      else bounded & ~known).sum())
            bounded = bounded.to(self.device)
        return contrastive_loss(q, p, n.reshape(b, k, d.shape[1]), neg_mask.to(self.device), teacher,
                                temperature=cfg.temperature,
                                in_batch_negatives=cfg.in_batch_negatives,
                                distill_weight=cfg.distill_weight,
                                known_positives=None if known is None else known.to(self.device),
                                bounded=bounded)

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
