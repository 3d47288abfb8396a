"""Teacher embedding: an HF encoder, and the Ray Data stage that embeds corpus and queries.

Reads the `data` stage's Parquet (`corpus/part-*.parquet`, `queries.parquet/part-*.parquet`); writes
`<out>/embed/<teacher-hash>/{corpus,queries}/<part>.parquet` with `id, embedding`
(fixed-size float32 lists), one output file per input part, and a manifest. The model loads
once per actor; batches are sorted by length inside each actor call so sub-batches carry
little padding. A side too small to pay for an actor pool's start (`teacher.local_*_below`)
is embedded in the driver instead, part by part, into the same files.

Resume: an output part is written (atomically) once all its rows are embedded, so a run
that dies keeps its finished parts; the rerun embeds only the others. Ray Data restarts a
killed actor and retries its batches; a part's rows are checked to arrive exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from posmine import allocator, backbone, faults, remote, schemas, storage

# The model folders' checks live with the backbone; named here too, where the stages use them.
from posmine.backbone import ModelError, model_fingerprint, resolve_model
from posmine.config import TeacherConfig, config_hash
from posmine.data import QUERIES, parquet_rows

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)


class EmbeddingError(ValueError):
    """Vectors that cannot be used (NaN, wrong dimension); the message names file and id."""


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), which oneDNN uses for
    bf16 matrix multiplies; torch's check is private, so its absence reads as no."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())


def cpu_half_precision_note(dtype: torch.dtype, has_amx: bool) -> str | None:
    """A warning for a CPU encoder in 16 bits where that is slower than fp32, else None."""
    if dtype == torch.float16:
        return ("teacher.dtype=float16 on the CPU: few CPUs multiply fp16 natively, so expect it "
                "slower than float32; teacher.dtype=bfloat16 is the CPU's fast 16-bit type (with AMX)")
    if dtype == torch.bfloat16 and not has_amx:
        return ("teacher.dtype=bfloat16 on a CPU without AMX: its bf16 matrix multiplies are slower "
                "than fp32 ones here; use teacher.dtype=float32 (the CPU's default)")
    return None


class Encoder:
    """Text -> L2-normalised (optional) embeddings with mean / CLS / last-token pooling, from an
    encoder or a decoder (`backbone`)."""

    def __init__(self, cfg: TeacherConfig, model: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        path = resolve_model(model or cfg.model)
        self.device = pick_device(cfg.device)
        if self.device.type == "cpu" and cfg.reuse_memory:
            allocator.reuse_freed_memory()
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32}[cfg.dtype]
        if self.device.type == "cpu" and (note := cpu_half_precision_note(dtype, cpu_has_amx())):
            log.warning(note)
        try:
            self.tokenizer = backbone.prepare_tokenizer(AutoTokenizer.from_pretrained(path))
            # safetensors only: never unpickle weights from an untrusted checkpoint.
            self.model = backbone.load_model(path, dtype)
        except (OSError, ValueError) as e:
            raise ModelError(f"model {model or cfg.model!r} ({path}): cannot load: {e}") from e
        self._setup()
        self.model.to(self.device).eval()
        self.forward_model = self.model
        if cfg.backend == "openvino":
            from posmine.openvino_backend import OpenVinoForward

            refused = (f"model {cfg.model!r}: teacher.backend=openvino runs encoders (BERT, MiniLM, "
                       "...); this one did not convert ({}); use teacher.backend=torch")
            if self.bidirectional:
                raise ModelError(refused.format("a decoder made bidirectional is not converted"))
            try:
                self.forward_model = OpenVinoForward(self.model, cfg.torch_threads or os.cpu_count() or 1)
            except ImportError:
                raise
            except Exception as e:  # OpenVINO's conversion failures have types of their own
                raise ModelError(refused.format((str(e).strip().splitlines() or [""])[0])) from e

    def _setup(self) -> None:
        try:
            self.bidirectional = backbone.wants_bidirectional(self.model, self.cfg.attention)
        except backbone.BackboneError as e:
            raise ModelError(f"model {self.cfg.model!r}: {e}") from e
        if self.bidirectional:
            backbone.make_bidirectional(self.model)

    @classmethod
    def wrap(cls, cfg: TeacherConfig, model: Any, tokenizer: Any, device: torch.device) -> Encoder:
        """An encoder over a model already in memory (a student being trained); the caller
        switches it to eval mode while encoding."""
        enc = cls.__new__(cls)
        enc.cfg, enc.model, enc.tokenizer, enc.device = cfg, model, tokenizer, device
        enc.forward_model = model  # a model in training runs as it is, whatever the backend
        enc._setup()
        return enc

    @property
    def dim(self) -> int:
        return int(backbone.hidden_size(self.model))

    def encode(self, texts: list[str], prefix: str = "") -> np.ndarray:
        """Embed `texts` (longest first, in sub-batches) -> (n, dim) float32 in input order."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        spec = backbone.EmbedSpec(self.cfg.pooling, self.cfg.max_length, prefix,
                                  self.cfg.pool_prefix, self.bidirectional)
        for idx in token_batches(self._token_lengths(texts, prefix), self.cfg.batch_size,
                                 self.batch_tokens):
            out[idx] = self._encode_batch([texts[i] for i in idx], spec)
        return out

    @property
    def batch_tokens(self) -> int:
        """The cap on a batch's padded tokens: `teacher.batch_tokens`, else `default_batch_tokens`."""
        if self.cfg.batch_tokens:
            return self.cfg.batch_tokens
        return default_batch_tokens(self.device.type, next(self.model.parameters()).dtype,
                                    torch.backends.cpu.get_cpu_capability())

    def _token_lengths(self, texts: list[str], prefix: str) -> np.ndarray:
        """(n,) tokens per text as embedded (truncated): what a batch's padding follows."""
        ids = self.tokenizer([prefix + t for t in texts], truncation=True,
                             max_length=self.cfg.max_length)["input_ids"]
        return np.array([len(i) for i in ids], dtype=np.int64)

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str], spec: backbone.EmbedSpec) -> np.ndarray:
        emb = backbone.embed(self.forward_model, self.tokenizer, texts, spec, self.device)  # (batch, dim)
        if self.cfg.normalize:
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb.float().cpu().numpy()


