"""`posmine audit`: each mining setting's false negatives, measured with labels instead of a judge.

A seeded share (`audit.hide_fraction`) of every query's labelled positives is hidden from the
miner: to it they are unlabelled documents, which is what a false negative is. Every setting of
`audit.grid` (each rule with an anchor once per `audit.anchors` mode) then mines the same
candidates, and the audit counts how many hidden positives each setting keeps as negatives (its
false negatives), how many its rule drops (what the filter catches) and what it drops besides
(the cost). Queries with a single positive have nothing to hide and are counted apart.

The stage runs as the mine stage does: over the search stages' candidate shards (which hold
each query's positives and their teacher scores) on a Ray Data actor pool, every setting in one
pass per shard, the texts' duplicate keys from `TextShard` actors, the counts summed last; the
driver holds one small row per shard. Writes `<out>/audit/<hash>/`: `audit.json` and
`audit.csv` (one row per setting), `tradeoff.png` (false-negative rate against negatives kept
per example and against their mean teacher score), `fn_vs_perc.png` (false-negative rate
against TopK-PercPos's `perc`, one line per anchor), `report.html`, and the manifest last.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

import posmine.report as report
from posmine.config import AuditConfig, MiningConfig, config_hash, to_dict
from posmine.core import mining
from posmine.io import storage
from posmine.io.candidates import (
    Rounds,
    read_shard,
    shard_list,
    shard_queries,
    with_keys,
)
from posmine.io.textstore import TextStore
from posmine.stages import lifecycle, remote

ANCHORED = ("topk_marginpos", "topk_percpos")  # the rules that use s+
COLUMNS = report.AUDIT_COLUMNS  # one row per setting, in audit.csv and on the page


def settings(base: MiningConfig, cfg: AuditConfig) -> list[tuple[str, MiningConfig]]:
    """(label, mining config) for every grid entry, the anchored rules once per anchor mode."""
    out = []
    for entry in cfg.grid:
        m = dataclasses.replace(base, **entry)
        for anchor in cfg.anchors if m.rule in ANCHORED else (base.anchor,):
            label = m.rule + "".join(f" {k}={v}" for k, v in entry.items() if k != "rule")
            out.append((f"{label} anchor={anchor}" if m.rule in ANCHORED else label,
                        dataclasses.replace(m, anchor=anchor, too_few="keep")))
    return list(dict(out).items())  # a grid entry repeated runs once


def hide_positives(positives: Mapping[str, Sequence[str]], fraction: float,
                   seed: int) -> dict[str, tuple[list[str], set[str]]]:
    """(visible, hidden) positives of every query with two or more: round(fraction x P) hidden,
    at least one and at most P - 1, drawn per query (the same whatever the query order)."""
    out = {}
    for q, pos in positives.items():
        if len(pos) < 2:
            continue
        n = min(len(pos) - 1, max(1, round(fraction * len(pos))))
        hidden = {pos[j] for j in mining.query_rng(seed, q).choice(len(pos), size=n, replace=False)}
        out[q] = ([p for p in pos if p not in hidden], hidden)
    return out


@dataclasses.dataclass
class Counts:
    """One setting's audit: every count over training examples (an example sees the hidden
    positives of its query; with anchor=pair a query has one example per visible positive)."""

    examples: int = 0
    examples_short: int = 0
    negatives_kept: int = 0
    hidden_in_window: int = 0  # hidden positives the rule looked at: kept or dropped
    hidden_kept: int = 0  # hidden positives chosen as negatives: the false negatives
    hidden_dropped: int = 0  # hidden positives the rule dropped: what it caught
    dropped: int = 0  # every candidate the rule dropped
    kept_score_sum: float = 0.0  # teacher scores of the kept negatives: how hard they are

    def add(self, other: Mapping[str, Any]) -> None:
        """Add another shard's counts (`dataclasses.asdict` of its `Counts`)."""
        for k, v in other.items():
            setattr(self, k, getattr(self, k) + v)

    def row(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self),
                "kept_mean_score": self.kept_score_sum / max(1, self.negatives_kept),
                "fn_rate": self.hidden_kept / max(1, self.negatives_kept),
                "filter_recall": self.hidden_dropped / max(1, self.hidden_in_window),
                "dropped_not_hidden": self.dropped - self.hidden_dropped}


