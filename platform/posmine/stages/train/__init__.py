"""The train stage: contrastive fine-tuning of the student on mined examples, on Ray Train.

Reads `<out>/mine/mined.parquet` (each worker reads it and expands it into one example per
(query, positive); the epoch plan, a seeded shuffle with at most one example per query in a
batch, is the same on every worker, which trains its slice of each global batch);
writes checkpoints under `<out>/train/ray/` every `checkpoint_every` steps, the exported model
in `<out>/train/model/` (safetensors, tokenizer, sentence-transformers pooling/normalise
configs: loadable by `transformers.AutoModel` and `sentence_transformers.SentenceTransformer`),
and a manifest. A worker that dies is restarted (`max_failures`) from the last checkpoint.

Each worker runs the one loop (`loop.fit`), as a plain process and Tune's trials do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

import posmine.terminal as terminal
from posmine.config import TrainConfig, absolute_path, config_hash, to_dict
from posmine.io import storage, tracking
from posmine.models.backbone import model_fingerprint, resolve_model
from posmine.stages import faults, lifecycle, remote
from posmine.stages.train.loop import StepTimer, fit, restore, save
from posmine.stages.train.plan import TeacherBound, attach_teacher, plan_counts, planned_batches
from posmine.stages.train.saving import model_files
from posmine.stages.train.trainer import StudentTrainer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- Ray Train


def _worker(config: dict[str, Any]) -> None:
    """A Ray Train worker: `_train`; after an error no retry can mend (a full disk, a forbidden
    folder) it ends without error and leaves the error in Ray's key-value store for the driver.
    A restart Ray Train makes all the same (its final checkpoint flush can fail after a failed
    upload) stops at that record without training."""
    import ray.train

    if _unfixable_seen(config["key"]) is not None:  # an earlier attempt's: stop at once
        return
    faults.hook("train", "start")
    try:
        _train(config)
    except OSError as e:
        if not storage.unfixable(e):
            raise
        _remember_unfixable(config["key"], storage.redact(str(e)))
        if ray.train.get_context().get_world_size() > 1:
            raise  # its peers wait in a collective: the restarted group stops at the flag above


def _flag(key: str) -> bytes:
    return f"posmine-train-unfixable-{key}".encode()


# Ray's key-value store is the one place every attempt's workers and the driver all reach,
# wherever they run, even with the output disk full.
def _unfixable_seen(key: str) -> str | None:
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(_flag(key))
    return value.decode() if value else None


def _remember_unfixable(key: str, message: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(_flag(key), message.encode(), overwrite=True)


def _forget_unfixable(key: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_flag(key))


@contextlib.contextmanager
def _naming(url: str) -> Iterator[None]:
    """An OSError in the block names `url`, where it was writing (pyarrow's errors name no path)."""
    try:
        yield
    except storage.StorageError:
        raise
    except OSError as e:
        raise storage.StorageError(f"{storage.redact(url)}: {e}") from e


def _stop_if_unfixable(name: str, key: str, target: str, cause: Exception | None = None) -> None:
    """Raise the error a worker left (see `_worker`), with the unfinished checkpoints gone."""
    if (unfixable := _unfixable_seen(key)) is None:
        return
    for url in _drop_unfinished_checkpoints(target):
        log.debug("train: removed the unfinished checkpoint %s", storage.redact(url))
    raise storage.StorageError(f"the {name} stage stopped: {unfixable}") from cause


def _drop_unfinished_checkpoints(target: str) -> list[str]:
    """Checkpoint folders under `<target>/ray` that an interrupted write left empty or with an
    empty weights file (Ray Train never registered them); removed, so that none looks like a
    state to resume from. Returns their URLs."""
    fs, root = storage.filesystem(storage.join(target, "ray"))
    dropped = []
    for folder in fs.glob(f"{root}/*/checkpoint_*"):
        files = fs.find(folder, detail=True)
        if not files or any(info["size"] == 0 for path, info in files.items()
                            if path.endswith(".safetensors")):
            fs.rm(folder, recursive=True)
            dropped.append(folder)
    return dropped


def _train(config: dict[str, Any]) -> None:
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
    restore(trainer, ray.train.get_checkpoint())
    if not fsdp:
        # every parameter that trains reaches the loss (BERT's pooler is dropped at load), so
        # DDP needs no extra pass over the graph looking for unused ones
        trainer.model = ray.train.torch.prepare_model(trainer.model)
    # Every worker builds the same seeded plan of global batches and trains its slice of each,
    # so a restart from step n continues with batch n + 1 on every worker.
    done_before, steps = trainer.step_no, config["steps"]
    # only the mined rows that steps done_before+1..steps use are read and expanded
    batches, _ = planned_batches(config["mined_url"], cfg, done_before, steps, world)
    if config["bound"] is not None:
        attach_teacher((r for b in batches for r in b), config["bound"])
    curve: list[list[float]] = []  # [step, mean loss of the last log_every steps]
    timer = StepTimer()
    tracker = (tracking.open_tracker(cfg.track, config["target"], config["out_dir"], to_dict(cfg),
                                     config["key"]) if rank == 0 else tracking.Tracker())

    def after_step(trainer: StudentTrainer, losses: list[float]) -> None:
        timer.tick(len(trainer.batch))  # the global batch
        if trainer.step_no % cfg.log_every == 0 or trainer.step_no == steps:
            curve.append([trainer.step_no, float(np.mean(losses[-cfg.log_every:]))])
            tracker.log(trainer.step_no, {"loss": curve[-1][1],
                                          "lr": trainer.scheduler.get_last_lr()[0]})
        _report(trainer, losses, steps, cfg, storage.join(config["target"], PROGRESS))

    with _naming(storage.join(config["target"], "ray")):  # where Ray Train writes checkpoints
        losses = fit(trainer, batches, steps, after_step, rank, world)
    tracker.close()
    masked = _sum_over_workers([trainer.masked[k] for k in ("hard", "in_batch", "in_batch_bound")])
    final = {"step": trainer.step_no, "loss": float(np.mean(losses[-10:] or [0.0])),
             "resumed_from": done_before, "steady_samples_per_s": timer.rate(), "done": 1,
             "masked_hard": masked[0], "masked_in_batch": masked[1],
             "masked_in_batch_bound": masked[2], "loss_curve": curve}
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
            save(trainer, d if is_rank0 else None)  # sharded: a collective every worker joins
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d)
                             if is_rank0 else None)
    elif step % cfg.log_every == 0:
        ray.train.report(metrics)


