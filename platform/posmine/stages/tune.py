"""The tune stage: a Ray Tune search over mining settings, scored on dev.

The driver embeds the corpus with the teacher and retrieves candidates once; every trial
then only filters those candidates with its own `mining` setting (the mine stage), trains
the student on the result for `train.epochs`/`train.max_steps` and reports the dev metric
`tune.evals_per_trial` times, so that ASHA can stop weak trials early. The objective split
is the dataset's dev qrels, or a seeded hold-out of train (`data.dev_fraction`) when there is
none; the test split is never read.

Writes `<out>/tune/<hash>/`: `results.csv` and `results.parquet` (one row per trial),
`best.yaml` (a config `posmine run` takes), `metric_vs_param.png`, the Tune experiment under
`ray/` (restored when the same command runs again) and a manifest.

Each trial trains in one process with `tune.cpus_per_trial` / `tune.gpus_per_trial`; the
multi-worker Ray Train path is for the final `posmine run` of the best setting.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import yaml

import posmine.report as report
from posmine.config import (
    Config,
    ConfigError,
    MiningConfig,
    TeacherConfig,
    TuneConfig,
    config_hash,
    from_dict,
    resolve_paths,
    to_dict,
)
from posmine.io import prepared, storage, tracking
from posmine.models.encoder import Encoder, pick_device
from posmine.stages import evaluate, lifecycle, remote
from posmine.stages import mine as mine_stage
from posmine.stages.evaluate import qrels_dict
from posmine.stages.train.loop import fit, restore, save
from posmine.stages.train.plan import TeacherBound, attach_teacher, epoch_batches, expand, total_steps
from posmine.stages.train.trainer import StudentTrainer

log = logging.getLogger(__name__)

# The parameter each rule is tuned by: the x axis of the plot.
RULE_PARAM = {"topk_percpos": "perc", "topk_marginpos": "margin", "topk_abs": "threshold",
              "topk_shifted": "shift", "naive_topk": None}
# Table columns taken from each trial's mining setting.
MINING_COLUMNS = ("rule", "anchor", "perc", "margin", "threshold", "shift", "num_negatives", "top_k",
                  "sampling", "sample_from")


# ---------------------------------------------------------------- the search space


def param_space(cfg: TuneConfig) -> dict[str, Any]:
    """The YAML arms as a Tune space: `{"mining": grid_search([arm, ...])}`.

    Tune resolves domains nested inside grid values, so an arm's `uniform` is drawn for that
    arm only and a rule never carries another rule's parameter.
    """
    from ray import tune

    def domain(value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        kind, args = next(iter(value.items()))
        if kind == "grid":
            return tune.grid_search(list(args))
        if kind == "choice":
            return tune.choice(list(args))
        if kind == "uniform":
            return tune.uniform(float(args[0]), float(args[1]))
        return tune.randint(int(args[0]), int(args[1]) + 1)  # randint: YAML bounds inclusive

    arms = [{k: domain(v) for k, v in arm.items()} for arm in cfg.space]
    return {"mining": tune.grid_search(arms)}


def trial_mining(base: MiningConfig, chosen: Mapping[str, Any]) -> MiningConfig:
    """The base `mining` section with one trial's values applied (and checked)."""
    values = {k: (float(v) if isinstance(v, np.floating) else int(v) if isinstance(v, np.integer)
                  else v) for k, v in chosen.items()}
    return from_dict(MiningConfig, {**to_dict(base), **values}, "trial.mining")


def eval_points(steps: int, evals: int) -> list[int]:
    """Steps after which a trial scores dev: `evals` points spread evenly, the last = `steps`."""
    return sorted({max(1, math.ceil(steps * (i + 1) / evals)) for i in range(evals)})


# ---------------------------------------------------------------- dev scoring


@dataclass(frozen=True)
class DevSet:
    """Dev queries and the documents they are ranked among (pool or whole corpus)."""

    query_ids: list[str]
    queries: list[str]
    doc_ids: list[str]
    docs: list[str]
    qrels: dict[str, dict[str, int]]