def audit_batch(batch: Sequence[mining.QueryCandidates], hidden: Mapping[str, set[str]],
                cfg: MiningConfig, texts: Mapping[str, str] | None = None,
                query_texts: Mapping[str, str] | None = None,
                counts: Counts | None = None) -> Counts:
    """Mine `batch` (visible positives only) with `cfg` and count what happened to the hidden ones."""
    counts = counts or Counts()
    stats = mining.MiningStats()
    f = mining.filter_batch(batch, cfg, texts, query_texts, stats)
    rows = mining.choose(f, cfg, stats)  # too_few=keep: one row per example
    is_hidden = np.zeros(f.scores.shape, bool)  # (nq, K) per query, not per example
    for i, q in enumerate(f.queries):
        h = hidden.get(q.query_id, set())
        is_hidden[i, :len(q.cand_ids)] = [d in h for d in q.cand_ids]
    qrow = np.array([i for i, _ in f.examples], np.int64)  # (ne,)
    hid = is_hidden[qrow]  # (ne, K)
    counts.examples += len(rows)
    counts.hidden_in_window += int((hid & (f.keep | f.dropped)).sum())
    counts.hidden_dropped += int((hid & f.dropped).sum())
    counts.dropped += int(f.dropped.sum())
    for (i, _), row in zip(f.examples, rows, strict=True):
        h = hidden.get(f.queries[i].query_id, set())
        counts.examples_short += len(row["negative_ids"]) < cfg.num_negatives
        counts.negatives_kept += len(row["negative_ids"])
        counts.hidden_kept += sum(d in h for d in row["negative_ids"])
        counts.kept_score_sum += sum(row["negative_scores"])
    return counts


