"""Evaluation: embed + sharded search with the model under test, then BEIR metrics.

Reads the data stage's queries/qrels and the embed stage's vectors (or makes them); writes
`<out>/evaluate/<model-hash>/metrics.json` with the metrics, split and config. Each candidate
shard is scored by a Ray task holding only its own queries' run and qrels; the driver adds the
shards' sums (`metrics.totals`), so a million queries are never held in one process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from posmine.config import EvaluateConfig, config_hash, to_dict
from posmine.core import metrics
from posmine.core.merge import brute_force_topk
from posmine.io import prepared, storage
from posmine.io.candidates import candidate_shards
from posmine.stages import lifecycle, remote


def run_from_candidates(cand_url: str) -> dict[str, dict[str, float]]:
    """{query_id: {doc_id: score}} from a candidates Parquet file."""
    table = storage.read_parquet(cand_url)
    return {q: dict(zip(d, s, strict=True)) for q, d, s in zip(
        table.column("query_id").to_pylist(), table.column("doc_ids").to_pylist(),
        table.column("scores").to_pylist(), strict=True)}


def qrels_dict(data_dir: str, split: str) -> dict[str, dict[str, int]]:
    return qrels_of(prepared.read_prepared_qrels(data_dir, split))


def qrels_of(table: pa.Table) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for q, d, s in zip(*(table.column(c).to_pylist() for c in ("query_id", "doc_id", "score")),
                       strict=True):
        out.setdefault(q, {})[d] = s
    return out


def shard_totals(cfg: EvaluateConfig, data_dir: str, shard_url: str) -> tuple[dict[str, float], int]:
    """`metrics.totals` of one candidate shard, against the qrels of its queries only."""
    run = run_from_candidates(shard_url)
    qrels = prepared.read_prepared_qrels(data_dir, cfg.split)
    qrels = qrels.filter(pc.is_in(qrels.column("query_id"), value_set=pa.array(list(run), pa.string())))
    return metrics.totals(qrels_of(qrels), run, cfg.k_values, cfg.ignore_identical_ids)


def score_vectors(cfg: EvaluateConfig, qrels: metrics.Qrels, query_ids: Sequence[str],
                  queries: np.ndarray, doc_ids: Sequence[str], docs: np.ndarray) -> dict[str, float]:
    """The metrics of exact dot-product ranking, (nq, dim) queries against (nd, dim) documents:
    the stage's scoring in one process, for sets that fit one (Tune's dev set)."""
    scores, idx = brute_force_topk(docs, queries, min(cfg.top_k, len(doc_ids)))  # (nq, k) each
    run = {qid: {doc_ids[j]: float(s) for s, j in zip(srow, irow, strict=True)}
           for qid, srow, irow in zip(query_ids, scores, idx, strict=True)}
    return metrics.evaluate(qrels, run, cfg.k_values, cfg.ignore_identical_ids)


def _sum_shards(cfg: EvaluateConfig, data_dir: str, cand_dir: str) -> tuple[dict[str, float], int]:
    """The shards' sums, added in shard order (Ray tasks when Ray is up)."""
    import ray

    shards = candidate_shards(cand_dir)
    if ray.is_initialized():
        task: Any = ray.remote(num_cpus=1)(shard_totals)
        parts = ray.get([task.remote(cfg, data_dir, u) for u in shards])
    else:
        parts = [shard_totals(cfg, data_dir, u) for u in shards]
    sums: dict[str, float] = {}
    for part, _ in parts:
        for name, v in part.items():
            sums[name] = sums.get(name, 0.0) + v
    return sums, sum(n for _, n in parts)


def run(cfg: EvaluateConfig, data_dir: str, cand_dir: str, out_dir: str,
          model: str, upstream: str) -> dict[str, Any]:
    """Metrics of one model's candidates on `cfg.split`, written to `metrics.json` (skipped when
    current: the key follows the candidates, which follow the model's embeddings)."""
    key = config_hash(cfg, upstream)
    target = storage.join(out_dir, "evaluate", key)

    def work() -> lifecycle.Done:
        remote.ensure_ray()
        started = time.time()
        qrels = prepared.read_prepared_qrels(data_dir, cfg.split)  # Arrow: no dict per query here
        sums, n = _sum_shards(cfg, data_dir, cand_dir)
        result = metrics.mean(sums, n)
        storage.write_json(storage.join(target, "metrics.json"), {
            "model": model, "split": cfg.split, "metrics": result, "evaluate": to_dict(cfg),
            "seconds": round(time.time() - started, 3)})
        queries = pc.count_distinct(qrels.column("query_id")).as_py()
        return lifecycle.Done({"queries": queries}, extra={"model": model, "split": cfg.split},
                            outputs=["metrics.json"])

    lifecycle.run_stage(target, "evaluate", key, work)
    return dict(storage.read_json(storage.join(target, "metrics.json")))
