"""Training throughput: posmine (plain loop, Ray Train 1 and 2 workers, GradCache) vs
sentence-transformers' trainer with MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss,
same data, model, batch, lengths, in one run.

Steady-state samples/s exclude each run's first step (model warm-up). Without a mined folder
(`--mined`, the mining benchmark's output) the rows are SciFact train pairs with 4 negatives
drawn at random from the corpus: throughput depends on the texts' lengths, not on how the
negatives were chosen.

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
from posmine.config import TrainConfig
from posmine.io import storage
from posmine.models.backbone import resolve_model
from posmine.stages import remote
from posmine.stages.train import run
from posmine.stages.train.loop import StepTimer, train_plain
from posmine.stages.train.plan import epoch_batches, expand


def st_rate(rows: list[dict], cfg: TrainConfig, steps: int, cached_chunk: int = 0) -> float:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
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
                                   loss=CachedMultipleNegativesRankingLoss(
                                       model, scale=1 / cfg.temperature, mini_batch_size=cached_chunk)
                                   if cached_chunk else
                                   MultipleNegativesRankingLoss(model, scale=1 / cfg.temperature),
                                   callbacks=[Tick()]).train()
    return timer.rate()


def st_cached_rate(rows: list[dict], cfg: TrainConfig, steps: int, chunk: int) -> float:
    """ST's GradCache: CachedMultipleNegativesRankingLoss with mini_batch_size = chunk."""
    return st_rate(rows, cfg, steps, cached_chunk=chunk)


def plain_rate(rows: list[dict], cfg: TrainConfig, steps: int) -> float:
    timer = StepTimer()
    trainer = train_plain(cfg, rows[:cfg.batch_size], steps=1)  # loads the model
    for batch in list(epoch_batches(rows, cfg))[:steps]:
        trainer.step(batch)
        timer.tick(len(batch))
    return timer.rate()


def scifact_mined(out: str, n: int, seed: int = 0) -> str:
    """A mined.parquet of SciFact train pairs with 4 random corpus negatives each, in `out`."""
    import gzip
    import json
    import random

    import pyarrow as pa

    from posmine.config import default_beir_dir

    root = default_beir_dir("scifact")
    with gzip.open(f"{root}/corpus.jsonl.gz", "rt") as f:
        corpus = {d["_id"]: f"{d.get('title', '')} {d['text']}".strip() for d in map(json.loads, f)}
    with gzip.open(f"{root}/queries.jsonl.gz", "rt") as f:
        queries = {q["_id"]: q["text"] for q in map(json.loads, f)}
    with open(f"{root}/qrels/train.tsv") as f:
        pairs = [line.split("\t")[:2] for line in f.read().splitlines()[1:]]
    rng, ids = random.Random(seed), sorted(corpus)
    rows = []
    for q, d in pairs[:n]:
        negs = [i for i in rng.sample(ids, 5) if i != d][:4]
        rows.append({"query_id": q, "query": queries[q], "positive_ids": [d],
                     "positives": [corpus[d]], "positive_scores": [0.9],
                     "negative_ids": negs, "negatives": [corpus[i] for i in negs],
                     "negative_scores": [0.5] * 4})
    storage.write_parquet(pa.Table.from_pylist(rows), f"{out}/mined.parquet")
    return out


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
    p.add_argument("--chunk", type=int, default=8, help="GradCache chunk (ST: mini_batch_size)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = TrainConfig(batch_size=32, num_negatives=4, query_max_length=128, passage_max_length=128,
                      lr=3e-5, in_batch_negatives=True)
    if not os.path.exists(f"{a.mined}/mined.parquet"):
        a.mined = scifact_mined(tempfile.mkdtemp(prefix="posmine-bench-rows-"), 32 * (a.steps + 2))
    mined = storage.read_parquet(f"{a.mined}/mined.parquet")
    rows = [r for r in expand(mined) if len(r["negatives"]) >= cfg.num_negatives]
    rows = rows[:cfg.batch_size * a.steps]
    torch.set_num_threads(os.cpu_count() or 1)
    result = {"batch_size": cfg.batch_size, "negatives": cfg.num_negatives,
              "max_length": cfg.passage_max_length, "steps": a.steps,
              "data": a.mined,
              "st_samples_per_s": st_rate(rows, cfg, a.steps),
              f"st_cached_{a.chunk}_samples_per_s": st_cached_rate(rows, cfg, a.steps, a.chunk)}
    gc.collect()
    result["posmine_plain_samples_per_s"] = plain_rate(rows, cfg, a.steps)
    gc.collect()
    result[f"posmine_plain_grad_cache_{a.chunk}_samples_per_s"] = plain_rate(
        rows, dataclasses.replace(cfg, grad_cache_chunk=a.chunk), a.steps)
    gc.collect()
    remote.ensure_ray()
    for workers in (1, 2):
        result[f"posmine_ray_{workers}w_samples_per_s"] = ray_rate(a.mined, cfg, a.steps, workers)
    result["grad_cache_over_st_cached"] = round(
        result[f"posmine_plain_grad_cache_{a.chunk}_samples_per_s"]
        / result[f"st_cached_{a.chunk}_samples_per_s"], 3)
    result["plain_over_st"] = round(result["posmine_plain_samples_per_s"] / result["st_samples_per_s"], 3)
    result["posmine_over_st"] = round(result["posmine_ray_1w_samples_per_s"] / result["st_samples_per_s"], 3)
    result["ray_train_overhead"] = round(
        1 - result["posmine_ray_1w_samples_per_s"] / result["posmine_plain_samples_per_s"], 3)
    emit(result, a.json)


if __name__ == "__main__":
    main()
