"""posmine: positive-aware hard-negative mining and contrastive fine-tuning, on Ray.

```python
from posmine import mine_hard_negatives  # sentence-transformers' function, NV-Retriever's rules
from posmine import run, load_config  # the whole line: mine, fine-tune, evaluate
```
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["RunResult", "__version__", "load_config", "mine_hard_negatives", "run"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `posmine --version` and `import posmine` stay instant (no torch).
    if name in ("mine_hard_negatives", "run", "RunResult"):
        from posmine import api

        return getattr(api, name)
    if name == "load_config":
        from posmine.config import load_config

        return load_config
    raise AttributeError(f"module 'posmine' has no attribute {name!r}")
