"""Chains the stages; each is skipped when its manifest matches its config (resume by manifest).

data -> embed (teacher) -> search (split queries) -> mine ; evaluate = embed (model) -> search
(eval split) -> metrics. Starts a local Ray instance unless `RAY_ADDRESS` names a cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

import posmine.report as report
from posmine.config import (
    AuditConfig,
    Config,
    MiningConfig,
    TeacherConfig,
    config_hash,
    resolve_stages,
    resolve_teachers,
    to_dict,
)
from posmine.core.mining import describe_auto, survivor_window
from posmine.io import prepared, storage
from posmine.models import backbone, model_card
from posmine.stages import audit as audit_stage
from posmine.stages import data, lifecycle, remote
from posmine.stages import embed as embed_stage
from posmine.stages import evaluate as eval_stage
from posmine.stages import mine as mine_stage
from posmine.stages import search as search_stage
from posmine.stages import train as train_stage
from posmine.stages import tune as tune_stage
from posmine.stages.train.plan import TeacherBound

log = logging.getLogger(__name__)


def prepare(cfg: Config) -> tuple[str, str]:
    """Run the data stage; returns (data dir, its config hash)."""
    manifest = data.run(cfg.data, cfg.output.dir)
    return data.stage_dir(cfg.output.dir), str(manifest["config_hash"])


def embed(cfg: Config, teacher: TeacherConfig | None = None) -> dict[str, Any]:
    """data + embed stages for `teacher` (default: cfg.teacher)."""
    teacher = teacher or cfg.teacher
    data_dir, data_key = prepare(cfg)
    manifest = embed_stage.run(teacher, data_dir, cfg.output.dir, data_key)
    manifest["dir"] = embed_stage.stage_dir(cfg.output.dir, teacher)
    return manifest


def search(cfg: Config, teacher: TeacherConfig, split: str, k: int,
           query_ids: Sequence[str] | pa.Array | None = None, for_mining: bool = False,
           ids_key: str | None = None) -> tuple[str, dict[str, Any]]:
    """Candidates for `query_ids` (default: the queries of `split`), from `teacher`'s embeddings;
    `for_mining` adds each query's positives and file negatives with their teacher scores."""
    emb = embed(cfg, teacher)
    data_dir, _ = prepare(cfg)
    ids = None if query_ids is None else pa.array(query_ids, pa.string())
    return search_stage.run(cfg.index, emb["dir"], cfg.output.dir, split, k,
                            upstream=str(emb["config_hash"]), data_dir=data_dir, query_ids=ids,
                            ids_key=ids_key, for_mining=for_mining)


def candidate_depth(data_dir: str, split: str, top_k: int) -> int:
    """Candidates to fetch so that `top_k` remain after removing positives and self-hits."""
    return top_k + prepared.split_max_positives(data_dir, split) + 1