# Padded tokens per batch on an AVX-512 CPU in fp32 (`teacher.batch_tokens: 0`): 8 texts of 256.
CPU_BATCH_TOKENS = 2048


def default_batch_tokens(device_type: str, dtype: torch.dtype, cpu_capability: str) -> int:
    """The token cap `teacher.batch_tokens: 0` means: 2,048 for fp32 on a CPU whose kernels
    torch dispatches at AVX-512 (`torch.backends.cpu.get_cpu_capability()`), else none (the
    batch's rows alone). Measured, not derived (BENCHMARKS.md, "Embedding against the
    machine's limit"): on Intel Xeons with AVX-512, 8 texts of 256 tokens ran 1.2-1.3x faster
    than 32; on an AMD EPYC at AVX2 the cap gained nothing (1.02-1.11x slower); GPUs and
    AMX's bf16 tiles want big batches."""
    avx512 = cpu_capability.startswith("AVX512")
    return CPU_BATCH_TOKENS if device_type == "cpu" and dtype == torch.float32 and avx512 else 0


def token_batches(lengths: np.ndarray, batch_size: int, batch_tokens: int) -> list[np.ndarray]:
    """Text indices in batches, longest first: at most `batch_size` rows and, when
    `batch_tokens` > 0, at most `batch_tokens` padded tokens (rows x the batch's longest, its
    first); a text longer than the cap is a batch of its own."""
    order = np.argsort(-lengths, kind="stable")  # (n,) longest first
    batches, start = [], 0
    while start < len(order):
        rows = batch_size
        if batch_tokens > 0:
            rows = max(1, min(batch_size, batch_tokens // max(int(lengths[order[start]]), 1)))
        batches.append(order[start:start + rows])
        start += rows
    return batches


def passage_texts(batch: dict[str, Any]) -> list[str]:
    """'title text' per corpus row (BEIR/MTEB convention); the text alone for queries."""
    texts = [str(t) for t in batch["text"]]
    if "title" not in batch:
        return texts
    return [f"{ti} {t}".strip() for ti, t in zip(batch["title"], texts, strict=True)]


def _prefix(cfg: TeacherConfig, side: str) -> str:
    return cfg.query_prefix if side == "queries" else cfg.passage_prefix


def embed_table(encoder: Encoder, table: pa.Table, prefix: str) -> pa.Table:
    """Arrow rows (`id, [title], text`) -> Arrow `id, embedding`."""
    cols = table.to_pydict()
    return embeddings_table(cols["id"], encoder.encode(passage_texts(cols), prefix))  # (n, dim)


class EmbedActor:
    """Ray Data callable class: loads the encoder once, then embeds Arrow batches."""

    def __init__(self, cfg: TeacherConfig, side: str) -> None:
        threads = cfg.torch_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to the actor's CPUs
        self.encoder = Encoder(cfg)
        self.prefix = _prefix(cfg, side)

    def __call__(self, batch: pa.Table) -> pa.Table:
        _crash_hook()
        faults.trace("embed")
        out = embed_table(self.encoder, batch, self.prefix)
        # The source part travels with its rows: the driver writes a part when it is complete.
        return out.append_column("path", batch.column("path")) if "path" in batch.column_names else out


def _crash_hook() -> None:
    """Fault injection for tests: kill this actor's process on its second batch, once (the
    marker file), like a node lost mid-run; `POSMINE_EMBED_DELAY_S` slows every batch."""
    if delay := os.environ.get("POSMINE_EMBED_DELAY_S"):
        time.sleep(float(delay))
    marker = os.environ.get("POSMINE_EMBED_CRASH_MARKER")
    if not marker:
        return
    calls = Path(f"{marker}.calls")
    with calls.open("a") as f:
        f.write("x")
    if calls.stat().st_size >= 2 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), 9)


