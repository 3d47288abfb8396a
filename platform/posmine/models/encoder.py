"""The teacher's encoder in one process: a backbone, its tokenizer, length-sorted batches under a
token cap, and the device and precision it runs at.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from posmine.config import TeacherConfig
from posmine.models import allocator, backbone

# The model folders' checks live with the backbone; named here too, where the stages use them.
from posmine.models.backbone import ModelError, resolve_model

log = logging.getLogger(__name__)


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
            from posmine.models.openvino_backend import OpenVinoForward

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
        if not texts:  # a batch whose rows an earlier run embedded
            return out
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
    batch's rows alone). Chosen by measurement, not derived (BENCHMARKS.md, "Embedding against
    the machine's limit"): small batches pay on AVX-512 in fp32 only; GPUs and AMX's bf16
    tiles want big batches."""
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
