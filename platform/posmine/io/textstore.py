"""The corpus and query texts held across the cluster by Ray actors, split by id, with each
text's duplicate keys computed once when loaded.

The mine stage needs, per candidate shard, the duplicate key of every candidate
(`mining.text_key`) and the texts of the examples it writes. Reading the corpus in every
mining worker costs a full scan per shard; holding it in the driver does not scale. Here
`TextShard` i of n holds the rows whose `bucket(id) == i` (crc32 of the id, mod n) of the
data stage's `corpus/` and `queries.parquet/`, so the texts live once across the cluster and a
lookup goes to the one shard that holds each id.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from posmine.core import mining
from posmine.io import prepared, storage

DOCS_PER_SHARD = 1_000_000  # texts per actor: ~0.5 GB (strings, keys, dicts) for 200-byte passages


def bucket(ids: Sequence[str], n: int) -> np.ndarray:
    """(len(ids),) the shard of each id: crc32 mod n, the same in every process."""
    return np.fromiter((zlib.crc32(i.encode()) % n for i in ids), np.int64, len(ids))


class TextShard:
    """One share of the texts: id -> text, duplicate key (`mining.text_key` under `dedup`) and
    `mining.text_hash` (training's check), per side ("corpus", "queries")."""

    def __init__(self, data_dir: str, shard: int, num_shards: int, dedup: str) -> None:
        self.texts: dict[str, dict[str, str]] = {}
        self.keys: dict[str, dict[str, int]] = {}
        self.hashes: dict[str, dict[str, int]] = {}
        for side, url in (("corpus", storage.join(data_dir, "corpus")),
                          ("queries", storage.join(data_dir, prepared.QUERIES))):
            texts: dict[str, str] = {}
            for part in storage.parquet_files(url):  # one part file in memory at a time
                table = storage.read_parquet(part)
                mine = bucket(table.column("id").to_pylist(), num_shards) == shard
                texts.update(prepared.texts_of(table.filter(pa.array(mine))))  # only this shard's
            self.texts[side] = texts
            self.hashes[side] = {i: mining.text_hash(t) for i, t in texts.items()}
            self.keys[side] = (self.hashes[side] if dedup != "exact"
                               else {i: mining.text_key(t, "exact") for i, t in texts.items()})

    def lookup(self, side: str, what: str, ids: Sequence[str]) -> list[Any]:
        tables: dict[str, dict[str, dict[str, Any]]] = {"text": self.texts, "key": self.keys,
                                                        "hash": self.hashes}
        table = tables[what][side]
        try:
            return [table[i] for i in ids]
        except KeyError as e:
            raise KeyError(f"{side} id {e.args[0]!r} is not in the data stage's {side}") from None

    def ready(self) -> bool:
        return True


class TextStore:
    """The client: routes each id to its shard and puts the answers back in request order."""

    def __init__(self, data_dir: str, dedup: str, num_shards: int | None = None,
                 in_process: bool = False) -> None:
        """Start the shard actors (one per `DOCS_PER_SHARD` passages unless `num_shards`), or with
        `in_process` hold every text in this process (small data: no actor to start)."""
        self.local = TextShard(data_dir, 0, 1, dedup) if in_process else None
        self.handles: list[Any] = []
        if in_process:
            return
        import ray

        docs = prepared.parquet_rows(storage.join(data_dir, "corpus"))
        n = num_shards or max(1, math.ceil(docs / DOCS_PER_SHARD))
        # num_cpus=0: the shards hold memory and answer lookups; the miners do the work
        cls: Any = ray.remote(num_cpus=0)(TextShard)
        self.handles = [cls.remote(data_dir, i, n, dedup) for i in range(n)]
        ray.get([h.ready.remote() for h in self.handles])  # a load error surfaces here, named

    def __reduce__(self) -> tuple[Any, ...]:
        # a copy sent to a mining worker is a client of the same actors (never of a local copy)
        if self.local is not None:
            raise TypeError("an in-process TextStore cannot be sent to another process")
        return (_client, (self.handles,))

    def _lookup(self, side: str, what: str, ids: Sequence[str]) -> list[Any]:
        import ray

        if self.local is not None:
            return self.local.lookup(side, what, ids)
        n = len(self.handles)
        where = bucket(ids, n)  # (len(ids),)
        arr = np.asarray(ids, dtype=object)
        order = [np.flatnonzero(where == i) for i in range(n)]
        answers = ray.get([h.lookup.remote(side, what, arr[o].tolist())
                           for h, o in zip(self.handles, order, strict=True)])
        out: list[Any] = [None] * len(ids)
        for o, got in zip(order, answers, strict=True):
            for j, v in zip(o.tolist(), got, strict=True):
                out[j] = v
        return out

    def texts(self, side: str, ids: Sequence[str]) -> dict[str, str]:
        return dict(zip(ids, self._lookup(side, "text", ids), strict=True))

    def keys(self, side: str, ids: Sequence[str]) -> np.ndarray:
        """(len(ids),) int64 duplicate keys, in request order."""
        return np.asarray(self._lookup(side, "key", ids), dtype=np.int64)

    def hashes(self, side: str, ids: Sequence[str]) -> np.ndarray:
        return np.asarray(self._lookup(side, "hash", ids), dtype=np.int64)

    def close(self) -> None:
        """Stop the actors (from the process that started them)."""
        import ray

        for h in self.handles:
            ray.kill(h)


def _client(handles: list[Any]) -> TextStore:
    store = TextStore.__new__(TextStore)
    store.local, store.handles = None, handles
    return store