def candidates(cfg: Config, teacher: TeacherConfig,
               minings: Sequence[MiningConfig]) -> tuple[list[str], str, dict[str, Any]]:
    """Search `cfg.data.split` deep enough for the windows of every setting in `minings`.

    Returns the search stages' folders (shallowest first: a later one holds the deeper lists
    of the queries that needed them), their combined key and what the deepening did. With
    `window=survivors` the queries with fewer than top_k candidates under some setting's lowest
    bound are searched again 4x deeper, up to `mining.max_depth`. The rounds are recorded in
    `candidates/rounds-<key>/`, so a later stage finds them without reading any candidate.
    """
    data_dir, _ = prepare(cfg)
    emb = embed(cfg, teacher)
    depth = candidate_depth(data_dir, cfg.data.split, max(m.top_k for m in minings))
    deepen = [m for m in minings if survivor_window(m)]
    max_depth = max((m.max_depth for m in deepen), default=0)
    windows = [to_dict(m) for m in deepen]
    key = config_hash(search_stage.search_key(cfg.index), emb["config_hash"], cfg.data.split, depth,
                      max_depth, windows)
    target = storage.join(cfg.output.dir, "candidates", f"rounds-{key}")
    manifest = storage.read_manifest(target) or {}
    if not all(lifecycle.is_done(_cand_dir(cfg, k), k) for k in manifest.get("keys", [])):
        storage.remove(target)  # a round's folder was removed since: search again

    def work() -> lifecycle.Done:
        _, cand = search(cfg, teacher, cfg.data.split, depth, for_mining=True)
        keys, rounds, at = [str(cand["config_hash"])], [[depth, cand["rows"]["queries"]]], depth
        while at < max_depth:
            if cand["rows"]["queries"] >= remote.HERE_BELOW_QUERIES:
                remote.ensure_ray()  # the round reads the whole split: in a task, not here
            todo = remote.in_task(mine_stage.unfilled, deepen, _cand_dir(cfg, keys[-1]), at)
            if not len(todo):
                break
            at = min(max_depth, at * 4)
            log.info("searching %d queries %d deep: fewer than mining.top_k candidates pass the "
                     "rule in the shallower list", len(todo), at)
            # named by the round before and the settings that chose them: a rerun finds the
            # round without listing its queries again
            _, cand = search(cfg, teacher, cfg.data.split, at, todo, for_mining=True,
                             ids_key=config_hash(keys[-1], windows, "unfilled"))
            keys.append(str(cand["config_hash"]))
            rounds.append([at, len(todo)])
        return lifecycle.Done({"rounds": len(keys)}, extra={"split": cfg.data.split, "keys": keys,
                                                          "search_rounds": rounds})

    manifest = lifecycle.run_stage(target, "search-rounds", key, work)
    keys = [str(k) for k in manifest["keys"]]
    return ([_cand_dir(cfg, k) for k in keys], config_hash(*keys),
            {"search_rounds": manifest["search_rounds"]})


def _cand_dir(cfg: Config, key: str) -> str:
    return storage.join(cfg.output.dir, "candidates", key)


def mine(cfg: Config, teacher: TeacherConfig | None = None, mining: MiningConfig | None = None,
         name: str = "mine", extra_teachers: Sequence[TeacherConfig] | None = None) -> dict[str, Any]:
    """data -> embed -> search -> mine on `cfg.data.split`; returns the mine manifest.

    With extra teachers (default: the config's `extra_teachers`), teacher i mines into
    `<name>-t<i>` and `mining.combine` merges them into `<name>`.
    """
    return _mine(cfg, teacher or cfg.teacher, mining or cfg.mining, name, extra_teachers)[0]


def _mine(cfg: Config, teacher: TeacherConfig, mining: MiningConfig, name: str,
          extra_teachers: Sequence[TeacherConfig] | None) -> tuple[dict[str, Any], MiningConfig]:
    """`mine`, and the mining config it ran with (an `auto` value picked, and said in the
    manifest, once)."""
    mining, picked = resolve_auto(cfg, teacher, mining)
    extra = resolve_teachers(cfg)[1:] if extra_teachers is None else list(extra_teachers)
    if not extra:
        return _mine_one(cfg, teacher, mining, name, picked), mining
    parts = [_mine_one(cfg, t, mining, f"{name}-t{i}", picked) for i, t in enumerate([teacher, *extra])]
    manifest = mine_stage.combine(mining, parts, cfg.output.dir, name=name, auto=picked)
    manifest["dir"] = storage.join(cfg.output.dir, name)
    return manifest, mining


def _mine_one(cfg: Config, teacher: TeacherConfig, mining: MiningConfig, name: str,
              picked: dict[str, Any] | None = None) -> dict[str, Any]:
    data_dir, _ = prepare(cfg)
    cand_dirs, upstream, _ = candidates(cfg, teacher, [mining])
    manifest = mine_stage.run(mining, data_dir, cand_dirs, cfg.output.dir,
                              cfg.data.split, upstream=upstream, name=name, auto=picked)
    manifest["dir"] = storage.join(cfg.output.dir, name)
    return manifest


