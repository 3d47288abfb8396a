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
