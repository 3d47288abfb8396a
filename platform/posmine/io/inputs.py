"""The input files' common ground, for the BEIR reader (`beir`) and the other formats'
(`sources`): errors that name the file and line, warnings, JSON lines read with their line
numbers, `beir:<name>` located (or downloaded once), and seeded splits by query.
"""

from __future__ import annotations

import gzip
import json
import logging
import lzma
import os
import random
import re
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from posmine.config import default_beir_dir
from posmine.io import storage

log = logging.getLogger(__name__)

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"


class DataError(ValueError):
    """Bad input data; the message names the file and the line or id."""


@dataclass
class Warnings:
    """Things worth telling the user that do not stop the run."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.examples.setdefault(kind, where)


def resolve(path: str) -> str:
    """Turn `beir:<name>` into a local folder: `$POSMINE_BEIR_DIR/<name>` (default
    `../shared/data/beir/<name>`) when it holds the dataset, else a cached copy (downloaded
    once); other paths as is."""
    if not path.startswith("beir:"):
        return path.rstrip("/")
    name = path[len("beir:"):]
    cache = Path(os.environ.get("POSMINE_CACHE", Path.home() / ".cache" / "posmine")) / "beir"
    for target in (Path(default_beir_dir(name)), cache / name):
        if any((target / f"corpus{ext}").exists() for ext in (".jsonl", ".jsonl.gz", ".parquet")):
            return str(target)
    target = cache / name
    url = os.environ.get("POSMINE_BEIR_URL", BEIR_URL).format(name=name)
    cache.mkdir(parents=True, exist_ok=True)
    tmp_zip = cache / f"{name}.zip.part"
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp_zip, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        with zipfile.ZipFile(tmp_zip) as z:
            tmp_dir = cache / f".{name}.unpacking"
            z.extractall(tmp_dir)
        # BEIR zips hold one folder named after the dataset.
        inner = tmp_dir / name if (tmp_dir / name).is_dir() else tmp_dir
        inner.rename(target)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"beir:{name}: download from {url} failed: {e}") from e
    finally:
        tmp_zip.unlink(missing_ok=True)
    return str(target)


def raw_lines(url: str) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a possibly compressed file; DataError, naming the line, when the
    compressed stream is damaged (truncated download, flipped bytes, not gzip at all)."""
    lineno = 0
    with storage.open_read(url) as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (gzip.BadGzipFile, zlib.error, EOFError, lzma.LZMAError) as e:
                raise DataError(f"{url}:{lineno + 1}: the compressed file is damaged "
                                f"({type(e).__name__}: {e})") from e
            lineno += 1
            yield lineno, raw


def iter_jsonl(url: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; DataError on bad bytes or JSON."""
    seen_any = False
    for lineno, raw in raw_lines(url):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{url}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{url}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{url}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if _SURROGATE_ESCAPE.search(raw):
            check_encodable(obj, f"{url}:{lineno}")
        seen_any = True
        yield lineno, obj
    if not seen_any:
        raise DataError(f"{url}: empty file (no records)")


# A JSON escape of a UTF-16 surrogate: a lone one decodes to a str that UTF-8 cannot hold.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def check_encodable(obj: dict[str, Any], where: str) -> None:
    """DataError naming the field whose text holds a lone surrogate (`"\\ud800"` unpaired)."""
    for key, value in obj.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{where}: {key!r} holds an unpaired surrogate "
                                f"({value[e.start]!r} at character {e.start}), not text") from None


def sample_queries(qrels: pa.Table, n: int, seed: int) -> pa.Array:
    """`n` of the distinct query ids, drawn as `random.Random(seed).sample(sorted ids, n)` draws
    them (the positions depend only on the count), without a Python list of every id."""
    qids = pc.unique(qrels.column("query_id"))
    qids = qids.take(pc.array_sort_indices(qids))
    return qids.take(pa.array(random.Random(seed).sample(range(len(qids)), n), pa.int64()))


def split_queries(qrels: pa.Table, n: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """(rest, held out): `n` queries drawn seeded, with all their rows."""
    mask = pc.is_in(qrels.column("query_id"), value_set=sample_queries(qrels, n, seed))
    return qrels.filter(pc.invert(mask)), qrels.filter(mask)