def _stall_hook(parts_written: int) -> None:
    """Fault injection for tests: once `POSMINE_STALL_AFTER_PARTS` parts are written, touch
    `POSMINE_STALL_FILE` and wait to be interrupted, so a signal lands at a known point."""
    at, flag = os.environ.get("POSMINE_STALL_AFTER_PARTS"), os.environ.get("POSMINE_STALL_FILE")
    if at and flag and parts_written == int(at):
        Path(flag).touch()
        time.sleep(600)


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


def embedding_dim(url: str) -> int:
    """The vector size of an embeddings Parquet file, from its schema alone."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        return int(pq.ParquetFile(f).schema_arrow.field("embedding").type.list_size)


# ---------------------------------------------------------------- the stage


OUTPUT_FIELDS = ("model", "pooling", "normalize", "query_prefix", "passage_prefix", "max_length")
# Fields added later: keyed only when set, so embeddings made before them stay current.
LATER_FIELDS = {"attention": "auto", "pool_prefix": True, "backend": "torch"}


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
    fields.update({f: getattr(cfg, f) for f, default in LATER_FIELDS.items() if getattr(cfg, f) != default})
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

    def work() -> storage.Done:
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
        return storage.Done(rows, extra={"model": cfg.model, "pooling": cfg.pooling},
                            outputs=["corpus", "queries"])

    return storage.run_stage(target, "embed", key, work)


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
    parts, pending = listed.rows, pending_parts(listed, dst, side)
    if not pending:
        return sum(parts.values())
    with tqdm(total=sum(parts[p] for p in pending), desc=f"embed {side}", unit="doc") as bar:
        for written, name in enumerate(pending, start=1):
            table = storage.read_parquet(storage.join(listed.dir, name))
            out = embed_table(encoder(), table, _prefix(cfg, side))
            _check_table(out, f"{side} part {name}")
            storage.write_parquet(out, storage.join(dst, name), row_group_size=ROW_GROUP)
            bar.update(table.num_rows)
            _stall_hook(written)
    return sum(parts.values())


class Parts(NamedTuple):
    """An input's Parquet parts: the folder holding them, and {part file name: rows}."""

    dir: str
    rows: dict[str, int]


def list_parts(src: str) -> Parts:
    """The parts of a Parquet folder (or a single file), listed and counted once."""
    files = storage.parquet_files(src)
    return Parts(files[0].rsplit("/", 1)[0] if files else src,
                 {url.rsplit("/", 1)[-1]: parquet_rows(url) for url in files})


