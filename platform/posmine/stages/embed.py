"""The embed stage: the teacher (`models/encoder.py`) embeds corpus and queries on Ray Data.

Reads the `data` stage's Parquet (`corpus/part-*.parquet`, `queries.parquet/part-*.parquet`); writes
`<out>/embed/<teacher-hash>/{corpus,queries}/<part>.parquet` with `id, embedding`
(fixed-size float32 lists), one output file per input part, and a manifest. The model loads
once per actor; batches are sorted by length inside each actor call so sub-batches carry
little padding. A side too small to pay for an actor pool's start (`teacher.local_*_below`)
is embedded in the driver instead, part by part, into the same files.

Resume: an output part is written (atomically) once all its rows are embedded, and until then
its rows are saved as pieces (`<side>/_pieces/<part>/`) every `teacher.piece_rows` rows or
`teacher.piece_seconds` seconds, so a run that dies keeps its finished parts and the pieces of
the others; the rerun embeds only the rows they lack. Ray Data restarts a killed actor and
retries its batches; a part's rows are checked to arrive exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa
import torch
from tqdm import tqdm

from posmine.config import TeacherConfig, config_hash
from posmine.io import storage
from posmine.io.prepared import QUERIES, parquet_rows, passage_texts
from posmine.io.vectors import ROW_GROUP, check_vectors, embedding_matrix, embeddings_table
from posmine.models.backbone import model_fingerprint, resolve_model
from posmine.models.encoder import Encoder, pick_device
from posmine.stages import faults, lifecycle, remote

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)


def _prefix(cfg: TeacherConfig, side: str) -> str:
    return cfg.query_prefix if side == "queries" else cfg.passage_prefix


def embed_table(encoder: Encoder, table: pa.Table, prefix: str) -> pa.Table:
    """Arrow rows (`id, [title], text`) -> Arrow `id, embedding`."""
    cols = table.to_pydict()
    return embeddings_table(cols["id"], encoder.encode(passage_texts(cols), prefix))  # (n, dim)


class EmbedActor:
    """Ray Data callable class: loads the encoder once, then embeds Arrow batches."""

    def __init__(self, cfg: TeacherConfig, side: str, kept: dict[str, set[str]] | None = None) -> None:
        threads = cfg.torch_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to the actor's CPUs
        self.encoder = Encoder(cfg)
        self.prefix = _prefix(cfg, side)
        self.kept = kept or {}  # part name -> ids an earlier run saved in pieces

    def __call__(self, batch: pa.Table) -> pa.Table:
        faults.hook("embed", "batch")
        if "path" not in batch.column_names:
            return embed_table(self.encoder, batch, self.prefix)
        batch = _without_kept(batch, self.kept)
        out = embed_table(self.encoder, batch, self.prefix)
        # The source part travels with its rows: the driver writes a part when it is complete.
        return out.append_column("path", batch.column("path"))


def _without_kept(batch: pa.Table, kept: dict[str, set[str]]) -> pa.Table:
    """The rows of `batch` (with its `path` column) not among a part's kept ids."""
    if not kept:
        return batch
    names = [p.rsplit("/", 1)[-1] for p in batch.column("path").to_pylist()]
    keep = [i not in kept.get(n, ()) for n, i in zip(names, batch.column("id").to_pylist(), strict=True)]
    return batch.filter(pa.array(keep))


# ---------------------------------------------------------------- the stage


OUTPUT_FIELDS = ("model", "pooling", "normalize", "query_prefix", "passage_prefix", "max_length",
                 "attention", "pool_prefix", "backend")


def resolved_precision(cfg: TeacherConfig) -> str:
    """`device:dtype` the vectors are computed at, with `auto` resolved as the encoder resolves
    it (the actors run where the driver's `pick_device` says): `teacher.dtype=auto` is bf16 on
    a GPU and fp32 on the CPU, two different sets of vectors."""
    device = pick_device(cfg.device).type
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return f"{device}:{dtype}"


def output_key(cfg: TeacherConfig) -> str:
    """Hash of the settings that change the vectors; actors, threads and batch size do not."""
    fields: dict[str, Any] = {f: getattr(cfg, f) for f in OUTPUT_FIELDS}
    fields["precision"] = resolved_precision(cfg)
    return config_hash(fields)