def audit_rows(grid: Sequence[tuple[str, MiningConfig]], cands: Sequence[Mapping[str, Any]],
               split_positives: Mapping[str, tuple[list[str], set[str]]],
               pos_score: Mapping[str, Mapping[str, float]], texts: Mapping[str, str],
               qtexts: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per setting over the audited queries' candidates, in one process with every
    text normalised per candidate: the reference the stage (`audit_table` per shard) is held to."""
    out = []
    hidden = {q: h for q, (_, h) in split_positives.items()}
    for label, m in grid:
        batch = []
        for c in cands:
            if c["query_id"] not in split_positives:
                continue
            visible, _ = split_positives[c["query_id"]]
            q = mining.QueryCandidates(c["query_id"], c["doc_ids"], np.asarray(c["scores"], np.float64),
                                       visible, np.array([pos_score[c["query_id"]][p] for p in visible]))
            batch.append(mining.cut_to_window(q, m))  # as the mine stage does
        out.append(setting_row(label, m, audit_batch(batch, hidden, m, texts, qtexts)))
    return out


def setting_row(label: str, m: MiningConfig, counts: Counts) -> dict[str, Any]:
    """A setting's line of audit.csv: what it is and its counts."""
    param = {"topk_shifted": m.shift, "topk_abs": m.threshold, "topk_marginpos": m.margin,
             "topk_percpos": m.perc}.get(m.rule)
    return {"setting": label, "rule": m.rule, "anchor": m.anchor if m.rule in ANCHORED else "",
            "param": param, "window": m.window if mining.survivor_window(m) else "rank",
            **counts.row()}


# Candidate cells (examples x list length) per call of the pure miner: an example's arrays are
# as long as its query's list, and queries with dozens of positives searched deep multiply them.
CELLS = 1 << 22


def audit_table(grid: Sequence[tuple[str, MiningConfig]], cfg: AuditConfig, table: pa.Table,
                store: TextStore) -> dict[str, Any]:
    """One candidate shard: its queries' positives split into visible and hidden, then every
    setting of `grid` over the same candidates. Returns the shard's counts per setting (as
    dicts) and its query counts, for the driver to sum."""
    queries = shard_queries(table)
    split = hide_positives({q.query_id: list(q.pos_ids) for q in queries}, cfg.hide_fraction, cfg.seed)
    visible = []
    for q in queries:
        if q.query_id in split:
            score = dict(zip(q.pos_ids, q.pos_scores.tolist(), strict=True))
            shown = split[q.query_id][0]
            visible.append(dataclasses.replace(q, pos_ids=shown,
                                               pos_scores=np.array([score[p] for p in shown])))
    visible = with_keys(visible, store, grid[0][1].dedup_text)  # visible positives' texts banned
    hidden = {q: h for q, (_, h) in split.items()}
    counts = {label: Counts() for label, _ in grid}
    for label, m in grid:
        cut = [mining.cut_to_window(q, m) for q in visible]
        for chunk in _chunks(cut):
            audit_batch(chunk, hidden, m, counts=counts[label])
    return {"counts": {label: dataclasses.asdict(c) for label, c in counts.items()},
            "audited": len(split), "single": sum(len(q.pos_ids) == 1 for q in queries),
            "hidden": sum(len(h) for h in hidden.values())}


def _chunks(queries: Sequence[mining.QueryCandidates]) -> Iterator[list[mining.QueryCandidates]]:
    """Runs of queries holding at most `CELLS` (examples x candidates) each (one at least)."""
    chunk: list[mining.QueryCandidates] = []
    cells = 0
    for q in queries:
        size = max(1, len(q.pos_ids)) * len(q.cand_ids)
        if chunk and cells + size > CELLS:
            yield chunk
            chunk, cells = [], 0
        chunk.append(q)
        cells += size
    if chunk:
        yield chunk


class AuditShard:
    """Ray Data actor: `audit_table` over one candidate shard per call (a query searched again
    deeper is audited on its deepest list only)."""

    def __init__(self, grid: list[tuple[str, MiningConfig]], cfg: AuditConfig, store: TextStore,
                 cand_dirs: list[str]) -> None:
        self.grid, self.cfg, self.store, self.rounds = grid, cfg, store, Rounds(cand_dirs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = [json.dumps(audit_table(self.grid, self.cfg, self.rounds.deepest(j, read_shard(url)),
                                      self.store))
               for j, url in zip(batch.column("round").to_pylist(), batch.column("url").to_pylist(),
                                 strict=True)]
        return pa.table({"result": out})


def audit_shards(grid: Sequence[tuple[str, MiningConfig]], cfg: AuditConfig, data_dir: str,
                 cand_dirs: Sequence[str]) -> dict[str, Any]:
    """Every shard's `audit_table`, summed (`remote.over_shards`). The driver holds one small
    row per shard."""
    return remote.over_shards(
        AuditShard, {"grid": list(grid), "cfg": cfg, "cand_dirs": list(cand_dirs)},
        shard_list(cand_dirs), data_dir, grid[0][1].dedup_text, "audit",
        functools.partial(_summed, list(grid)))


def _summed(grid: Sequence[tuple[str, MiningConfig]], rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The shards' counts added up: per setting, and the query counts."""
    counts = {label: Counts() for label, _ in grid}
    total = {"audited": 0, "single": 0, "hidden": 0}
    for r in (json.loads(row["result"]) for row in rows):
        for label, c in r["counts"].items():
            counts[label].add(c)
        for k in total:
            total[k] += r[k]
    return {**total, "rows": [setting_row(label, m, counts[label]) for label, m in grid]}


def run(cfg: AuditConfig, grid: Sequence[tuple[str, MiningConfig]], data_dir: str,
        cand_dirs: Sequence[str], out_dir: str, split: str, upstream: str) -> dict[str, Any]:
    """The audit stage (skipped when current); returns its manifest with its folder as "dir"."""
    key = config_hash(cfg, [to_dict(m) for _, m in grid], upstream, split)
    target = storage.join(out_dir, "audit", key)

    def work() -> lifecycle.Done:
        summed = audit_shards(grid, cfg, data_dir, cand_dirs)
        summary = {"split": split, "hide_fraction": cfg.hide_fraction, "seed": cfg.seed,
                   "queries_audited": summed["audited"],
                   "queries_single_positive": summed["single"],
                   "hidden_positives": summed["hidden"], "settings": summed["rows"]}
        write_outputs(target, summary)
        return lifecycle.Done({"queries": summed["audited"], "settings": len(summed["rows"])},
                              stats=summary, outputs=["audit.json", "audit.csv", "tradeoff.png",
                                                      "fn_vs_perc.png", "report.html"])

    manifest = lifecycle.run_stage(target, "audit", key, work)
    return {**manifest, "dir": target}


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_outputs(target: str, summary: Mapping[str, Any]) -> None:
    """audit.json, audit.csv, the two plots and the one-page report."""
    rows = summary["settings"]
    storage.write_bytes(storage.join(target, "audit.json"), json.dumps(summary, indent=2).encode())
    storage.write_bytes(storage.join(target, "audit.csv"), to_csv(rows).encode())
    plots = {"tradeoff.png": report.tradeoff_plot(rows), "fn_vs_perc.png": report.perc_plot(rows)}
    for name, png in plots.items():
        storage.write_bytes(storage.join(target, name), png)
    storage.write_bytes(storage.join(target, "report.html"), report.audit_page(summary, plots).encode())


def format_table(summary: Mapping[str, Any]) -> str:
    """The audit for a terminal: one line per setting."""
    head = (f"{summary['hidden_positives']} positives of {summary['queries_audited']} queries hidden "
            f"({summary['hide_fraction']:.0%} each); {summary['queries_single_positive']} "
            "single-positive queries apart\n")
    columns = [("setting", "<34"), ("examples", ">9"), ("short", ">7"), ("kept", ">7"),
               ("FN kept", ">8"), ("FN rate", ">8.3f"), ("caught", ">8"), ("recall", ">7.2f"),
               ("dropped", ">9")]
    keys = ("setting", "examples", "examples_short", "negatives_kept", "hidden_kept", "fn_rate",
            "hidden_dropped", "filter_recall", "dropped")
    return head + report.text_table(columns, ([r[k] for k in keys] for r in summary["settings"]))
