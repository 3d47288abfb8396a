"""Storage on any fsspec URL: local paths, s3://, gs://, ...; atomic writes, Parquet, manifests read.

Credentials and endpoints come from the environment only (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, ...), the way botocore and the other fsspec
backends read them; nothing here takes them from a config or writes them anywhere.

A stage's output folder is finished when it holds `_manifest.json`, written last. A folder
without one is unfinished whatever else it holds, so a crash halfway never looks done.

Every call here is retried on transient errors (connection refused or reset, timeouts, 5xx,
SlowDown) with exponential backoff, `POSMINE_STORAGE_RETRIES` times (default 6, about a
minute in all); then it fails with a `StorageError` naming the URL. Missing buckets and
missing credentials fail at once with a message that says so.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from posmine.io.redaction import RedactingFilter, has_credentials, redact, redact_all

__all__ = ["RedactingFilter", "redact", "redact_all"]  # the CLI and stages reach them here too

MANIFEST = "_manifest.json"
log = logging.getLogger(__name__)


class StorageError(OSError):
    """A URL cannot be reached or used; the message names it (without credentials)."""


# ---------------------------------------------------------------- retries

F = TypeVar("F", bound=Callable[..., Any])
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                    "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError",
                    "ClientOSError", "ClientPayloadError", "IncompleteRead", "ProxyConnectionError"}
# What no retry fixes: a full disk or quota, a read-only or forbidden place.
UNFIXABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                     errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}
_TRANSIENT_TEXT = ("SlowDown", "ServiceUnavailable", "InternalError", "503", "500 Internal",
                   "RequestTimeout", "Could not connect to the endpoint")


def _chain(e: BaseException) -> Iterator[BaseException]:
    """`e` and the errors under it: s3fs wraps botocore's errors in OSError, stages wrap ours."""
    cause: BaseException | None = e
    while cause is not None:
        yield cause
        cause = cause.__cause__ or cause.__context__


def _transient(e: BaseException) -> bool:
    """Worth retrying: the service or the network hiccuped, not the request itself."""
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    return any(type(c).__name__ in _TRANSIENT_NAMES or isinstance(c, ConnectionError | TimeoutError)
               or (isinstance(c, OSError) and c.errno in _TRANSIENT_ERRNOS)
               or any(t in str(c) for t in _TRANSIENT_TEXT) for c in _chain(e))


def _fatal(e: BaseException, url: str) -> StorageError | None:
    """A clear error for what no retry fixes: no credentials, no bucket."""
    text = f"{type(e).__name__}: {e}"
    if "NoCredentialsError" in text or "Unable to locate credentials" in text:
        return StorageError(f"{redact(url)}: no credentials: set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or a role, or a Kubernetes Secret) in the "
                            "environment")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return StorageError(f"{redact(url)}: bucket {bucket!r} does not exist")
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return StorageError(f"{redact(url)}: the credentials in the environment were refused")
    return None


def retrying(fn: F) -> F:
    """Retry `fn(url, ...)` (or `fn(x, url, ...)`) on transient storage errors with backoff."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        url = next((a for a in args if isinstance(a, str)), "?")
        attempts = 1 + int(os.environ.get("POSMINE_STORAGE_RETRIES", "6"))
        delay = float(os.environ.get("POSMINE_STORAGE_BACKOFF_S", "0.5"))
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            try:
                return fn(*args, **kwargs)
            except StorageError:
                raise
            except Exception as e:
                fatal = _fatal(e, url)
                if fatal is not None:
                    raise fatal from e
                if not _transient(e):
                    raise
                if attempt == attempts:
                    raise StorageError(
                        f"{redact(url)}: storage unreachable after {attempts} attempts over "
                        f"{time.monotonic() - started:.0f} s ({type(e).__name__}: {e})") from e
                log.warning("%s: %s; retry %d/%d in %.1f s", redact(url), type(e).__name__,
                            attempt, attempts - 1, delay)
                time.sleep(delay)
                delay = min(delay * 2, 16.0)
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper  # type: ignore[return-value]


def _storage_options(protocol: str) -> dict[str, Any]:
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def refuse_credentials(url: str) -> None:
    """URLs carrying credentials are refused: they would travel into manifests, logs and error
    texts. Credentials come from the environment."""
    if has_credentials(url):
        raise StorageError(f"{redact(url)}: credentials in a URL are refused; set them in the "
                           "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it.

    URLs carrying credentials are refused: they would travel into manifests, logs and error
    texts. Credentials come from the environment.
    """
    refuse_credentials(url)
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


