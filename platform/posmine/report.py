"""`posmine report`: a PNG histogram of teacher scores from a mine stage's manifest, the
audit's plots, and self-contained `report.html` pages (tables, PNGs inlined as data: URLs, no
scripts: they open offline in any browser).

Reads a mine stage's `_manifest.json` (its histograms of positive, kept-negative and
dropped-negative scores, and how many examples ended short of negatives, with the mine stage's
warning when over 20% did), an audit's `audit.json` and plots, or a run's `summary.json` with
its mine and train manifests (the loss curve); writes `scores.png` and `report.html` beside them.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from textwrap import fill
from typing import Any

import numpy as np

from posmine.core.mining import describe_auto, describe_rule
from posmine.io import storage


def _mine_manifest(mined_dir: str) -> dict[str, Any]:
    manifest = storage.read_manifest(mined_dir)
    if manifest is None or manifest.get("stage") != "mine":
        raise FileNotFoundError(f"{storage.redact(mined_dir)}: no finished mine stage (no manifest)")
    return manifest


def histogram(mined_dir: str, out: str | None = None) -> str:
    """Draw positives vs kept negatives vs negatives dropped by the rule; returns the PNG URL."""
    url = out or storage.join(mined_dir, "scores.png")
    storage.write_bytes(url, histogram_png(_mine_manifest(mined_dir)))
    return url


def histogram_png(manifest: Mapping[str, Any]) -> bytes:
    """The score histogram of a mine stage's manifest, with its short-examples note."""
    plt = pyplot()
    h = manifest["stats"]["histograms"]
    bins = np.asarray(h["bins"])
    centers, width = (bins[:-1] + bins[1:]) / 2, np.diff(bins)
    # One panel per kind, each on its own count scale: the dropped candidates outnumber the
    # positives and kept negatives many times and would hide them on one shared axis.
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for ax, (key, label, color) in zip(axes, (("positive", "positives", "tab:green"),
                                              ("kept", "kept negatives", "tab:blue"),
                                              ("dropped", "passed over as too close to the positive",
                                               "tab:red")), strict=True):
        ax.bar(centers, h[key], width=width, color=color, label=f"{label} ({sum(h[key])})")
        ax.set_ylabel("count")
        ax.legend(loc="upper right", fontsize=8)
    lo = next((i for i in range(len(centers)) if any(h[k][i] for k in ("positive", "kept", "dropped"))), 0)
    ax = axes[-1]
    ax.set_xlim(bins[lo], bins[-1])
    m, stats = manifest.get("mining", {}), manifest["stats"]
    axes[0].set_title(f"teacher scores, {manifest.get('split', '')}: {describe_rule(m)}, "
                      f"anchor={m.get('anchor', 'min')}, window={m.get('window', 'rank')}", fontsize=9)
    short = (f"{stats['examples_too_few']} of {stats['examples']} examples "
             f"({stats.get('short_share', 0):.0%}) have fewer than {m.get('num_negatives')} negatives")
    note = fill(stats["warning"], 120) if stats.get("warning") else short
    ax.set_xlabel("teacher score s(q, d)")
    fig.tight_layout(rect=(0, 0.06 if note else 0, 1, 1))
    if note:  # under the axes: how many examples the rule starved, and what to change
        fig.text(0.01, 0.01, note, fontsize=8, va="bottom",
                 color="tab:red" if stats.get("warning") else "black")
    return png(fig)


def png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def text_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]],
               rule: bool = False) -> str:
    """Aligned text for a terminal. `columns` are (title, format spec) pairs such as
    `("ndcg@10", ">10.4f")`; a string cell is aligned to the spec's width as it is; a row may
    stop short of the last columns; `rule` draws a line of dashes under the titles."""
    widths = [re.match(r"([<>^]?)\+?(\d*)", spec).group(1, 2) for _, spec in columns]  # type: ignore[union-attr]
    head = "".join(f"{title:{a}{w}}" for (title, _), (a, w) in zip(columns, widths, strict=True))
    lines = [head, "-" * len(head)] if rule else [head]
    for row in rows:
        lines.append("".join(f"{v:{a}{w}}" if isinstance(v, str) else f"{v:{spec}}"
                             for v, (_, spec), (a, w) in zip(row, columns, widths, strict=False)))
    return "\n".join(lines)