def dev_metrics(encoder: Encoder, dev: DevSet, cfg: Config) -> dict[str, float]:
    """Rank `dev.docs` for each dev query with `encoder`, scored as the evaluate stage scores."""
    q = encoder.encode(dev.queries, cfg.train.query_prefix)  # (nq, dim)
    d = encoder.encode(dev.docs, cfg.train.passage_prefix)  # (nd, dim)
    ks = (*cfg.evaluate.k_values, int(cfg.tune.metric.partition("@")[2]))
    return evaluate.score_vectors(dataclasses.replace(cfg.evaluate, k_values=ks), dev.qrels,
                                  dev.query_ids, q, dev.doc_ids, d)


# ---------------------------------------------------------------- one trial


@dataclass(frozen=True)
class Shared:
    """What every trial reads; computed once by the driver and put in the object store."""

    cfg: Config
    data_dir: str
    embed_dir: str
    cand_dirs: list[str]
    upstream: str  # the candidates' config hash
    trials_dir: str
    dev: DevSet
    student: TeacherConfig  # how the student embeds at evaluation, on whatever device a trial has


def trial(config: dict[str, Any], shared: Shared) -> None:
    """Mine with this trial's setting, train, and report dev metrics at `eval_points`."""
    from ray import tune

    cfg = shared.cfg
    mining = trial_mining(cfg.mining, config["mining"])
    started = time.time()
    out = storage.join(shared.trials_dir, tune.get_context().get_trial_id())
    mined = mine_stage.run(mining, shared.data_dir, shared.cand_dirs, out,
                           cfg.data.split, shared.upstream)  # skipped on a restored trial
    rows = expand(storage.read_parquet(storage.join(out, "mine", "mined.parquet")))
    if not rows:
        raise ValueError(f"trial {mining.rule}: the filter left no training examples")
    # The student trains on as many negatives as this trial mines.
    train_cfg = dataclasses.replace(cfg.train, num_negatives=mining.num_negatives, num_workers=1)
    if train_cfg.in_batch_bound == "rule":  # held to this trial's rule
        attach_teacher(rows, TeacherBound(shared.embed_dir, mining))
    steps = total_steps(train_cfg, rows)
    torch.set_num_threads(max(1, int(cfg.tune.cpus_per_trial)))
    trainer = StudentTrainer(train_cfg, steps, pick_device("auto"))
    # Seconds the trial's earlier attempts spent, so a restore does not reset the clock.
    earlier_s = restore(trainer, tune.get_checkpoint()).get("seconds", 0.0)
    encoder = Encoder.wrap(shared.student, trainer.model, trainer.tokenizer, trainer.device)
    resumed_from = trainer.step_no
    points = eval_points(steps, cfg.tune.evals_per_trial)
    stats = mined["stats"]

    def after_step(trainer: StudentTrainer, losses: list[float]) -> None:
        if trainer.step_no not in points:
            return
        trainer.model.eval()
        scores = dev_metrics(encoder, shared.dev, cfg)
        trainer.model.train()
        result = {**scores, "step": trainer.step_no, "steps": steps, "loss": float(np.mean(losses)),
                  "resumed_from": resumed_from,
                  "examples": len(rows), "queries_mined": stats["queries_out"],
                  "short_share": stats.get("short_share"),
                  "dropped_false_negatives": stats["dropped_by_rule"],
                  "trial_seconds": round(earlier_s + time.time() - started, 1)}
        with tempfile.TemporaryDirectory() as d:
            save(trainer, d, {"seconds": result["trial_seconds"]})
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))

    fit(trainer, epoch_batches(rows, train_cfg, skip=trainer.step_no), steps, after_step)


# ---------------------------------------------------------------- the driver