def audit(cfg: Config, teacher: TeacherConfig | None = None, mining: MiningConfig | None = None,
          audit_cfg: AuditConfig | None = None) -> dict[str, Any]:
    """data -> embed -> search (deep enough for every setting) -> audit of `cfg.audit.grid`
    (defaults: the config's teacher, mining and audit)."""
    teacher, mining, audit_cfg = teacher or cfg.teacher, mining or cfg.mining, audit_cfg or cfg.audit
    data_dir, _ = prepare(cfg)
    grid = audit_stage.settings(mining, audit_cfg)
    # Deep enough for every setting's windows with all positives as anchors; hiding some can
    # lower a `max` or `mean` anchor below that, and the audit then counts those examples short.
    dirs, key, _ = candidates(cfg, teacher, [m for _, m in grid])
    return audit_stage.run(audit_cfg, grid, data_dir, dirs, cfg.output.dir, cfg.data.split, key)


# The values `mining.perc: auto` and `mining.margin: auto` choose from, tightest first.
AUTO_VALUES = {"perc": (0.80, 0.85, 0.90, 0.925, 0.95, 0.975, 0.99),
               "margin": (0.20, 0.15, 0.10, 0.075, 0.05, 0.025, 0.01)}
AUTO_RULE = {"perc": "topk_percpos", "margin": "topk_marginpos"}
MAX_SHORT = 0.2  # the most examples short of negatives an automatic pick may leave


def resolve_auto(cfg: Config, teacher: TeacherConfig, mining: MiningConfig
                 ) -> tuple[MiningConfig, dict[str, Any] | None]:
    """`mining` with `perc: auto` or `margin: auto` replaced by a number, and why (None when
    neither is auto). The audit hides half of each query's positives and counts, for each of
    `AUTO_VALUES`, the share of kept negatives that are hidden positives; the loosest value with
    at most `mining.max_fn_rate` of them and at most 20% of examples short wins. Data with one
    positive per query has nothing to hide: the default stays."""
    auto = [n for n in ("perc", "margin") if getattr(mining, n) == "auto"]
    if not auto:
        return mining, None
    defaults: dict[str, Any] = {n: MiningConfig.__dataclass_fields__[n].default for n in auto}
    fixed = dataclasses.replace(mining, **defaults)
    name = next((n for n in auto if AUTO_RULE[n] == mining.rule), None)
    if name is None:
        return fixed, {"picked": defaults, "why": f"mining.rule={mining.rule} reads neither; the defaults"}
    data_dir, _ = prepare(cfg)
    if prepared.split_max_positives(data_dir, cfg.data.split) < 2:
        return fixed, {"param": name, "picked": defaults[name],
                       "why": "one positive per query: nothing to hide and count; the default"}
    grid = tuple({"rule": mining.rule, name: v} for v in AUTO_VALUES[name])
    rows = audit(cfg, teacher, fixed, dataclasses.replace(cfg.audit, grid=grid,
                                                          anchors=(mining.anchor,)))["stats"]["settings"]
    value, why = pick_auto(rows, AUTO_VALUES[name], mining.max_fn_rate)
    table = [{name: v, "fn_rate": round(r["fn_rate"], 4),
              "short_share": round(r["examples_short"] / max(1, r["examples"]), 4)}
             for v, r in zip(AUTO_VALUES[name], rows, strict=True)]
    picked = dataclasses.replace(mining, **{**defaults, name: value})
    auto_record = {"param": name, "picked": value, "why": why, "audit": table}
    log.info("%s", describe_auto(auto_record))
    return picked, auto_record


def pick_auto(rows: Sequence[dict[str, Any]], values: Sequence[float], max_fn_rate: float
              ) -> tuple[float, str]:
    """The loosest of `values` (tightest first, one audit row each) within `max_fn_rate` and
    `MAX_SHORT`; else the one with the fewest false negatives among those not too short."""
    short = [r["examples_short"] / max(1, r["examples"]) for r in rows]
    fits = [i for i, r in enumerate(rows) if r["fn_rate"] <= max_fn_rate and short[i] <= MAX_SHORT]
    if fits:
        i = fits[-1]
        return values[i], (f"the loosest with a false-negative rate of {rows[i]['fn_rate']:.1%} "
                           f"<= max_fn_rate {max_fn_rate:.0%} and {short[i]:.0%} of examples short")
    full = [i for i in range(len(rows)) if short[i] <= MAX_SHORT]
    if not full:
        i = 0
        return values[i], f"every value leaves over {MAX_SHORT:.0%} of examples short; the tightest"
    i = min(full, key=lambda j: rows[j]["fn_rate"])
    return values[i], (f"none within max_fn_rate {max_fn_rate:.0%}: the fewest false negatives "
                       f"({rows[i]['fn_rate']:.1%}) with at most {MAX_SHORT:.0%} of examples short")