def stage_dir(out_dir: str, cfg: TeacherConfig) -> str:
    """One folder per teacher, so several teachers (and students) can coexist."""
    return storage.join(out_dir, "embed", output_key(cfg))


def run(cfg: TeacherConfig, data_dir: str, out_dir: str, upstream: str) -> dict[str, Any]:
    """Embed corpus and queries on Ray Data (skipped when the manifest is current).

    `upstream` is the data stage's config hash: new data means new embeddings, and so do new
    weights under the same model path (`model_fingerprint`). Parts finished by an earlier,
    interrupted run of the same key are kept.
    """
    target = stage_dir(out_dir, cfg)
    key = config_hash(output_key(cfg), model_fingerprint(cfg.model), upstream)

    def work() -> lifecycle.Done:
        resolve_model(cfg.model)  # a missing model folder fails here, once, not in every actor
        _claim(target, key)
        rows = {}
        # loaded once, if a side runs here; one encoder in this process: every core
        encoder = functools.cache(lambda: Encoder(dataclasses.replace(cfg, torch_threads=0)))
        # a GPU teacher whose driver has no GPU embeds on the actors, whatever the size
        here = cfg.device != "cuda" or torch.cuda.is_available()
        for side, src in (("corpus", storage.join(data_dir, "corpus")),
                          ("queries", storage.join(data_dir, QUERIES))):
            dst, listed = storage.join(target, side), list_parts(src)
            below = cfg.local_queries_below if side == "queries" else cfg.local_corpus_below
            if here and sum(listed.rows.values()) < below:
                rows[side] = embed_local(cfg, listed, dst, side, encoder)
            else:
                rows[side] = embed_ray(cfg, listed, dst, side)
        return lifecycle.Done(rows, extra={"model": cfg.model, "pooling": cfg.pooling},
                            outputs=["corpus", "queries"])

    return lifecycle.run_stage(target, "embed", key, work)


def _claim(target: str, key: str) -> None:
    """Keep finished parts only if they were made from the same data: else start afresh."""
    marker = storage.join(target, "_inputs.json")
    try:
        same = storage.read_json(marker).get("key") == key
    except FileNotFoundError:
        same = False
    if not same:
        for side in ("corpus", "queries"):
            storage.remove(storage.join(target, side))
        storage.write_json(marker, {"key": key})


def embed_local(cfg: TeacherConfig, listed: Parts, dst: str, side: str,
                encoder: Callable[[], Encoder]) -> int:
    """Embed the unfinished parts of a small input in this process, part by part: the output,
    the atomic writes and the resume of `embed_ray`, without an actor pool to start."""
    left = resume(listed, dst, side)
    if not left.pending:
        return sum(listed.rows.values())
    collector = PartCollector(listed.rows, dst, side, cfg, left.kept)
    kept_ids = _ids(left.kept)
    with tqdm(total=left.todo, desc=f"embed {side}", unit="doc") as bar:
        for name in left.pending:
            table = storage.read_parquet(storage.join(listed.dir, name))
            table = table.append_column("path", pa.array([name] * table.num_rows, pa.string()))
            table = _without_kept(table, kept_ids)
            # a piece's worth at a time, so that a piece can be saved between them
            for start in range(0, table.num_rows, cfg.piece_rows):
                chunk = table.slice(start, cfg.piece_rows)
                out = embed_table(encoder(), chunk, _prefix(cfg, side))
                bar.update(collector.add(out.append_column("path", chunk.column("path"))))
    collector.check_complete(left.pending)
    return sum(listed.rows.values())


def _ids(kept: dict[str, pa.Table]) -> dict[str, set[str]]:
    return {name: set(t.column("id").to_pylist()) for name, t in kept.items()}


class Parts(NamedTuple):
    """An input's Parquet parts: the folder holding them, and {part file name: rows}."""

    dir: str
    rows: dict[str, int]