def with_dev(cfg: Config) -> Config:
    """The search's view: train excludes the dev hold-out; scores come from dev, never test."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, holdout_dev=True))


def stage_dir(cfg: Config) -> str:
    return storage.join(cfg.output.dir, "tune", search_key(cfg))


def search_key(cfg: Config) -> str:
    c = resolve_paths(with_dev(cfg))
    return config_hash(c.data, c.teacher, c.index, c.mining, c.train, c.evaluate, c.tune)


def dev_set(cfg: Config, data_dir: str, pool_dir: str | None) -> DevSet:
    """Dev queries, qrels and the documents to rank: teacher pool + positives, or all."""
    qrels = qrels_dict(data_dir, "dev")
    doc_filter: set[str] | None = None
    if pool_dir is not None:
        pool = storage.read_parquet(storage.join(pool_dir, "candidates.parquet"), ["doc_ids"])
        doc_filter = {d for ds in pool.column("doc_ids").to_pylist() for d in ds}
        doc_filter |= {d for rel in qrels.values() for d in rel}
    docs = prepared.read_texts(storage.join(data_dir, "corpus"), doc_filter)
    qtexts = prepared.read_texts(storage.join(data_dir, prepared.QUERIES), set(qrels))
    qids = sorted(qrels)
    dids = sorted(docs)
    return DevSet(qids, [qtexts[q] for q in qids], dids, [docs[d] for d in dids], qrels)


@dataclass(frozen=True)
class Inputs:
    """What the pipeline prepares for a search: the data, the teacher's train candidates (for
    `deepest`), the dev pool's candidates (None: rank the whole corpus) and the student's view."""

    data_dir: str
    embed_dir: str
    cand_dirs: list[str]
    upstream: str  # the candidates' config hash
    pool_dir: str | None
    student: TeacherConfig
    searched: dict[str, Any]


def deepest(cfg: Config) -> MiningConfig:
    """The setting to retrieve train candidates for: deep enough for the largest top_k and the
    weakest anchor (`pair`'s) under the config's own rule; an arm with a lower bound may find
    fewer survivors, which its row counts."""
    top_k = max(_largest(cfg.tune.space, "top_k", cfg.mining.top_k), 1)
    deep = cfg.mining.window == "survivors" or any("window" in arm for arm in cfg.tune.space)
    return dataclasses.replace(cfg.mining, top_k=top_k, anchor="pair",
                               window="survivors" if deep else "rank")


def prepare_shared(cfg: Config, target: str, inputs: Inputs) -> tuple[Shared, dict[str, Any]]:
    """What every trial reads, with the dev set built from the prepared inputs."""
    dev = dev_set(cfg, inputs.data_dir, inputs.pool_dir)
    shared = Shared(cfg, inputs.data_dir, inputs.embed_dir, inputs.cand_dirs, inputs.upstream,
                    storage.join(target, "trials"), dev, inputs.student)
    return shared, {"dev_queries": len(dev.query_ids), "dev_documents": len(dev.doc_ids),
                    **inputs.searched}


def _largest(space: Sequence[Mapping[str, Any]], key: str, default: int) -> int:
    """The largest value `key` can take in any arm (domains included)."""
    values = [default]
    for arm in space:
        v = arm.get(key)
        if isinstance(v, Mapping):
            values.extend(int(x) for x in next(iter(v.values())))
        elif v is not None:
            values.append(int(v))
    return max(values)


def base_metrics(shared: Shared) -> dict[str, float]:
    """The untrained student on the same dev set: the row every trial is measured against."""
    encoder = Encoder(shared.student)
    return dev_metrics(encoder, shared.dev, shared.cfg)


def run(cfg: Config, prepare: Callable[[Config], Inputs]) -> dict[str, Any]:
    """Search `cfg.tune.space`; returns the manifest (the table's rows under `trials`).

    `prepare` embeds, retrieves and searches the dev pool for the search's view of `cfg` (the
    pipeline's `tune_inputs`); it runs only when the search is not current.
    """
    if cfg.extra_teachers:
        raise ConfigError("posmine tune mines with `teacher` only; extra_teachers is not "
                          "supported by tune (run `posmine train` with each setting instead)")
    user_cfg = cfg
    cfg = resolve_paths(with_dev(cfg))
    target = stage_dir(cfg)

    def work() -> lifecycle.Done:
        remote.ensure_ray()
        shared, sizes = prepare_shared(cfg, target, prepare(cfg))
        base = base_metrics(shared)
        log.info("untrained student on dev: %s=%.4f", cfg.tune.metric, base[cfg.tune.metric])
        trials = [_row(r, cfg) for r in _fit(cfg, shared, storage.join(target, "ray"))]
        # best first; ties (common on small dev sets) in trial order, the same on every rerun
        trials.sort(key=lambda t: (-(t.get(cfg.tune.metric) or -1.0), str(t["trial"])))
        if not any(t.get(cfg.tune.metric) is not None for t in trials):
            raise lifecycle.StageError(f"no trial reported {cfg.tune.metric}; see the errors above")
        best = trials[0]
        write_outputs(target, trials, with_dev(user_cfg), best, base)
        failed = [t for t in trials if t["error"]]
        if failed:  # the table is written, but a search with failed trials is not finished
            raise lifecycle.StageError(
                f"{len(failed)} of {len(trials)} tune trials failed (first: {failed[0]['error']}); "
                f"the results so far are in {storage.redact(storage.join(target, 'results.csv'))};"
                " run the same command again to retry them")
        return lifecycle.Done({"trials": len(trials)}, stats={"base": base, "best": best, **sizes},
                            extra={"metric": cfg.tune.metric, "split": "dev", "trials": trials,
                                   "best_yaml": storage.join(target, "best.yaml")},
                            outputs=["results.csv", "results.parquet", "best.yaml"])

    return lifecycle.run_stage(target, "tune", search_key(cfg), work)


def _fit(cfg: Config, shared: Shared, experiment_root: str) -> Any:
    """Run (or restore) the Tune experiment; returns its ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    tc = cfg.tune
    resources = {"cpu": tc.cpus_per_trial, "gpu": tc.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(trial, shared=shared), resources)
    fs, root = storage.arrow_filesystem(experiment_root)
    if tune.Tuner.can_restore(f"{root}/search", storage_filesystem=fs):
        # The same command after a crash or Ctrl-C: finished trials stay, the rest resume
        # from their last checkpoint.
        log.info("restoring the Tune experiment at %s/search", storage.redact(experiment_root))
        return tune.Tuner.restore(f"{root}/search", trainable, resume_unfinished=True,
                                  resume_errored=True, storage_filesystem=fs).fit()
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=tc.evals_per_trial,
                               grace_period=min(tc.grace_period, tc.evals_per_trial),
                               reduction_factor=tc.reduction_factor)
                 if tc.scheduler == "asha" else FIFOScheduler())
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(tc),
        tune_config=tune.TuneConfig(
            metric=tc.metric, mode="max", scheduler=scheduler, num_samples=tc.num_samples,
            # The generator's own limit: TuneConfig's is ignored with a generator instance.
            search_alg=BasicVariantGenerator(random_state=tc.seed,
                                             max_concurrent=tc.max_concurrent_trials)),
        run_config=tune.RunConfig(
            name="search", storage_path=root, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1,
            callbacks=tracking.tune_callbacks(cfg.train.track, cfg.output.dir)),
    )
    return tuner.fit()


