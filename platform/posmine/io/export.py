"""`posmine export`: a finished mine stage's examples in the formats other trainers read.

- `st-triplet`, `st-n-tuple`, `st-labeled-pair`, `st-labeled-list`: the four
  `output_format`s of sentence-transformers' `mine_hard_negatives`, with its column names
  (`anchor`, `positive`, then `negative` / `negative_1..n` / `label(s)`); `--scores` adds the
  teacher's scores as its `output_scores=True` does (`scores` lists positive first; the
  labelled formats' `label(s)` become `score(s)`). Parquet, or JSON lines when OUT ends in
  `.jsonl`; `datasets.load_dataset("parquet" | "json", data_files=OUT)` reads either.
- `flagembedding`: FlagEmbedding's `{"query", "pos", "neg"}` JSONL (`pos_scores` and
  `neg_scores`, its distillation fields, with `--scores`); posmine reads it back as input.
- `nemo`: NeMo AutoModel's corpus-ID JSON in folder OUT: `train.json` and `corpus/` with
  `merlin_metadata.json` and `corpus.parquet` (`id, text`), the layout its retrieval dataset
  loads; posmine reads it back as input.
- `parquet`: the mined Parquet itself (`schemas.MINED`; scores only with `--scores`).

A row of the mined Parquet is one training example: a query with its positive(s) and the
negatives mined for them (with `mining.anchor=pair`, one positive each). The sentence-
transformers formats have one row per (query, positive), as `mine_hard_negatives` does.
Outputs are written whole or not at all (`storage.write_bytes`), and only from a mine
stage whose manifest says it finished.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from posmine.io import storage

FORMATS = ("st-triplet", "st-n-tuple", "st-labeled-pair", "st-labeled-list", "flagembedding",
           "nemo", "parquet")


class ExportError(ValueError):
    """The mine folder or the request cannot be exported; the message says why."""


@dataclass(frozen=True)
class Example:
    """One (query, positive) pair and the negatives mined for it."""

    query: str
    positive: str
    positive_score: float
    negatives: list[str]
    negative_scores: list[float]


def examples(mined: pa.Table) -> Iterator[Example]:
    """Every (query, positive) of the mined rows, in row order."""
    for r in mined.to_pylist():
        for p, s in zip(r["positives"], r["positive_scores"], strict=True):
            yield Example(r["query"], p, float(s), list(r["negatives"]),
                          [float(x) for x in r["negative_scores"]])


def st_triplet(mined: pa.Table, scores: bool) -> tuple[pa.Table, int]:
    """(anchor, positive, negative[, scores=[s+, s-]]): one row per negative."""
    cols: dict[str, list[Any]] = {"anchor": [], "positive": [], "negative": [], "scores": []}
    for e in examples(mined):
        for n, s in zip(e.negatives, e.negative_scores, strict=True):
            cols["anchor"].append(e.query)
            cols["positive"].append(e.positive)
            cols["negative"].append(n)
            cols["scores"].append([e.positive_score, s])
    return _table(cols, scores, "scores"), 0


def st_n_tuple(mined: pa.Table, k: int, scores: bool) -> tuple[pa.Table, int]:
    """(anchor, positive, negative_1..negative_k[, scores]); examples with fewer than k
    negatives are left out (the format has a fixed width), and counted."""
    cols: dict[str, list[Any]] = {"anchor": [], "positive": [],
                                  **{f"negative_{i}": [] for i in range(1, k + 1)}, "scores": []}
    short = 0
    for e in examples(mined):
        if len(e.negatives) < k:
            short += 1
            continue
        cols["anchor"].append(e.query)
        cols["positive"].append(e.positive)
        for i in range(k):
            cols[f"negative_{i + 1}"].append(e.negatives[i])
        cols["scores"].append([e.positive_score, *e.negative_scores[:k]])
    return _table(cols, scores, "scores"), short


def st_labeled_pair(mined: pa.Table, scores: bool) -> tuple[pa.Table, int]:
    """(anchor, positive, label 1|0 or score): per query its positives, then the negatives
    mined against its weakest positive (the strictest bound), each document once: one negative
    set per query, as `mine_hard_negatives` lists them."""
    by_query: dict[str, list[Example]] = {}
    for e in examples(mined):
        by_query.setdefault(e.query, []).append(e)
    cols: dict[str, list[Any]] = {"anchor": [], "positive": [], "label": [], "score": []}
    for query, group in by_query.items():
        weakest = min(group, key=lambda e: e.positive_score)
        rows = [*((e.positive, 1, e.positive_score) for e in group),
                *zip(weakest.negatives, [0] * len(weakest.negatives), weakest.negative_scores,
                     strict=True)]
        seen: set[str] = set()
        for doc, label, s in rows:
            if doc not in seen:
                seen.add(doc)
                cols["anchor"].append(query)
                cols["positive"].append(doc)
                cols["label"].append(label)
                cols["score"].append(s)
    return _table(cols, scores, "score", instead="label"), 0


def st_labeled_list(mined: pa.Table, scores: bool) -> tuple[pa.Table, int]:
    """(anchor, positive=[positive, negatives...], labels=[1, 0...] or scores)."""
    cols: dict[str, list[Any]] = {"anchor": [], "positive": [], "labels": [], "scores": []}
    for e in examples(mined):
        cols["anchor"].append(e.query)
        cols["positive"].append([e.positive, *e.negatives])
        cols["labels"].append([1] + [0] * len(e.negatives))
        cols["scores"].append([e.positive_score, *e.negative_scores])
    return _table(cols, scores, "scores", instead="labels"), 0


def _table(cols: dict[str, list[Any]], scores: bool, score_col: str, instead: str | None = None) -> pa.Table:
    """The columns, with `score_col` only when `scores` (replacing `instead` when given)."""
    drop = instead if scores else score_col
    return pa.table({k: v for k, v in cols.items() if k != drop})


def flagembedding_lines(mined: pa.Table, scores: bool) -> bytes:
    """One `{"query", "pos", "neg"}` line per mined row (FlagEmbedding's training JSONL)."""
    out = io.StringIO()
    for r in mined.to_pylist():
        rec: dict[str, Any] = {"query": r["query"], "pos": r["positives"], "neg": r["negatives"]}
        if scores:
            rec["pos_scores"], rec["neg_scores"] = r["positive_scores"], r["negative_scores"]
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out.getvalue().encode()


def write_nemo(mined: pa.Table, out: str, corpus_id: str = "posmine") -> dict[str, int]:
    """NeMo AutoModel's corpus-ID JSON: `train.json` referencing `corpus/` by id."""
    docs: dict[str, str] = {}
    data = []
    for r in mined.to_pylist():
        for ids, texts in ((r["positive_ids"], r["positives"]), (r["negative_ids"], r["negatives"])):
            docs.update(zip(ids, texts, strict=True))
        data.append({"question_id": r["query_id"], "question": r["query"], "corpus_id": corpus_id,
                     "pos_doc": [{"id": d} for d in r["positive_ids"]],
                     "neg_doc": [{"id": d} for d in r["negative_ids"]]})
    corpus = pa.table({"id": list(docs), "text": list(docs.values())})
    storage.write_parquet(corpus, storage.join(out, "corpus", "corpus.parquet"))
    storage.write_bytes(storage.join(out, "corpus", "merlin_metadata.json"),
                        json.dumps({"class": "TextQADataset", "corpus_id": corpus_id}).encode())
    # train.json last: the folder is usable once it exists (the corpus path is relative to it)
    storage.write_bytes(storage.join(out, "train.json"), json.dumps(
        {"corpus": [{"path": "corpus"}], "data": data}, ensure_ascii=False).encode())
    return {"examples": len(data), "passages": corpus.num_rows}


def _encode(table: pa.Table, out: str) -> bytes:
    if out.endswith(".jsonl"):
        return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in table.to_pylist())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_mined(mine_dir: str) -> tuple[pa.Table, dict[str, Any]]:
    """The mined Parquet of a finished mine stage, and its manifest."""
    manifest = storage.read_manifest(mine_dir)
    if manifest is None or manifest.get("stage") != "mine":
        raise ExportError(f"{storage.redact(mine_dir)}: not a finished mine stage (no mine "
                          "manifest: run `posmine mine` first, or let it finish)")
    return storage.read_parquet(storage.join(mine_dir, "mined.parquet")), manifest