MARKERS = {"pair": "o", "min": "v", "max": "^", "mean": "s", "": "D"}


def tradeoff_plot(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """The audit's trade-off: false-negative rate of the kept negatives against negatives kept
    per example, one point per setting (colour: rule, marker: anchor)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    colors = {r: f"C{i}" for i, r in enumerate(dict.fromkeys(row["rule"] for row in rows))}
    for ax, key, xlabel in ((axes[0], "per_example", "negatives kept per training example"),
                            (axes[1], "kept_mean_score", "mean teacher score of kept negatives "
                                                         "(how hard they are)")):
        for row in rows:
            x = row["negatives_kept"] / max(1, row["examples"]) if key == "per_example" else row[key]
            ax.scatter(x, row["fn_rate"], color=colors[row["rule"]], s=40, label=row["rule"],
                       marker=MARKERS.get(row["anchor"], "o"))
            ax.annotate(row["setting"].replace("topk_", "").replace(" anchor=", " "), (x, row["fn_rate"]),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel(xlabel)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one legend entry per rule
    axes[0].legend(list(unique.values()), list(unique), fontsize=8)
    axes[0].set_ylabel("false-negative rate of kept negatives (hidden positives / kept)")
    fig.suptitle("audit: false negatives against what is kept (anchor: o pair, v min, ^ max, s mean)",
                 fontsize=10)
    fig.tight_layout()
    return png(fig)


def perc_plot(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """False-negative rate against TopK-PercPos's `perc`, one line per anchor."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    perc = [r for r in rows if r["rule"] == "topk_percpos"]
    for anchor in dict.fromkeys(r["anchor"] for r in perc):
        pts = sorted((r["param"], r["fn_rate"]) for r in perc if r["anchor"] == anchor)
        ax.plot(*zip(*pts, strict=True), marker=MARKERS.get(anchor, "o"), label=f"anchor={anchor}")
    naive = next((r for r in rows if r["rule"] == "naive_topk"), None)
    if naive:
        ax.axhline(naive["fn_rate"], color="grey", ls="--", label="naive_topk")
    ax.set_xlabel("topk_percpos perc (keep s < s+ x perc)")
    ax.set_ylabel("false-negative rate of kept negatives")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def html_page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A self-contained page (no external files or scripts): `sections` are (heading, html)."""
    body = "\n".join(f"<h2>{html.escape(h)}</h2>\n{content}" for h, content in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


CSS = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
       "font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
       "th{background:#eee}td:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}"
       ".warn{color:#b00}")


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_image(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


AUDIT_COLUMNS = ("setting", "rule", "anchor", "param", "window", "examples", "examples_short",
                 "negatives_kept", "kept_mean_score", "hidden_in_window", "hidden_kept", "fn_rate",
                 "hidden_dropped", "filter_recall", "dropped", "dropped_not_hidden")


def audit_page(summary: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    """report.html of an audit: what was hidden, the table, the two plots."""
    intro = (f"<p>{summary['hidden_positives']} labelled positives of {summary['queries_audited']} "
             f"queries ({summary['hide_fraction']:.0%} of each, seed {summary['seed']}, split "
             f"{html.escape(summary['split'])}) were hidden from the miner; "
             f"{summary['queries_single_positive']} single-positive queries had nothing to hide. "
             "fn_rate = hidden positives kept as negatives / negatives kept; filter_recall = hidden "
             "positives dropped / hidden positives in the window.</p>")
    return html_page("posmine audit", [
        ("What was measured", intro), ("Settings", html_table(summary["settings"], AUDIT_COLUMNS)),
        ("Trade-off", html_image(plots["tradeoff.png"], "false-negative rate against negatives kept")),
        ("TopK-PercPos sweep", html_image(plots["fn_vs_perc.png"], "false-negative rate against perc"))])


# Each count of a mine stage and what it counts: candidates once per query's list, except the
# rule's passes, which the survivors window makes once per (candidate, example).
MINE_STATS = {
    "queries_in": "queries mined",
    "queries_out": "queries with at least one example kept",
    "examples": "examples: one per (query, positive) with anchor=pair, else one per query",
    "examples_too_few": "examples left with fewer than num_negatives negatives",
    "short_share": "share of examples short of negatives",
    "candidates": "candidates read, once each per query",
    "removed_positive": "candidates that are labelled positives of the query (never negatives)",
    "removed_self": "candidates that are the query itself",
    "removed_duplicate_text": "candidates whose text repeats the query's or a positive's",
    "dropped_by_rule": "passed over as too close to the positive: once per candidate per example",
    "negatives_kept": "hard negatives kept, over all examples",
    "positives_not_in_topk": "positives the teacher ranked outside the candidate list",
}


def _mine_section(manifest: Mapping[str, Any]) -> str:
    stats, m = manifest["stats"], manifest.get("mining", {})
    setting = ", ".join([describe_rule(m), *(f"{k}={m[k]}" for k in ("anchor", "window", "num_negatives",
                                                                     "top_k") if k in m)])
    warn = f'<p class="warn">{html.escape(stats["warning"])}</p>' if stats.get("warning") else ""
    rows = [{"count": k, "value": stats[k], "what it counts": what}
            for k, what in MINE_STATS.items() if k in stats]
    return (f"<p>{html.escape(setting)}</p>{warn}{_auto_section(manifest.get('auto'))}"
            f"{html_table(rows, ('count', 'value', 'what it counts'))}"
            f"{html_image(histogram_png(manifest), 'teacher score histogram')}")


def _auto_section(auto: Mapping[str, Any] | None) -> str:
    """How an `auto` value was picked, with the audit it was picked from."""
    if not auto:
        return ""
    table = html_table(auto["audit"], (auto["param"], "fn_rate", "short_share")) if "audit" in auto else ""
    return f"<p>{html.escape(describe_auto(auto))}</p>{table}"


def mine_page(mined_dir: str) -> str:
    """report.html of a mine stage: its setting, counts, warning and histogram."""
    return html_page(f"posmine mine: {storage.redact(mined_dir)}",
                     [("Mining", _mine_section(_mine_manifest(mined_dir)))])


def loss_png(curve: Sequence[Sequence[float]]) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if curve:
        ax.plot(*zip(*curve, strict=True), marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    return png(fig)


def run_page(out_dir: str) -> str:
    """report.html of a whole `posmine run`: base vs fine-tuned, the mining, the training."""
    summary = storage.read_json(storage.join(out_dir, "summary.json"))
    metrics = [{"metric": k, "base": summary["base"][k], "fine-tuned": summary["fine_tuned"][k],
                "delta": summary["fine_tuned"][k] - summary["base"][k]} for k in sorted(summary["base"])]
    sections = [("Base vs fine-tuned on " + html.escape(str(summary.get("split", ""))),
                 html_table(metrics, ("metric", "base", "fine-tuned", "delta")))]
    mine = storage.read_manifest(storage.join(out_dir, "mine"))
    if mine is not None:
        sections.append(("Mining", _mine_section(mine)))
    train = storage.read_manifest(storage.join(out_dir, "train"))
    if train is not None:
        rows = [{"": k, "value": v} for k, v in {**train["rows"], **train["stats"]}.items()
                if k != "loss_curve"]
        sections.append(("Training", html_table(rows, ("", "value"))
                         + html_image(loss_png(train["stats"].get("loss_curve") or []), "loss curve")))
    return html_page(f"posmine run: {storage.redact(out_dir)}", sections)


def write_report(path: str) -> str:
    """report.html for a mine stage, an audit or a run's output folder; returns its URL."""
    manifest = storage.read_manifest(path) or {}
    if manifest.get("stage") == "mine":
        page = mine_page(path)
    elif manifest.get("stage") == "audit":
        summary = storage.read_json(storage.join(path, "audit.json"))
        plots = {n: storage.read_bytes(storage.join(path, n)) for n in ("tradeoff.png", "fn_vs_perc.png")}
        page = audit_page(summary, plots)
    elif storage.exists(storage.join(path, "summary.json")):
        page = run_page(path)
    else:
        raise FileNotFoundError(f"{storage.redact(path)}: not a finished mine stage, audit or run "
                                "output folder (no mine/audit manifest, no summary.json)")
    url = storage.join(path, "report.html")
    storage.write_bytes(url, page.encode())
    return url
