"""`posmine report`: a PNG histogram of teacher scores from a mine stage's manifest.

Reads `<mine dir>/_manifest.json` (its histograms of positive, kept-negative and
dropped-negative scores, and how many examples ended short of negatives, with the mine
stage's warning when over 20% did); writes `scores.png` beside it or where asked.
"""

from __future__ import annotations

import io
from textwrap import fill

import numpy as np

from posmine import storage


def histogram(mined_dir: str, out: str | None = None) -> str:
    """Draw positives vs kept negatives vs negatives dropped by the rule; returns the PNG URL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = storage.read_manifest(mined_dir)
    if manifest is None or manifest.get("stage") != "mine":
        raise FileNotFoundError(f"{storage.redact(mined_dir)}: no finished mine stage (no manifest)")
    h = manifest["stats"]["histograms"]
    bins = np.asarray(h["bins"])
    centers, width = (bins[:-1] + bins[1:]) / 2, np.diff(bins)
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label, color in (("positive", "positives", "tab:green"),
                              ("kept", "kept negatives", "tab:blue"),
                              ("dropped", "dropped (likely false negatives)", "tab:red")):
        ax.bar(centers, h[key], width=width, alpha=0.55, color=color,
               label=f"{label} ({sum(h[key])})")
    lo = next((i for i in range(len(centers)) if any(h[k][i] for k in ("positive", "kept", "dropped"))), 0)
    ax.set_xlim(bins[lo], bins[-1])
    m, stats, note = manifest.get("mining", {}), manifest["stats"], ""
    ax.set_title(f"teacher scores, {manifest.get('split', '')}: {manifest.get('rule')} "
                 f"(perc={m.get('perc')}, margin={m.get('margin')}, threshold={m.get('threshold')}, "
                 f"anchor={m.get('anchor', 'min')})", fontsize=10)
    if "examples" in stats:  # manifests of older versions did not count examples
        short = (f"{stats['examples_too_few']} of {stats['examples']} examples "
                 f"({stats.get('short_share', 0):.0%}) have fewer than {m.get('num_negatives')} negatives")
        note = fill(stats["warning"], 120) if stats.get("warning") else short
    ax.set_xlabel("teacher score s(q, d)")
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout(rect=(0, 0.12 if note else 0, 1, 1))
    if note:  # under the axes: how many examples the rule starved, and what to change
        fig.text(0.01, 0.01, note, fontsize=8, va="bottom",
                 color="tab:red" if stats.get("warning") else "black")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    url = out or storage.join(mined_dir, "scores.png")
    storage.write_bytes(url, buf.getvalue())
    return url