def run(cfg: TrainConfig, mined_dir: str, out_dir: str, upstream: str,
        name: str = "train", bound: TeacherBound | None = None) -> dict[str, Any]:
    """Fine-tune on `<mined_dir>/mined.parquet` with a TorchTrainer (skipped when current).

    `bound`: the teacher's embeddings and the mining rule, which `train.in_batch_bound=rule`
    holds in-batch negatives to (the pipeline passes the ones that mined `mined_dir`).
    """
    if cfg.in_batch_bound == "rule" and bound is None:
        raise ValueError("train.in_batch_bound=rule needs the teacher's embeddings and the mining "
                         "rule; run the train stage through the pipeline (posmine train)")
    bound = bound if cfg.in_batch_bound == "rule" else None
    # Ray Train runs workers in its own artifact folder: a relative path would land there.
    out_dir, mined_dir = absolute_path(out_dir), absolute_path(mined_dir)
    if bound is not None:
        bound = dataclasses.replace(bound, embed_dir=absolute_path(bound.embed_dir))
    target = storage.join(out_dir, name)
    # the starting weights too; tracking changes nothing the stage writes
    key = config_hash(dataclasses.replace(cfg, track="none"), model_fingerprint(cfg.model), upstream,
                      *([to_dict(bound.mining)] if bound is not None else []))

    def work() -> lifecycle.Done:
        resolve_model(cfg.model)  # a missing student folder fails here, not in every worker
        tracking.require(cfg.track)
        remote.ensure_ray()
        started = time.time()
        mined_url = storage.join(mined_dir, "mined.parquet")
        n_examples, n_queries, steps = remote.in_task(plan_counts, cfg, mined_url, cfg.num_workers)
        _forget_unfixable(key)  # a rerun after the disk was freed starts afresh
        _drop_unfinished_checkpoints(target)  # an earlier run's, killed mid-write
        try:
            metrics = _fit(cfg, key, target, {"cfg": cfg, "steps": steps, "mined_url": mined_url,
                                              "bound": bound,
                                              "model_dir": storage.join(target, "model"),
                                              "target": target, "out_dir": out_dir, "key": key})
        except Exception as e:  # several workers with no retry left fail the run instead
            _stop_if_unfixable(name, key, target, e)
            raise
        _stop_if_unfixable(name, key, target)
        ran = int(metrics.get("step", 0))
        return lifecycle.Done(
            {"examples": n_examples, "queries": n_queries, "steps": ran, "steps_planned": steps},
            stats={"final_loss": metrics.get("loss"), "resumed_from_step": metrics.get("resumed_from"),
                   "steady_samples_per_s": metrics.get("steady_samples_per_s"),
                   "samples_per_s": round(ran * cfg.batch_size * cfg.num_workers
                                          / max(time.time() - started, 1e-9), 3),
                   # labelled positives kept out of the loss (counted over the steps of the last
                   # attempt when a worker was restarted)
                   "masked_hard_negatives": metrics.get("masked_hard"),
                   "masked_in_batch_pairs": metrics.get("masked_in_batch"),
                   # in-batch pairs the teacher's bound left out besides (train.in_batch_bound)
                   "masked_in_batch_bound": metrics.get("masked_in_batch_bound"),
                   # the last attempt's steps (from resumed_from_step on after a restart)
                   "loss_curve": metrics.get("loss_curve", [])},
            extra={"model_dir": storage.join(target, "model"), "train": to_dict(cfg)},
            outputs=model_files(cfg))

    return lifecycle.run_stage(target, name, key, work)


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