def pending_parts(listed: Parts, dst: str, side: str) -> list[str]:
    """The parts without an output in `dst` yet, in order."""
    done = set(storage.listdir(dst))
    pending = [p for p in sorted(listed.rows) if p not in done]
    if pending:  # said on the terminal when a rerun resumes, in the log file otherwise
        log.log(logging.INFO if len(pending) < len(listed.rows) else logging.DEBUG,
                "embedding %d of %d %s parts (%d kept from an earlier run)", len(pending),
                len(listed.rows), side, len(listed.rows) - len(pending))
    return pending


BLOCK_ROWS = 4096  # the most rows one block carries to an actor
BLOCKS_PER_ACTOR = 4


def block_rows(todo: int, num_actors: int) -> int:
    """Rows per block: at most BLOCK_ROWS, and at least BLOCKS_PER_ACTOR blocks per actor, so
    every actor has work and the last blocks, which set the stage's tail, are small."""
    return max(1, min(BLOCK_ROWS, math.ceil(todo / (num_actors * BLOCKS_PER_ACTOR))))


def embed_dataset(cfg: TeacherConfig, listed: Parts, pending: list[str], side: str) -> Dataset:
    """The Ray Data pipeline of the stage: `pending` parts -> encoder actors -> `id, embedding,
    path` rows, in input order. Built, not run."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    use_gpu = pick_device(cfg.device).type == "cuda"
    fs, root = storage.arrow_filesystem(listed.dir)
    todo = sum(listed.rows[p] for p in pending)
    ds = ray.data.read_parquet([f"{root}/{p}" for p in pending], filesystem=fs, include_paths=True)
    # Streaming repartition: a block goes to an actor as soon as it is read. (`repartition(n)`
    # is an all-to-all barrier: the whole input read and split before the first actor starts.)
    ds = ds.repartition(target_num_rows_per_block=block_rows(todo, cfg.num_actors))
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"cfg": cfg, "side": side},
        batch_format="pyarrow",
        batch_size=cfg.batch_size * 8,
        compute=ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=0 if use_gpu else cfg.cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    DataContext.get_current().execution_options.preserve_order = True
    return ds


def embed_ray(cfg: TeacherConfig, listed: Parts, dst: str, side: str) -> int:
    """Stream the unfinished parts of an input through an actor pool of encoders into `dst`.

    The driver collects each part's vectors (in input order, so about one part is held at a
    time) and writes `dst/<part>` when every row of it is in.
    """
    parts, pending = listed.rows, pending_parts(listed, dst, side)
    total = sum(parts.values())
    if not pending:
        return total
    remote.ensure_ray()
    todo = sum(parts[p] for p in pending)
    collector = PartCollector(parts, dst, side)
    with tqdm(total=todo, desc=f"embed {side}", unit="doc") as bar:
        for batch in embed_dataset(cfg, listed, pending, side).iter_batches(batch_format="pyarrow",
                                                                            batch_size=None):
            bar.update(collector.add(batch))
    collector.check_complete(pending)
    log.debug("embedded %d %s rows into %s", todo, side, storage.redact(dst))
    return total


def _check_table(table: pa.Table, where: str) -> None:
    """A model that overflows (fp16) or has broken weights must not leave NaN vectors."""
    check_vectors(table.column("id").to_pylist(), embedding_matrix(table), where)


class PartCollector:
    """Groups embedded rows by source part and writes each part once all its rows are in."""

    def __init__(self, parts: dict[str, int], dst: str, side: str) -> None:
        self.parts, self.dst, self.side = parts, dst, side
        self.buffers: dict[str, list[pa.Table]] = {}
        self.written: set[str] = set()

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
        return batch.num_rows

    def _write(self, name: str) -> None:
        table = pa.concat_tables(self.buffers.pop(name))
        if len(set(table.column("id").to_pylist())) != table.num_rows:
            raise RuntimeError(f"part {name}: duplicate ids in the embedded rows")
        _check_table(table, f"{self.side} part {name}")
        storage.write_parquet(table, storage.join(self.dst, name), row_group_size=ROW_GROUP)
        self.written.add(name)
        _stall_hook(len(self.written))

    def check_complete(self, pending: list[str]) -> None:
        missing = [p for p in pending if p not in self.written]
        if missing:
            raise RuntimeError(f"embedding ended with parts incomplete: {missing[:5]}")
