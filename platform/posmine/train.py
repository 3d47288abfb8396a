"""The train stage: contrastive fine-tuning of the student on mined examples, on Ray Train.

Reads `<out>/mine/mined.parquet` (streamed with Ray Data, one row per (query, positive));
writes checkpoints under `<out>/train/ray/` every `checkpoint_every` steps, the exported model
in `<out>/train/model/` (safetensors, tokenizer, sentence-transformers pooling/normalise
configs: loadable by `transformers.AutoModel` and `sentence_transformers.SentenceTransformer`),
and a manifest. A worker that dies is restarted (`max_failures`) from the last checkpoint.

`StudentTrainer` holds the loop body so that a plain torch loop (`train_plain`, used by the
benchmarks and as the reference) runs exactly the same steps without Ray.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from posmine import storage
from posmine.config import TrainConfig, config_hash, to_dict
from posmine.embed import pool, resolve_model
from posmine.losses import contrastive_loss

log = logging.getLogger(__name__)

Row = dict[str, Any]  # query, positive, negatives (list), scores ([s+] + negative scores)


def expand(batch: pa.Table | dict[str, Any]) -> list[Row]:
    """Mined rows -> one training row per (query, positive), negatives shared."""
    cols = batch.to_pydict() if isinstance(batch, pa.Table) else batch
    out = []
    for i in range(len(cols["query_id"])):
        for p, ps in zip(cols["positives"][i], cols["positive_scores"][i], strict=True):
            out.append({"query": cols["query"][i], "positive": p,
                        "negatives": list(cols["negatives"][i]),
                        "scores": [float(ps), *map(float, cols["negative_scores"][i])]})
    return out


def count_rows(mined_url: str) -> int:
    table = storage.read_parquet(mined_url, columns=["positive_ids"])
    return int(sum(len(p) for p in table.column("positive_ids").to_pylist()))


def total_steps(cfg: TrainConfig, rows: int) -> int:
    per_epoch = math.ceil(rows / cfg.num_workers / cfg.batch_size)
    steps = per_epoch * cfg.epochs
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


class StudentTrainer:
    """Model, tokenizer, optimiser and schedule; `step(rows)` does one update."""

    def __init__(self, cfg: TrainConfig, steps: int, device: torch.device) -> None:
        from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

        torch.manual_seed(cfg.seed)
        self.cfg, self.device, self.steps = cfg, device, steps
        path = resolve_model(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).to(device)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(cfg.warmup_ratio * steps), max(steps, 1))
        self.step_no = 0

    def _embed(self, texts: list[str], max_length: int) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt").to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            hidden = self.model(**enc).last_hidden_state  # (n, seq, d)
        return torch.nn.functional.normalize(pool(hidden, enc["attention_mask"],
                                                  self.cfg.pooling).float(), dim=-1)  # (n, d)

    def loss(self, rows: list[Row]) -> torch.Tensor:
        cfg, b, k = self.cfg, len(rows), self.cfg.num_negatives
        neg_mask = torch.tensor([[j < len(r["negatives"]) for j in range(k)] for r in rows],
                                dtype=torch.bool).reshape(b, k)  # (B, k); k = 0: in-batch only
        q = self._embed([cfg.query_prefix + r["query"] for r in rows], cfg.query_max_length)
        docs = [r["positive"] for r in rows] + [n for r in rows for n in r["negatives"][:k]]
        d = self._embed([cfg.passage_prefix + t for t in docs], cfg.passage_max_length)
        p = d[:b]  # (B, dim)
        n = d.new_zeros(b * k, d.shape[1])
        n[neg_mask.reshape(-1).to(self.device)] = d[b:]
        teacher = torch.tensor([(r["scores"] + [0.0] * k)[:1 + k] for r in rows], device=self.device)
        return contrastive_loss(q, p, n.reshape(b, k, d.shape[1]), neg_mask.to(self.device), teacher,
                                temperature=cfg.temperature,
                                in_batch_negatives=cfg.in_batch_negatives,
                                distill_weight=cfg.distill_weight)

    def step(self, rows: list[Row]) -> float:
        loss = self.loss(rows)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step_no += 1
        return float(loss.detach())

    # ---------------------------------------------------------------- state

    def unwrapped(self) -> Any:
        return getattr(self.model, "module", self.model)

    def save_state(self, directory: str) -> None:
        """Weights as safetensors; optimiser/schedule via torch.save of tensors and numbers."""
        self.unwrapped().save_pretrained(directory, safe_serialization=True)
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "step": self.step_no},
                   os.path.join(directory, "trainer_state.pt"))

    def load_state(self, directory: str) -> None:
        from safetensors.torch import load_file

        self.unwrapped().load_state_dict(load_file(os.path.join(directory, "model.safetensors")),
                                         strict=False)
        # weights_only: never unpickle arbitrary objects, even from our own checkpoints.
        state = torch.load(os.path.join(directory, "trainer_state.pt"), weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_no = int(state["step"])

    def export(self, directory: str) -> None:
        """A directory both transformers and sentence-transformers load."""
        export_model(self.unwrapped(), self.tokenizer, directory, self.cfg)


def export_model(model: Any, tokenizer: Any, directory: str, cfg: TrainConfig) -> None:
    d = Path(directory)
    model.save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    dim = int(model.config.hidden_size)
    (d / "1_Pooling").mkdir(exist_ok=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim, "pooling_mode_cls_token": cfg.pooling == "cls",
        "pooling_mode_mean_tokens": cfg.pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": cfg.pooling == "last", "include_prompt": True}, indent=2))
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


def batches(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    buf: list[Row] = []
    for r in rows:
        buf.append(r)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def epoch_batches(rows: list[Row], cfg: TrainConfig, skip: int = 0) -> Iterator[list[Row]]:
    """Batches of `rows`, reshuffled per epoch with the seed; the first `skip` are not built.

    The same order on every call, so a run restored at step n continues with batch n + 1.
    """
    seen = 0
    for epoch in range(cfg.epochs):
        order = np.random.default_rng(cfg.seed + epoch).permutation(len(rows))
        for start in range(0, len(rows), cfg.batch_size):
            seen += 1
            if seen > skip:
                yield [rows[i] for i in order[start:start + cfg.batch_size]]


def train_plain(cfg: TrainConfig, rows: list[Row], steps: int | None = None,
                device: str = "cpu") -> StudentTrainer:
    """The same loop without Ray: one process, rows shuffled per epoch with the seed."""
    steps = steps or total_steps(cfg, len(rows))
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
    torch.set_num_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) // ctx.get_world_size()))
    trainer = StudentTrainer(cfg, config["steps"], ray.train.torch.get_device())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.load_state(d)
    trainer.model = ray.train.torch.prepare_model(
        trainer.model, parallel_strategy_kwargs={"find_unused_parameters": True})
    shard = ray.train.get_dataset_shard("train")
    done_before, steps = trainer.step_no, config["steps"]
    per_epoch = max(1, math.ceil(config["rows"] / ctx.get_world_size() / cfg.batch_size))
    losses: list[float] = []
    timer = StepTimer()
    for epoch in range(done_before // per_epoch, cfg.epochs):
        it = shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow",
                                local_shuffle_buffer_size=4 * cfg.batch_size,
                                local_shuffle_seed=cfg.seed + epoch)
        for i, batch in enumerate(it):
            if epoch * per_epoch + i < done_before:
                continue  # done before a restart: skip without compute
            if trainer.step_no >= steps:
                break
            rows = batch.to_pylist()  # already one row per (query, positive): see `run`
            losses.append(trainer.step(rows))
            timer.tick(len(rows) * ctx.get_world_size())
            _report(trainer, losses, epoch, steps, cfg)
            crash_hook(trainer.step_no)
    final = {"step": trainer.step_no, "loss": float(np.mean(losses[-10:] or [0.0])),
             "resumed_from": done_before, "steady_samples_per_s": timer.rate(), "done": 1}
    with tempfile.TemporaryDirectory() as d:
        is_rank0 = ctx.get_world_rank() == 0
        if is_rank0:
            trainer.export(d)
            fs, path = storage.filesystem(config["model_dir"])
            storage.remove(config["model_dir"])
            fs.put(d.rstrip("/") + "/", path, recursive=True)
        # Ray Train keeps the metrics of checkpointed reports: the export is the last checkpoint.
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(d) if is_rank0 else None)


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


def _report(trainer: StudentTrainer, losses: list[float], epoch: int, steps: int,
            cfg: TrainConfig) -> None:
    import ray.train

    step = trainer.step_no
    metrics = {"step": step, "epoch": epoch, "loss": float(np.mean(losses[-cfg.log_every:])),
               "lr": trainer.scheduler.get_last_lr()[0]}
    if step % cfg.log_every == 0 and ray.train.get_context().get_world_rank() == 0:
        # Ray forwards worker stdout to the driver: the user's progress line.
        print(f"[posmine train] step {step}/{steps} epoch {epoch} loss {metrics['loss']:.4f} "
              f"lr {metrics['lr']:.2e}", flush=True)
    if step % cfg.checkpoint_every == 0 and step < steps:
        with tempfile.TemporaryDirectory() as d:
            is_rank0 = ray.train.get_context().get_world_rank() == 0
            if is_rank0:
                trainer.save_state(d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d)
                             if is_rank0 else None)
    elif step % cfg.log_every == 0:
        ray.train.report(metrics)


def run(cfg: TrainConfig, mined_dir: str, out_dir: str, upstream: str,
        name: str = "train") -> dict[str, Any]:
    """Fine-tune on `<mined_dir>/mined.parquet` with a TorchTrainer (skipped when current)."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    target = storage.join(out_dir, name)
    key = config_hash(cfg, upstream)
    if storage.is_done(target, key):
        return storage.read_manifest(target) or {}
    started = time.time()
    storage.begin_stage(target)
    mined_url = storage.join(mined_dir, "mined.parquet")
    rows = count_rows(mined_url)
    if rows == 0:
        raise ValueError(f"{storage.redact(mined_url)}: no training examples")
    steps = total_steps(cfg, rows)
    fs, path = storage.arrow_filesystem(mined_url)
    ds = ray.data.read_parquet(path, filesystem=fs).flat_map(lambda r: expand(
        {k: [v] for k, v in r.items()}))
    use_gpu = cfg.use_gpu == "always" or (cfg.use_gpu == "auto" and torch.cuda.is_available())
    ray_fs, ray_path = storage.arrow_filesystem(storage.join(target, "ray"))
    failure_kwargs: dict[str, Any] = {"max_failures": cfg.max_failures}
    if "controller_failure_limit" in inspect.signature(FailureConfig).parameters:  # Train v2
        failure_kwargs["controller_failure_limit"] = cfg.startup_retries
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg, "steps": steps, "rows": rows,
                           "model_dir": storage.join(target, "model")},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cfg.cpus_per_worker}),
        datasets={"train": ds},
        run_config=RunConfig(
            name=f"run-{key}", storage_path=ray_path, storage_filesystem=ray_fs,
            failure_config=FailureConfig(**failure_kwargs),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    return storage.commit_stage(target, name, key, rows={"examples": rows, "steps": steps},
                                started=started,
                                stats={"final_loss": metrics.get("loss"),
                                       "resumed_from_step": metrics.get("resumed_from"),
                                       "steady_samples_per_s": metrics.get("steady_samples_per_s"),
                                       "samples_per_s": round(steps * cfg.batch_size * cfg.num_workers
                                                              / max(time.time() - started, 1e-9), 3)},
                                extra={"model_dir": storage.join(target, "model"),
                                       "train": to_dict(cfg)})