def list_parts(src: str) -> Parts:
    """The parts of a Parquet folder (or a single file), listed and counted once."""
    files = storage.parquet_files(src)
    return Parts(files[0].rsplit("/", 1)[0] if files else src,
                 {url.rsplit("/", 1)[-1]: parquet_rows(url) for url in files})


class Resume(NamedTuple):
    """What is left of an input: its parts without an output yet (in order), the pieces an
    earlier run saved of them, and the rows still to embed."""

    pending: list[str]
    kept: dict[str, pa.Table]
    todo: int


def resume(listed: Parts, dst: str, side: str) -> Resume:
    """What is left of `listed` in `dst`, said in one line when a rerun resumes."""
    done = set(storage.listdir(dst))
    pending = [p for p in sorted(listed.rows) if p not in done]
    kept, pieces = kept_pieces(dst, pending) if PIECES in done else ({}, 0)
    if pending:  # said on the terminal when a rerun resumes, in the log file otherwise
        log.log(logging.INFO if len(pending) < len(listed.rows) or pieces else logging.DEBUG,
                "embedding %d of %d %s parts (%d kept from an earlier run, and %d pieces of "
                "the others)", len(pending), len(listed.rows), side,
                len(listed.rows) - len(pending), pieces)
    todo = sum(listed.rows[p] for p in pending) - sum(t.num_rows for t in kept.values())
    return Resume(pending, kept, todo)


BLOCK_ROWS = 4096  # the most rows one block carries to an actor
BLOCKS_PER_ACTOR = 4


def block_rows(todo: int, num_actors: int) -> int:
    """Rows per block: at most BLOCK_ROWS, and at least BLOCKS_PER_ACTOR blocks per actor, so
    every actor has work and the last blocks, which set the stage's tail, are small."""
    return max(1, min(BLOCK_ROWS, math.ceil(todo / (num_actors * BLOCKS_PER_ACTOR))))


def embed_dataset(cfg: TeacherConfig, listed: Parts, pending: list[str], side: str,
                  kept: dict[str, set[str]] | None = None) -> Dataset:
    """The Ray Data pipeline of the stage: `pending` parts -> encoder actors -> `id, embedding,
    path` rows, in input order. Built, not run."""
    import ray
    from ray.data import ActorPoolStrategy

    use_gpu = pick_device(cfg.device).type == "cuda"
    fs, root = storage.arrow_filesystem(listed.dir)
    todo = sum(listed.rows[p] for p in pending)
    with _in_input_order():
        ds = ray.data.read_parquet([f"{root}/{p}" for p in pending], filesystem=fs, include_paths=True)
        # Streaming repartition: a block goes to an actor as soon as it is read. (`repartition(n)`
        # is an all-to-all barrier: the whole input read and split before the first actor starts.)
        ds = ds.repartition(target_num_rows_per_block=block_rows(todo, cfg.num_actors))
        return ds.map_batches(
            EmbedActor,
            fn_constructor_kwargs={"cfg": cfg, "side": side, "kept": kept or {}},
            batch_format="pyarrow",
            batch_size=cfg.batch_size * 8,
            compute=ActorPoolStrategy(size=cfg.num_actors),
            num_cpus=0 if use_gpu else cfg.cpus_per_actor,
            num_gpus=1 if use_gpu else 0,
        )