def _row(result: Any, cfg: Config) -> dict[str, Any]:
    """One table row: the trial's mining setting, its last dev scores, and its cost."""
    tc = cfg.tune
    mining = to_dict(trial_mining(cfg.mining, result.config["mining"]))
    m = dict(result.metrics or {})
    row: dict[str, Any] = {"trial": m.get("trial_id") or os.path.basename(str(result.path))}
    row.update({c: mining[c] for c in MINING_COLUMNS})
    row.update({
        tc.metric: m.get(tc.metric), "recall@100": m.get("recall@100"),
        "step": m.get("step"), "steps": m.get("steps"),
        # ASHA's stop, not a crash: an errored trial also ends before its last step
        "stopped_early": bool(m) and not result.error and m.get("step") != m.get("steps"),
        "resumed_from": m.get("resumed_from"),
        "examples": m.get("examples"), "dropped_false_negatives": m.get("dropped_false_negatives"),
        "seconds": m.get("trial_seconds"), "error": str(result.error)[:200] if result.error else None,
    })
    return row


# ---------------------------------------------------------------- outputs


def write_outputs(target: str, trials: list[dict[str, Any]], cfg: Config, best: dict[str, Any],
                  base: dict[str, float]) -> None:
    """results.csv, results.parquet, best.yaml and the plot, all beside the manifest."""
    storage.write_parquet(pa.Table.from_pylist(trials), storage.join(target, "results.parquet"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(trials[0]))
    writer.writeheader()
    writer.writerows(trials)
    storage.write_bytes(storage.join(target, "results.csv"), buf.getvalue().encode())
    storage.write_bytes(storage.join(target, "best.yaml"), storage.redact(best_yaml(cfg, best)).encode())
    storage.write_bytes(storage.join(target, "metric_vs_param.png"),
                        plot(trials, cfg.tune.metric, base.get(cfg.tune.metric)))


def best_yaml(cfg: Config, best: dict[str, Any]) -> str:
    """The user's config with the best trial's mining setting and no `tune` section.

    `data.holdout_dev` goes back to the user's value: the final run trains on all of train.
    """
    mining = {k: best[k] for k in MINING_COLUMNS if best.get(k) is not None}
    doc = to_dict(cfg)
    doc["mining"].update(mining)
    doc.pop("tune")
    doc["data"]["holdout_dev"] = False
    head = (f"# posmine tune: best of {cfg.tune.metric} on dev = {best[cfg.tune.metric]:.4f} "
            f"(trial {best['trial']}).\n# Run it: posmine run <this file>\n")
    return head + yaml.safe_dump(doc, sort_keys=False)


def plot(trials: list[dict[str, Any]], metric: str, base: float | None) -> bytes:
    """PNG: dev `metric` against each rule's parameter (naive top-k and base as lines)."""
    plt = report.pyplot()
    rules = sorted({t["rule"] for t in trials if t.get(metric) is not None})
    fig, axes = plt.subplots(1, max(1, len(rules)), figsize=(4 * max(1, len(rules)), 3.6),
                             squeeze=False, sharey=True)
    for ax, rule in zip(axes[0], rules, strict=False):
        done = [t for t in trials if t["rule"] == rule and t.get(metric) is not None]
        param = RULE_PARAM[rule] or "num_negatives"
        for k in sorted({t["num_negatives"] for t in done}):
            pts = sorted((t[param], t[metric], bool(t.get("stopped_early"))) for t in done
                         if t["num_negatives"] == k)
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", label=f"k={k}")[0]
            for x, y, stopped in pts:  # hollow: ASHA stopped it, its score is from fewer steps
                ax.plot(x, y, "o", color=line.get_color(),
                        markerfacecolor="none" if stopped else line.get_color())
        if any(t.get("stopped_early") for t in done):
            ax.plot([], [], "o", color="grey", markerfacecolor="none", label="stopped early")
        if base is not None:
            ax.axhline(base, color="grey", ls="--", lw=1, label="untrained")
        ax.set_title(rule)
        ax.set_xlabel(param)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"dev {metric}")
    fig.tight_layout()
    return report.png(fig)


def format_table(trials: Sequence[Mapping[str, Any]], metric: str,
                 base: Mapping[str, float] | None = None) -> str:
    """The results as aligned text, best first."""
    columns = [("rule", "<16"), ("param", ">14"), ("k", ">4"), (metric, ">10"),
               ("recall@100", ">12.4f"), ("steps", ">9"), ("secs", ">8.0f")]
    rows: list[list[Any]] = []
    if base:
        rows.append(["untrained", "", "", f"{base.get(metric, 0):.4f}", base.get("recall@100", 0)])
    for t in trials:
        p = RULE_PARAM.get(t["rule"])
        rows.append([t["rule"], f"{p}={t[p]:.3g}" if p and t.get(p) is not None else "",
                     t["num_negatives"] or "",
                     "failed" if t.get(metric) is None else f"{t[metric]:.4f}",
                     t.get("recall@100") or 0, f"{t.get('step')}/{t.get('steps')}",
                     t.get("seconds") or 0])
    return report.text_table(columns, rows, rule=True)