def export(mine_dir: str, fmt: str, out: str, scores: bool = False,
           num_negatives: int | None = None) -> dict[str, Any]:
    """Write the mine stage at `mine_dir` as `fmt` to `out`; returns what was written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    mined, manifest = read_mined(mine_dir)
    k = num_negatives or int(manifest.get("mining", {}).get("num_negatives", 4))
    summary: dict[str, Any] = {"format": fmt, "out": storage.redact(out), "mined_rows": mined.num_rows}
    if fmt == "nemo":
        return {**summary, **write_nemo(mined, out)}
    if fmt == "flagembedding":
        storage.write_bytes(out, flagembedding_lines(mined, scores))
        return {**summary, "rows": mined.num_rows}
    if fmt == "parquet":
        table = mined if scores else mined.drop_columns(["positive_scores", "negative_scores"])
        short = 0
    else:
        table, short = {"st-triplet": lambda: st_triplet(mined, scores),
                        "st-n-tuple": lambda: st_n_tuple(mined, k, scores),
                        "st-labeled-pair": lambda: st_labeled_pair(mined, scores),
                        "st-labeled-list": lambda: st_labeled_list(mined, scores)}[fmt]()
    storage.write_bytes(out, _encode(table, out))
    summary.update(rows=table.num_rows, columns=table.column_names)
    if fmt == "st-n-tuple":
        summary.update(num_negatives=k, left_out_short=short)
    return summary
