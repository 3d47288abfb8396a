"""Storage on any fsspec URL: local paths, s3://, gs://, ...; atomic writes and stage manifests.

Credentials and endpoints come from the environment only (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, ...), the way botocore and the other fsspec
backends read them; nothing here takes them from a config or writes them anywhere.

A stage's output folder is finished when it holds `_manifest.json`, written last. A folder
without one is unfinished whatever else it holds, so a crash halfway never looks done.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"


class StorageError(OSError):
    """A URL cannot be reached or used; the message names it (without credentials)."""


def redact(url: str) -> str:
    """`url` without any `user:password@` part, for messages and logs."""
    return re.sub(r"//[^/@]*@", "//", url)


def _storage_options(protocol: str) -> dict[str, Any]:
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        return fsspec.core.url_to_fs(url, **_storage_options(protocol))
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open {redact(url)}: unknown or unavailable scheme "
                           f"{protocol!r} ({e})") from e


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with '/'."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str) -> None:
    """Remove a file or folder tree if it exists."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def listdir(url: str) -> list[str]:
    """Base names under `url` (empty when it does not exist)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


@contextmanager
def open_read(url: str, compression: str | None = "infer") -> Iterator[IO[bytes]]:
    """Open `url` for binary reading, decompressing `.gz` etc. transparently."""
    try:
        with fsspec.open(url, "rb", compression=compression,
                         **_storage_options(url.split("://")[0] if "://" in url else "file")) as f:
            yield f
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{redact(url)}: no such file") from e


def read_text(url: str) -> str:
    with open_read(url) as f:
        return f.read().decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` so that readers see the old object or the whole new one.

    Local files are written under a temporary name and renamed; an object store PUT
    only becomes visible once complete.
    """
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if is_local(url):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def arrow_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for `url` (wrapping fsspec), for pyarrow and Ray Data I/O."""
    fs, path = filesystem(url)
    if is_local(url):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def write_parquet(table: pa.Table, url: str) -> None:
    """Write one Parquet file atomically (see `write_bytes`)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(url, buf.getvalue())


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file, or every `*.parquet` file in a folder, in name order."""
    fs, path = filesystem(url)
    if fs.isdir(path):
        files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
        if not files:
            raise FileNotFoundError(f"{redact(url)}: no .parquet files")
    else:
        files = [path]
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


# ---------------------------------------------------------------- manifests


def read_manifest(stage_dir: str) -> dict[str, Any] | None:
    url = join(stage_dir, MANIFEST)
    try:
        return dict(read_json(url))
    except FileNotFoundError:
        return None


def is_done(stage_dir: str, config_hash: str) -> bool:
    """True when `stage_dir` holds a manifest written for the same config hash."""
    m = read_manifest(stage_dir)
    return m is not None and m.get("config_hash") == config_hash


def begin_stage(stage_dir: str) -> None:
    """Mark `stage_dir` unfinished (drop its manifest) before writing into it."""
    makedirs(stage_dir)
    fs, path = filesystem(join(stage_dir, MANIFEST))
    if fs.exists(path):
        fs.rm(path)


def commit_stage(stage_dir: str, stage: str, config_hash: str, *,
                 rows: Mapping[str, int], started: float,
                 stats: Mapping[str, Any] | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the manifest last: from now on the stage counts as finished."""
    manifest = {
        "stage": stage,
        "config_hash": config_hash,
        "rows": dict(rows),
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stats": dict(stats or {}),
        **dict(extra or {}),
    }
    write_json(join(stage_dir, MANIFEST), manifest)
    return manifest
