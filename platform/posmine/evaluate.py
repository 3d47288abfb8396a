"""Evaluation: embed + sharded search with the model under test, then BEIR metrics.

Reads the data stage's queries/qrels and the embed stage's vectors (or makes them); writes
`<out>/evaluate/<model-hash>/metrics.json` with the metrics, split and config.
"""

from __future__ import annotations

import time
from typing import Any

from posmine import data, metrics, storage
from posmine.config import EvaluateConfig, config_hash, to_dict


def run_from_candidates(cand_url: str) -> dict[str, dict[str, float]]:
    """{query_id: {doc_id: score}} from a candidates Parquet file."""
    table = storage.read_parquet(cand_url)
    return {q: dict(zip(d, s, strict=True)) for q, d, s in zip(
        table.column("query_id").to_pylist(), table.column("doc_ids").to_pylist(),
        table.column("scores").to_pylist(), strict=True)}


def qrels_dict(data_dir: str, split: str) -> dict[str, dict[str, int]]:
    table = data.read_prepared_qrels(data_dir, split)
    out: dict[str, dict[str, int]] = {}
    for q, d, s in zip(*(table.column(c).to_pylist() for c in ("query_id", "doc_id", "score")),
                       strict=True):
        out.setdefault(q, {})[d] = s
    return out


def score(cfg: EvaluateConfig, data_dir: str, cand_dir: str, out_dir: str,
          model: str, upstream: str) -> dict[str, Any]:
    """Metrics of one model's candidates on `cfg.split`, written to `metrics.json` (skipped when
    current: the key follows the candidates, which follow the model's embeddings)."""
    key = config_hash(cfg, upstream)
    target = storage.join(out_dir, "evaluate", key)

    def work() -> storage.Done:
        started = time.time()
        qrels = qrels_dict(data_dir, cfg.split)
        result = metrics.evaluate(qrels, run_from_candidates(storage.join(cand_dir, "candidates.parquet")),
                                  cfg.k_values, cfg.ignore_identical_ids)
        storage.write_json(storage.join(target, "metrics.json"), {
            "model": model, "split": cfg.split, "metrics": result, "evaluate": to_dict(cfg),
            "seconds": round(time.time() - started, 3)})
        return storage.Done({"queries": len(qrels)}, extra={"model": model, "split": cfg.split},
                            outputs=["metrics.json"])

    storage.run_stage(target, "evaluate", key, work)
    return dict(storage.read_json(storage.join(target, "metrics.json")))
