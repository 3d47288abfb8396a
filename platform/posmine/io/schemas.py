"""Arrow schemas of every stage's files: the contracts between stages.

Ids are strings everywhere (BEIR ids such as "4983" are not integers in general).
"""

from __future__ import annotations

import pyarrow as pa

CORPUS = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
QUERIES = pa.schema([("id", pa.string()), ("text", pa.string())])
QRELS = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.int32())])


def embeddings(dim: int) -> pa.Schema:
    """`id, embedding` with a fixed-size float32 list of `dim` values."""
    return pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


CANDIDATES = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_ids", pa.list_(pa.string())),  # sorted by score, best first
        ("scores", pa.list_(pa.float32())),
        # For mining (empty otherwise): the query's positives (qrels order) and the negatives its
        # training file listed, with their exact teacher scores, which the top-K may not hold.
        ("positive_ids", pa.list_(pa.string())),
        ("positive_scores", pa.list_(pa.float32())),
        ("file_negative_ids", pa.list_(pa.string())),
        ("file_negative_scores", pa.list_(pa.float32())),
    ]
)

MINED = pa.schema(
    [
        ("query_id", pa.string()),
        ("query", pa.string()),
        ("positive_ids", pa.list_(pa.string())),
        ("positives", pa.list_(pa.string())),
        ("positive_scores", pa.list_(pa.float32())),
        ("negative_ids", pa.list_(pa.string())),
        ("negatives", pa.list_(pa.string())),
        ("negative_scores", pa.list_(pa.float32())),
        # Every labelled positive of the query (with anchor=pair a row holds one of them), and
        # `mining.text_hash` of each one's text: training never uses these as negatives.
        ("query_positive_ids", pa.list_(pa.string())),
        ("query_positive_hashes", pa.list_(pa.int64())),
    ]
)


def check(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Cast `table` to `schema`, raising a ValueError naming `where` and the columns on mismatch."""
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; expected {schema.names}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"{where}: columns do not match the schema {schema}: {e}") from e