@contextlib.contextmanager
def _in_input_order() -> Iterator[None]:
    """Datasets built inside return their rows in input order, so a part's vectors are written
    in the order of its rows, the same in every run. Ray Data copies the global `DataContext`
    into a dataset as it is built: the setting is made before and undone after, leaving the
    caller's context as it was."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = before


def embed_ray(cfg: TeacherConfig, listed: Parts, dst: str, side: str) -> int:
    """Stream the unfinished parts of an input through an actor pool of encoders into `dst`.

    The driver collects each part's vectors (in input order, so about one part is held at a
    time) and writes `dst/<part>` when every row of it is in.
    """
    total = sum(listed.rows.values())
    left = resume(listed, dst, side)
    if not left.pending:
        return total
    remote.ensure_ray()
    collector = PartCollector(listed.rows, dst, side, cfg, left.kept)
    stream = embed_dataset(cfg, listed, left.pending, side, _ids(left.kept))
    with tqdm(total=left.todo, desc=f"embed {side}", unit="doc") as bar:
        for batch in stream.iter_batches(batch_format="pyarrow", batch_size=None):
            bar.update(collector.add(batch))
    collector.check_complete(left.pending)
    log.debug("embedded %d %s rows into %s", left.todo, side, storage.redact(dst))
    return total


def _check_table(table: pa.Table, where: str) -> None:
    """A model that overflows (fp16) or has broken weights must not leave NaN vectors."""
    check_vectors(table.column("id").to_pylist(), embedding_matrix(table), where)


PIECES = "_pieces"  # <dst>/_pieces/<part>/<first row>.parquet: a part's saved vectors, until it is done


def kept_pieces(dst: str, pending: list[str]) -> tuple[dict[str, pa.Table], int]:
    """The pieces an earlier, interrupted run saved of each pending part, as one table each,
    and how many pieces they were."""
    kept, pieces = {}, 0
    for name in pending:
        url = storage.join(dst, PIECES, name)
        if files := storage.parquet_files(url):
            kept[name] = storage.read_parquet(url)
            pieces += len(files)
    return kept, pieces


class PartCollector:
    """Groups embedded rows by source part and writes each part once all its rows are in; until
    then, every `piece_rows` rows or `piece_seconds` seconds, the part's new rows as a piece."""

    def __init__(self, parts: dict[str, int], dst: str, side: str, cfg: TeacherConfig,
                 kept: dict[str, pa.Table]) -> None:
        self.parts, self.dst, self.side, self.cfg = parts, dst, side, cfg
        self.buffers: dict[str, list[pa.Table]] = {n: [t] for n, t in kept.items()}
        self.saved = {n: t.num_rows for n, t in kept.items()}  # rows of a part in its pieces
        self.since: dict[str, float] = {}  # when a part's last piece was saved
        self.written: set[str] = set()
        self.pieces = 0

    def add(self, batch: pa.Table) -> int:
        names = [p.rsplit("/", 1)[-1] for p in batch.column("path").to_pylist()]
        batch = batch.drop_columns(["path"])
        for name in dict.fromkeys(names):
            mask = pa.array([n == name for n in names])
            self.buffers.setdefault(name, []).append(batch.filter(mask))
            got = sum(t.num_rows for t in self.buffers[name])
            if got > self.parts[name]:
                raise RuntimeError(f"part {name}: {got} embedded rows for {self.parts[name]} "
                                   "inputs (a batch arrived twice)")
            if got == self.parts[name]:
                self._write(name)
            else:
                self._save_piece(name, got)
        return batch.num_rows

    def _save_piece(self, name: str, got: int) -> None:
        """The part's rows since its last piece, once there are enough of them or it is time."""
        start = self.saved.get(name, 0)
        now = time.monotonic()
        waited = now - self.since.setdefault(name, now)
        if got - start < self.cfg.piece_rows and waited < self.cfg.piece_seconds:
            return
        rows = pa.concat_tables(self.buffers[name]).slice(start)
        _check_table(rows, f"{self.side} part {name}")
        storage.write_parquet(rows, storage.join(self.dst, PIECES, name, f"{start:012d}.parquet"),
                              row_group_size=ROW_GROUP)
        self.saved[name], self.since[name] = got, now
        self.pieces += 1
        faults.hook("embed", "piece", self.pieces)

    def _write(self, name: str) -> None:
        table = pa.concat_tables(self.buffers.pop(name))
        if len(set(table.column("id").to_pylist())) != table.num_rows:
            raise RuntimeError(f"part {name}: duplicate ids in the embedded rows")
        _check_table(table, f"{self.side} part {name}")
        storage.write_parquet(table, storage.join(self.dst, name), row_group_size=ROW_GROUP)
        storage.remove(storage.join(self.dst, PIECES, name))  # the part holds them now
        self.written.add(name)
        faults.hook("embed", "part", len(self.written))

    def check_complete(self, pending: list[str]) -> None:
        missing = [p for p in pending if p not in self.written]
        if missing:
            raise RuntimeError(f"embedding ended with parts incomplete: {missing[:5]}")
        storage.remove(storage.join(self.dst, PIECES))