def evaluate(cfg: Config, model: str | None = None) -> dict[str, Any]:
    """Metrics of `model` (default: the teacher's model) on `cfg.evaluate.split`."""
    if model and storage.is_local(model):
        backbone.resolve_model(model)  # a missing or broken folder: refused before any work
    teacher = dataclasses.replace(cfg.teacher, model=model) if model else cfg.teacher
    return _evaluate_with(cfg, teacher)


def train(cfg: Config) -> dict[str, Any]:
    """data -> embed -> search -> mine -> train, once per stage; returns the last train manifest.

    Stage i trains the previous stage's student; with `remine_with_student` it first mines
    again with that student as the teacher. One stage writes `mine/` and `train/`; several
    write `mine-<i>/` and `train-<i>/`.
    """
    stages = resolve_stages(cfg)
    teacher, student, trained = cfg.teacher, cfg.train.model, {}
    for i, (mining, train_cfg, remine) in enumerate(stages):
        suffix = f"-{i}" if len(stages) > 1 else ""
        if remine and i > 0:
            teacher = student_view(cfg, student)
        # The extra teachers join the configured teacher, not a re-mining student. The bound
        # below reads the mined config: an `auto` value as picked.
        mined, mining = _mine(cfg, teacher, mining, f"mine{suffix}",
                              None if teacher == cfg.teacher else ())
        trained = train_stage.run(dataclasses.replace(train_cfg, model=student), mined["dir"],
                                  cfg.output.dir, upstream=str(mined["config_hash"]),
                                  name=f"train{suffix}", bound=teacher_bound(cfg, teacher, mining))
        student = str(trained["model_dir"])
        if not storage.exists(storage.join(student, model_card.CARD)):  # run's card has metrics
            _write_card(cfg, mined, trained)
    return trained


def teacher_bound(cfg: Config, teacher: TeacherConfig, mining: MiningConfig) -> TeacherBound:
    """What `train.in_batch_bound=rule` reads: the mining teacher's embeddings (the first
    teacher's, when several mined) and the rule it mined with."""
    return TeacherBound(embed_stage.stage_dir(cfg.output.dir, teacher), mining)


def _write_card(cfg: Config, mined: dict[str, Any], trained: dict[str, Any],
                summary: dict[str, Any] | None = None) -> None:
    data_manifest = storage.read_manifest(data.stage_dir(cfg.output.dir)) or {}
    text = model_card.card_text(cfg, data_manifest, mined, trained, summary)
    model_card.write_card(str(trained["model_dir"]), text)


def student_view(cfg: Config, model: str) -> TeacherConfig:
    """The student `model` seen through the embed stage (its pooling, prefixes, export length),
    normalised as the exported model is (it ships a Normalize module) and as training scored it."""
    return dataclasses.replace(cfg.teacher, model=model, pooling=cfg.train.pooling, normalize=True,
                               attention=cfg.train.attention, pool_prefix=cfg.train.pool_prefix,
                               query_prefix=cfg.train.query_prefix,
                               passage_prefix=cfg.train.passage_prefix,
                               max_length=cfg.train.export_max_length)


