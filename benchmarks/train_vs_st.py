"""Training throughput: posmine (plain loop, Ray Train 1 and 2 workers) vs sentence-transformers'
trainer with MultipleNegativesRankingLoss, same mined data, model, batch, lengths, in one run.

Steady-state samples/s exclude each run's first step (model warm-up).

    python benchmarks/train_vs_st.py [--mined /tmp/posmine-bench-mine/mine] [--steps 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import shutil
import tempfile

import torch

from _common import emit
from posmine import pipeline, storage
from posmine.config import TrainConfig
from posmine.embed import resolve_model
from posmine.train import StepTimer, epoch_batches, expand, run, train_plain


def st_rate(rows: list[dict], cfg: TrainConfig, steps: int) -> float:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    k = cfg.num_negatives
    data = {"query": [r["query"] for r in rows], "positive": [r["positive"] for r in rows]}
    for i in range(k):
        data[f"negative_{i + 1}"] = [r["negatives"][i] for r in rows]
    model = SentenceTransformer(resolve_model("default"), device="cpu")
    model.max_seq_length = cfg.passage_max_length
    timer = StepTimer()

    class Tick(TrainerCallback):
        def on_step_end(self, *args: object, **kwargs: object) -> None:
            timer.tick(cfg.batch_size)

    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.batch_size, max_steps=steps,
            learning_rate=cfg.lr, warmup_ratio=cfg.warmup_ratio, save_strategy="no",
            report_to=[], logging_steps=1000, seed=cfg.seed, use_cpu=True,
            dataloader_drop_last=True)
        SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data),
                                   loss=MultipleNegativesRankingLoss(model, scale=1 / cfg.temperature),
                                   callbacks=[Tick()]).train()
    return timer.rate()


def plain_rate(rows: list[dict], cfg: TrainConfig, steps: int) -> float:
    timer = StepTimer()
    trainer = train_plain(cfg, rows[:cfg.batch_size], steps=1)  # loads the model
    for batch in list(epoch_batches(rows, cfg))[:steps]:
        trainer.step(batch)
        timer.tick(len(batch))
    return timer.rate()


def ray_rate(mined_dir: str, cfg: TrainConfig, steps: int, workers: int) -> float:
    out = tempfile.mkdtemp(prefix="posmine-bench-train-")
    try:
        # same global batch: each of n workers takes batch/n (and n times less activation memory)
        cfg = dataclasses.replace(cfg, num_workers=workers, max_steps=steps,
                                  batch_size=cfg.batch_size // workers,
                                  cpus_per_worker=0.5 if workers > 1 else 1.0,
                                  checkpoint_every=10_000, log_every=10_000)
        manifest = run(cfg, mined_dir, out, upstream="bench")
        return float(manifest["stats"]["steady_samples_per_s"])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mined", default="/tmp/posmine-bench-mine/mine")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = TrainConfig(batch_size=32, num_negatives=4, query_max_length=128, passage_max_length=128,
                      lr=3e-5, in_batch_negatives=True)
    mined = storage.read_parquet(f"{a.mined}/mined.parquet")
    rows = [r for r in expand(mined) if len(r["negatives"]) >= cfg.num_negatives]
    rows = rows[:cfg.batch_size * a.steps]
    torch.set_num_threads(os.cpu_count() or 1)
    result = {"batch_size": cfg.batch_size, "negatives": cfg.num_negatives,
              "max_length": cfg.passage_max_length, "steps": a.steps,
              "st_samples_per_s": st_rate(rows, cfg, a.steps),
              "posmine_plain_samples_per_s": plain_rate(rows, cfg, a.steps)}
    gc.collect()
    pipeline.ensure_ray()
    for workers in (1, 2):
        result[f"posmine_ray_{workers}w_samples_per_s"] = ray_rate(a.mined, cfg, a.steps, workers)
    result["posmine_over_st"] = round(result["posmine_ray_1w_samples_per_s"] / result["st_samples_per_s"], 3)
    result["ray_train_overhead"] = round(
        1 - result["posmine_ray_1w_samples_per_s"] / result["posmine_plain_samples_per_s"], 3)
    emit(result, a.json)


if __name__ == "__main__":
    main()
