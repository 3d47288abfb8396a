"""Embeddings on storage: Parquet files of `id, embedding` (a fixed-size float32 list column),
read back as (n, dim) matrices and checked (dimension, NaN and inf) naming the file and id.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from posmine.io import schemas, storage

# The model folders' checks live with the backbone; named here too, where the stages use them.


class EmbeddingError(ValueError):
    """Vectors that cannot be used (NaN, wrong dimension); the message names file and id."""


# Vectors per Parquet row group: the search stage streams query vectors a group at a time, so
# a part of a million queries is never decoded whole.
ROW_GROUP = 65536


def embeddings_table(ids: list[str], emb: np.ndarray) -> pa.Table:
    """(n,) ids + (n, dim) float32 -> Arrow table with a fixed-size list column."""
    dim = emb.shape[1]
    flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1))
    return pa.table({"id": pa.array(ids, pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)},
                    schema=schemas.embeddings(dim))


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The fixed-size list column 'embedding' as an (n, dim) matrix (a view where Arrow allows)."""
    col = table.column("embedding").combine_chunks()
    # flatten, not .values: it honours a slice's offset
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)


def read_embeddings(url: str, dim: int | None = None) -> tuple[list[str], np.ndarray]:
    """ids and an (n, dim) float32 matrix from an embeddings Parquet file or folder.

    Raises EmbeddingError for files of different dimensions, a dimension other than `dim`,
    or NaN/inf vectors, naming the file and the first bad id.
    """
    try:
        table = storage.read_parquet(url)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise EmbeddingError(f"{storage.redact(url)}: embedding files disagree ({e})") from e
    field_type = table.schema.field("embedding").type if "embedding" in table.column_names else None
    if not isinstance(field_type, pa.FixedSizeListType):
        raise EmbeddingError(f"{storage.redact(url)}: no fixed-size list column 'embedding'")
    mat = embedding_matrix(table)
    ids = table.column("id").to_pylist()
    check_vectors(ids, mat, storage.redact(url), dim)
    return ids, mat.astype(np.float32, copy=False)


def check_vectors(ids: list[str], mat: np.ndarray, where: str, dim: int | None = None) -> None:
    """(n, d) vectors: finite, and `dim`-dimensional when `dim` is given."""
    if dim is not None and mat.shape[1] != dim:
        raise EmbeddingError(f"{where}: vectors are {mat.shape[1]}-d, expected {dim}-d "
                             "(embedded with another model?)")
    bad = ~np.isfinite(mat).all(axis=1)  # (n,)
    if bad.any():
        raise EmbeddingError(f"{where}: {int(bad.sum())} vector(s) with NaN or inf, first id "
                             f"{ids[int(bad.argmax())]!r}")


def vectors_for(url: str, ids: set[str]) -> dict[str, np.ndarray]:
    """{id: (dim,) float32} of the listed ids in an embeddings file or folder, read one file at a
    time so that only the wanted vectors are held."""
    wanted = pa.array(sorted(ids), pa.string())
    out: dict[str, np.ndarray] = {}
    for part in storage.parquet_files(url):
        table = storage.read_parquet(part)
        table = table.filter(pc.is_in(table.column("id"), wanted))
        mat = embedding_matrix(table).astype(np.float32)  # (n, dim)
        out.update(zip(table.column("id").to_pylist(), mat, strict=True))
    return out


def embedding_dim(url: str) -> int:
    """The vector size of an embeddings Parquet file, from its schema alone."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        return int(pq.ParquetFile(f).schema_arrow.field("embedding").type.list_size)


def pair_scores(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """s(q_i, d_i) for each row pair: (n, dim), (n, dim) -> (n,) float32. One row's score does
    not depend on the other rows (no BLAS blocking), so every stage that scores a pair gets the
    same bits."""
    return np.einsum("nd,nd->n", queries, docs)


def positive_scores(embed_dir: str, positives: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Teacher score s(q, d) for every query's listed documents (its positives, or the file's
    negatives), read from the embeddings in one process: (P,) per query. The search stage
    scores them on its shards (`index.ShardedSearch.score_pairs`); this is the reference."""
    qids, qmat = read_embeddings(storage.join(embed_dir, "queries"))
    need = {d for ps in positives.values() for d in ps}
    table = storage.read_parquet(storage.join(embed_dir, "corpus"))
    table = table.filter(pc.is_in(table.column("id"), pa.array(sorted(need))))
    dmat = embedding_matrix(table)  # (D, dim)
    drow = {d: i for i, d in enumerate(table.column("id").to_pylist())}
    qrow = {q: i for i, q in enumerate(qids)}
    return {q: pair_scores(qmat[[qrow[q]] * len(ps)], dmat[[drow[p] for p in ps]])
            for q, ps in positives.items()}  # (P, dim), (P, dim) -> (P,)