def run(cfg: Config) -> dict[str, Any]:
    """The whole line: mine, train, then evaluate the base student and the fine-tuned one.

    `summary.json` is removed first and written last: a run that fails leaves none behind,
    not the summary of an earlier run.
    """
    summary_url = storage.join(cfg.output.dir, "summary.json")
    storage.remove(summary_url)
    started = time.time()
    trained = train(cfg)
    base = evaluate_student(cfg, cfg.train.model)
    tuned = evaluate_student(cfg, str(trained["model_dir"]))
    read = storage.read_manifest(data.stage_dir(cfg.output.dir)) or {}
    summary = {"split": cfg.evaluate.split, "base": base["metrics"], "fine_tuned": tuned["metrics"],
               "data": {**read.get("stats", {}).get("source", {}), "rows": read.get("rows", {})},
               "model_dir": trained["model_dir"], "rule": cfg.mining.rule,
               "anchor": cfg.mining.anchor, "train_steps": trained["rows"]["steps"],
               "loss_curve": trained["stats"].get("loss_curve", []),
               "config_hash": config_hash(cfg), "seconds": round(time.time() - started, 1),
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_card(cfg, storage.read_manifest(storage.join(cfg.output.dir, last_mine(cfg))) or {},
                trained, summary)
    storage.write_json(summary_url, summary)
    return summary


def last_mine(cfg: Config) -> str:
    """The folder of the mine stage whose examples trained the final model."""
    n = len(resolve_stages(cfg))
    return "mine" if n == 1 else f"mine-{n - 1}"


def evaluation_view(cfg: Config, model: str) -> TeacherConfig:
    """The student as it is scored: its view at the device's own precision (`auto`), so a
    teacher opted into bf16 on the CPU changes the negatives, not how the result is measured."""
    return dataclasses.replace(student_view(cfg, model), dtype="auto")


def tune(cfg: Config) -> dict[str, Any]:
    """The tune stage, on inputs this pipeline prepares (`tune_inputs`)."""
    return tune_stage.run(cfg, tune_inputs)


def tune_inputs(cfg: Config) -> tune_stage.Inputs:
    """Embed, retrieve train candidates deep enough for every arm, search the dev pool."""
    data_dir, _ = prepare(cfg)
    cand_dirs, upstream, searched = candidates(cfg, cfg.teacher, [tune_stage.deepest(cfg)])
    pool_dir = search(cfg, cfg.teacher, "dev", cfg.tune.dev_pool)[0] if cfg.tune.dev_pool else None
    # the student as it is scored, on whatever device a trial has
    student = dataclasses.replace(evaluation_view(cfg, cfg.train.model), device="auto")
    return tune_stage.Inputs(data_dir, embed_stage.stage_dir(cfg.output.dir, cfg.teacher),
                             cand_dirs, upstream, pool_dir, student, searched)


def evaluate_student(cfg: Config, model: str) -> dict[str, Any]:
    """Metrics of a student `model` (a fine-tuned directory) as the student embeds."""
    return _evaluate_with(cfg, evaluation_view(cfg, model))


def _evaluate_with(cfg: Config, teacher: TeacherConfig) -> dict[str, Any]:
    cand_dir, cand = search(cfg, teacher, cfg.evaluate.split, cfg.evaluate.top_k)
    data_dir, _ = prepare(cfg)
    return eval_stage.run(cfg.evaluate, data_dir, cand_dir, cfg.output.dir, teacher.model,
                            upstream=str(cand["config_hash"]))


def format_data(summary: dict[str, Any]) -> str:
    """One line on what the data stage read (format, rows, merges, skips, splits)."""
    d = summary.get("data", {})
    rows = d.get("rows", {})
    parts = [f"read {d.get('format', '?')}: {rows.get('queries', 0):,} queries, "
             f"{rows.get('corpus', 0):,} passages"]
    for key, what in (("records", "records"), ("positives_per_query", "positives per query"),
                      ("duplicate_query_texts", "query spellings merged"),
                      ("duplicate_passage_texts", "passage spellings merged"),
                      ("duplicate_pairs", "repeated pairs"), ("records_skipped", "records skipped (empty)"),
                      ("file_negatives", "negatives from the file")):
        if d.get(key):
            parts.append(f"{d[key]:,} {what}")
    splits = ", ".join(f"{k.removeprefix('qrels_')} {v:,}" for k, v in rows.items()
                       if k.startswith("qrels_"))
    return "; ".join(parts) + (f" (qrels: {splits})" if splits else "")


def format_table(summary: dict[str, Any]) -> str:
    """Base vs fine-tuned metrics side by side, under the split they were scored on."""
    base, tuned = summary["base"], summary["fine_tuned"]
    table = report.text_table(
        [("metric", "<12"), ("base", ">10.4f"), ("fine-tuned", ">12.4f"), ("delta", ">+10.4f")],
        ([name, base[name], tuned[name], tuned[name] - base[name]] for name in sorted(base)))
    return f"scored on the {summary.get('split', '?')} split\n{table}"
