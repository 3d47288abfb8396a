"""Shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: Any, path: str | None) -> None:
    """Print the result as JSON, and write it to `path` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text)


def list_agreement(ours: dict, ref: dict, names: tuple[str, str] = ("posmine", "st")) -> dict[str, Any]:
    """Per training example both have (same key): identical negative lists, and the mean
    overlap of the sets (two empty lists agree fully); `names` label the two sides' counts."""
    common = sorted(set(ours) & set(ref))
    overlaps = [len(set(ours[e]) & set(ref[e])) / len(ref[e]) if ref[e] else float(not ours[e])
                for e in common]
    a, b = names
    return {f"examples_{a}": len(ours), f"examples_{b}": len(ref), "examples_both": len(common),
            "identical_lists": sum(ours[e] == ref[e] for e in common),
            "mean_overlap": sum(overlaps) / max(len(overlaps), 1),
            f"only_{a}": len(set(ours) - set(ref)), f"only_{b}": len(set(ref) - set(ours))}
