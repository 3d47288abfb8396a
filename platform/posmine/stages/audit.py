"""`posmine audit`: each mining setting's false negatives, measured with labels instead of a judge.

A seeded share (`audit.hide_fraction`) of every query's labelled positives is hidden from the
miner: to it they are unlabelled documents, which is what a false negative is. Every setting of
`audit.grid` (each rule with an anchor once per `audit.anchors` mode) then mines the same
candidates, and the audit counts how many hidden positives each setting keeps as negatives (its
false negatives), how many its rule drops (what the filter catches) and what it drops besides
(the cost). Queries with a single positive have nothing to hide and are counted apart.

Reads the data stage's qrels and texts, the embed stage's vectors (positive scores) and the
search stages' candidates; writes `<out>/audit/<hash>/`: `audit.json` and `audit.csv` (one row
per setting), `tradeoff.png` (false-negative rate against negatives kept per example and
against their mean teacher score), `fn_vs_perc.png`
(false-negative rate against TopK-PercPos's `perc`, one line per anchor), `report.html`, and
the manifest last.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import posmine.report as report
from posmine.config import AuditConfig, MiningConfig, config_hash, to_dict
from posmine.core import mining
from posmine.io import prepared, storage
from posmine.io.candidates import read_candidates
from posmine.io.vectors import positive_scores
from posmine.stages import lifecycle

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
    for e, ((i, _), row) in enumerate(zip(f.examples, rows, strict=True)):
        q, h = f.queries[i], hidden.get(f.queries[i].query_id, set())
        is_hidden = np.array([d in h for d in q.cand_ids] + [False] * (f.scores.shape[1] - len(q.cand_ids)))
        counts.examples += 1
        counts.examples_short += len(row["negative_ids"]) < cfg.num_negatives
        counts.negatives_kept += len(row["negative_ids"])
        counts.hidden_in_window += int((is_hidden & (f.keep[e] | f.dropped[e])).sum())
        counts.hidden_kept += sum(d in h for d in row["negative_ids"])
        counts.hidden_dropped += int((is_hidden & f.dropped[e]).sum())
        counts.dropped += int(f.dropped[e].sum())
        counts.kept_score_sum += sum(row["negative_scores"])
    return counts


def audit_rows(grid: Sequence[tuple[str, MiningConfig]], cands: Sequence[Mapping[str, Any]],
               split_positives: Mapping[str, tuple[list[str], set[str]]],
               pos_score: Mapping[str, Mapping[str, float]], texts: Mapping[str, str],
               qtexts: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per setting over the audited queries' candidates (pure; the stage reads files)."""
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
        counts = audit_batch(batch, hidden, m, texts, qtexts)
        param = {"topk_shifted": m.shift, "topk_abs": m.threshold, "topk_marginpos": m.margin,
                 "topk_percpos": m.perc}.get(m.rule)
        out.append({"setting": label, "rule": m.rule, "anchor": m.anchor if m.rule in ANCHORED else "",
                    "param": param, "window": m.window if mining.survivor_window(m) else "rank",
                    **counts.row()})
    return out


def run(cfg: AuditConfig, grid: Sequence[tuple[str, MiningConfig]], data_dir: str, embed_dir: str,
        cand_dirs: Sequence[str], out_dir: str, split: str, upstream: str) -> dict[str, Any]:
    """The audit stage (skipped when current); returns its manifest with its folder as "dir"."""
    key = config_hash(cfg, [to_dict(m) for _, m in grid], upstream, split)
    target = storage.join(out_dir, "audit", key)

    def work() -> lifecycle.Done:
        positives = prepared.positives_by_query(prepared.read_prepared_qrels(data_dir, split))
        split_pos = hide_positives(positives, cfg.hide_fraction, cfg.seed)
        scores = positive_scores(embed_dir, positives)
        pos_score = {q: dict(zip(positives[q], map(float, scores[q]), strict=True)) for q in split_pos}
        cands = read_candidates(cand_dirs)
        need = {d for c in cands if c["query_id"] in split_pos for d in c["doc_ids"]}
        texts = prepared.read_texts(storage.join(data_dir, "corpus"), need | set().union(*positives.values()))
        qtexts = prepared.read_texts(storage.join(data_dir, prepared.QUERIES), set(split_pos))
        rows = audit_rows(grid, cands, split_pos, pos_score, texts, qtexts)
        summary = {"split": split, "hide_fraction": cfg.hide_fraction, "seed": cfg.seed,
                   "queries_audited": len(split_pos),
                   "queries_single_positive": sum(len(p) == 1 for p in positives.values()),
                   "hidden_positives": sum(len(h) for _, h in split_pos.values()),
                   "settings": rows}
        write_outputs(target, summary)
        return lifecycle.Done({"queries": len(split_pos), "settings": len(rows)}, stats=summary,
                            outputs=["audit.json", "audit.csv", "tradeoff.png", "fn_vs_perc.png",
                                     "report.html"])

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