@retrying
def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(fs.exists(path))


@retrying
def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


@retrying
def remove(url: str) -> None:
    """Remove a file or folder tree if it exists."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@retrying
def listdir(url: str) -> list[str]:
    """Base names under `url` (empty when it does not exist)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


@contextmanager
def open_read(url: str, compression: str | None = "infer") -> Iterator[IO[bytes]]:
    """Open `url` for binary reading, decompressing `.gz` etc. transparently."""
    refuse_credentials(url)
    try:
        with fsspec.open(url, "rb", compression=compression,
                         **_storage_options(url.split("://")[0] if "://" in url else "file")) as f:
            yield f
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{redact(url)}: no such file") from e


@retrying
def read_bytes(url: str) -> bytes:
    with open_read(url, compression=None) as f:
        return f.read()


@retrying
def read_text(url: str) -> str:
    with open_read(url) as f:
        return f.read().decode("utf-8")


@retrying
def write_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` so that readers see the old object or the whole new one.

    Local files are written under a temporary name and renamed; an object store PUT
    only becomes visible once complete.
    """
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if not is_local(url):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(parent, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # a failed write leaves nothing behind
        if e.errno in UNFIXABLE_ERRNOS:
            raise StorageError(f"{redact(url)}: {os.strerror(e.errno or 0)}") from e
        raise


@retrying
def put_tree(local_dir: str, url: str) -> None:
    """Upload the folder `local_dir` to `url`, replacing what was there.

    The copy goes to a temporary sibling first and is moved into place whole, so `url`
    never holds a half-copied folder (on object stores the move is a copy, still complete
    before the old folder goes).
    """
    fs, path = filesystem(url)
    tmp = f"{path.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fs.put(local_dir.rstrip("/") + "/", tmp, recursive=True)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.rm(tmp, recursive=True)  # no half-copied folder is left beside the target
        raise
    if is_local(url):  # two renames: the old folder is whole until the new one takes its name
        old = f"{path.rstrip('/')}.old-{uuid.uuid4().hex[:8]}"
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
        if os.path.exists(old):
            fs.rm(old, recursive=True)
        return
    # Object stores have no folder rename: copy each object from the finished upload.
    if fs.exists(path):
        fs.rm(path, recursive=True)
    for src in fs.find(tmp):
        fs.copy(src, path.rstrip("/") + src[len(tmp):])
    fs.rm(tmp, recursive=True)


@retrying
def get_tree(url: str, local_dir: str) -> None:
    """Download the folder at `url` to `local_dir`, which holds the whole folder or nothing:
    the copy lands in a temporary sibling and is renamed into place."""
    fs, path = filesystem(url)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{redact(url)}: no such folder")
    tmp = f"{local_dir.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, local_dir)
    except OSError:  # another process finished the same download first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(local_dir):
            raise


# Local files up to this size are hashed whole; larger ones are known by size and mtime.
SMALL_FILE = 64 << 20


def fingerprint(url: str, ignore: Collection[str] = ()) -> str:
    """A digest of the content at `url`, a file or a folder, on any filesystem, that changes
    when any file under it is edited, added or removed, without reading large files.

    Each file contributes its relative name, its size and the best version the store gives for
    free: an object store's ETag (a checksum of the object, listed with it: one LIST call per
    thousand objects, however many rows they hold), else the SHA-256 of a local file of at
    most `SMALL_FILE` bytes (milliseconds to read), else its mtime in nanoseconds (as make and
    rsync trust it). Files named in `ignore` (relative to `url`) are left out. A missing `url`
    raises FileNotFoundError.
    """
    fs, path = filesystem(url)
    found = fs.find(path, detail=True, withdirs=False)
    if not found:
        if not fs.exists(path):
            raise FileNotFoundError(f"{redact(url)}: no such file or folder")
        found = {path: fs.info(path)}  # an empty folder
    entries = [f"{name[len(path):]}\t{info.get('size')}\t{_version(name, info, is_local(url))}"
               for name, info in sorted(found.items()) if name[len(path):].lstrip("/") not in ignore]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def _version(path: str, info: Mapping[str, Any], local: bool) -> str:
    """What tells one version of a file from another, as cheaply as the filesystem allows."""
    for key in ("ETag", "etag", "md5Hash", "crc32c", "checksum"):
        if info.get(key):
            return str(info[key])
    if local and info.get("type") == "file" and (info.get("size") or 0) <= SMALL_FILE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()
    if local:
        return str(os.stat(path).st_mtime_ns)
    return str(info.get("mtime") or info.get("LastModified") or info.get("updated") or "")


def write_json(url: str, obj: Any) -> None:
    """Manifests, summaries and metrics: never with credentials in them (`redact_all`)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    write_bytes(url, json.dumps(redact_all(json.loads(text)), indent=2, sort_keys=True).encode())


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def arrow_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for `url` (wrapping fsspec), for pyarrow and Ray Data I/O."""
    fs, path = filesystem(url)
    if is_local(url):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def write_parquet(table: pa.Table, url: str, row_group_size: int | None = None) -> None:
    """Write one Parquet file atomically (see `write_bytes`)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    write_bytes(url, buf.getvalue())


def read_parquet_rows(url: str, rows: Sequence[int]) -> pa.Table:
    """Rows `rows` (positions in the file, or in a folder's files taken in name order) of
    Parquet data, in that order, reading only the row groups that hold them."""
    fs, path = filesystem(url)
    if not fs.isdir(path):
        return _read_file_rows(url, rows)
    files = parquet_files(url)
    starts = np.cumsum([0, *(_num_rows(f) for f in files)])  # (F + 1,)
    want = np.asarray(rows, np.int64)  # (n,)
    file_of = np.searchsorted(starts, want, side="right") - 1
    parts, where = [], np.empty(len(want), np.int64)
    offset = 0
    for f in np.unique(file_of):
        sel = np.flatnonzero(file_of == f)
        parts.append(_read_file_rows(files[f], (want[sel] - starts[f]).tolist()))
        where[sel] = offset + np.arange(len(sel))
        offset += len(sel)
    if not parts:
        return _read_file_rows(files[0], []) if files else pa.table({})
    return pa.concat_tables(parts).take(pa.array(where))


@retrying
def _num_rows(url: str) -> int:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


@retrying
def _read_file_rows(url: str, rows: Sequence[int]) -> pa.Table:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        starts = np.cumsum([0, *sizes])  # (G + 1,): first row of each group
        group_of = np.searchsorted(starts, rows, side="right") - 1  # (n,)
        groups = sorted({int(g) for g in group_of})
        table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
    at, offset = {}, 0  # where each read group starts in `table`
    for g in groups:
        at[g], offset = offset, offset + sizes[g]
    local = [at[int(g)] + r - int(starts[g]) for r, g in zip(rows, group_of, strict=True)]
    return table.take(pa.array(local, pa.int64()))


def parquet_files(url: str) -> list[str]:
    """The URLs of a Parquet dataset: the file itself, or a folder's `*.parquet` in name order
    (none when nothing is there)."""
    fs, path = filesystem(url)
    if not fs.isdir(path):
        return [url] if fs.exists(path) else []
    return [join(url, n) for n in listdir(url) if n.endswith(".parquet")]  # listdir sorts


@retrying
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


def unfixable(e: BaseException) -> bool:
    """A full disk, a quota, a read-only or forbidden place, anywhere in the error's chain: no
    retry can mend it."""
    return any(isinstance(c, OSError) and c.errno in UNFIXABLE_ERRNOS for c in _chain(e))
