"""How far the embed stage is from this machine's limit, in one run (issue #21, item 1).

1. The limit: torch's fp32 matrix multiply at the encoder's own shapes (the linear layers of
   all-MiniLM-L6-v2 on a batch of `--batch` texts of 256 tokens), best of several runs.
2. The work: model FLOPs counted from each text's real token count (linear layers
   2*(4*d*d + 2*d*ff) per token and layer, attention 4*L*L*d per text and layer); the padded
   count, which is what the machine really multiplies, beside it.
3. The rates: the plain in-process `Encoder` (the model's speed), the Ray Data embed stage
   with one actor x every core and 2 actors x 1 thread (the configs' layout; Ray's share), the
   fixed cost of a 4-text corpus through Ray Data and in this process (as the stage now embeds
   a corpus that small), and the ceiling: the linear layers alone at their GEMM rates.
4. Levers, each with its largest difference to the torch encoder's vectors: glibc's malloc
   as it comes (`teacher.reuse_memory=false`: the plain encoder is timed with it first, as this
   process's malloc can be changed but not restored; and the stage), the batches
   before `teacher.batch_tokens` (32 rows whatever their length), OpenVINO fp32
   (`teacher.backend=openvino`, in the plain encoder and in the embed stage), ONNX Runtime fp32
   (when `onnxruntime` is installed), `torch.compile`, and `torch.compile` with Inductor's
   freezing (weights prepacked for oneDNN, bias and GELU fused).
5. `--bf16`: the teacher in bfloat16, the opt-in `teacher.dtype=bfloat16` (its vectors change a
   little, and with them some negatives): torch's bf16 matrix multiply at the same shapes (AMX
   where the CPU has it), the plain encoder and the stage (2 x 1) in bf16, each against both
   peaks, with the smallest cosine of its vectors to the fp32 ones.

    python benchmarks/embed_peak.py [--docs 1000] [--json benchmarks/results/embed_peak.json]
    python benchmarks/embed_peak.py --docs 6000 --no-levers    # the whole SciFact corpus: limit,
                                                               # plain encoder, stage, fixed cost
    python benchmarks/embed_peak.py --docs 6000 --no-levers --bf16   # and the bf16 teacher
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import emit
from posmine.config import TeacherConfig, default_beir_dir
from posmine.io import beir, prepared, storage
from posmine.io.prepared import passage_texts
from posmine.io.vectors import read_embeddings
from posmine.models import allocator
from posmine.models.backbone import resolve_model
from posmine.models.encoder import Encoder
from posmine.stages import remote
from posmine.stages.embed import embed_local, embed_ray, list_parts


def gemm_peak(d: int, ff: int, tokens: int, repeats: int = 5,
              dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """GFLOP/s of torch.mm at the encoder's linear-layer shapes; best of `repeats`."""
    out = {}
    for name, (k, n) in {"qkvo": (d, d), "ffn_up": (d, ff), "ffn_down": (ff, d)}.items():
        a, b = torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)  # warm-up
        best = min(_timed(lambda a=a, b=b: torch.mm(a, b)) for _ in range(repeats))
        out[name] = 2 * tokens * k * n / best / 1e9
    out["peak"] = max(out.values())
    return out


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_flops(lengths: np.ndarray, layers: int, d: int, ff: int) -> float:
    """Forward FLOPs of a BERT encoder over texts of `lengths` tokens (no padding)."""
    linear = 2 * (4 * d * d + 2 * d * ff) * lengths.sum()
    attention = 4 * d * (lengths.astype(np.float64) ** 2).sum()
    return float(layers * (linear + attention))


def linear_bound(lengths: np.ndarray, layers: int, d: int, ff: int,
                 peak: dict[str, float]) -> dict[str, float]:
    """The ceiling: the encoder's time if its linear layers ran at the GEMM rates measured at
    their shapes and nothing else (attention, GELU, LayerNorm, tokenising) took any."""
    tokens = float(lengths.sum())
    seconds = layers * 2 * tokens * (4 * d * d / (peak["qkvo"] * 1e9) + d * ff / (peak["ffn_up"] * 1e9)
                                     + ff * d / (peak["ffn_down"] * 1e9))
    useful = model_flops(lengths, layers, d, ff)
    return {"seconds": round(seconds, 2), "share_of_peak": round(useful / seconds / 1e9 / peak["peak"], 3)}


def padded_lengths(lengths: np.ndarray, batch: int) -> np.ndarray:
    """Each text's length as computed: padded to its batch's longest (longest-first batches)."""
    order = np.sort(lengths)[::-1]
    return np.concatenate([np.full(len(order[i:i + batch]), order[i])
                           for i in range(0, len(order), batch)])


def onnx_encoder(enc: Encoder, workdir: str, threads: int) -> Any:
    """An ONNX Runtime session of the encoder's transformer (fp32), or None without ORT."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    class Hidden(torch.nn.Module):  # keyword arguments: the tracer passes positionals only
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path = str(Path(workdir, "model.onnx"))
    ids = torch.ones((2, 16), dtype=torch.long)
    # a copy: tracing for export leaves the model it traced computing different vectors
    # (seen: 0.06 apart from before the export), which would spoil every later row
    torch.onnx.export(Hidden(copy.deepcopy(enc.model)), (ids, torch.ones_like(ids)), path, dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                      dynamic_axes={n: {0: "b", 1: "t"} for n in ("input_ids", "attention_mask", "hidden")})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def onnx_encode(session: Any, enc: Encoder, texts: list[str], batch: int) -> np.ndarray:
    """Mean-pooled, normalised embeddings through ORT, batched as `Encoder.encode` does."""
    out = np.empty((len(texts), enc.dim), np.float32)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    for s in range(0, len(texts), batch):
        idx = order[s:s + batch]
        tok = enc.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                            max_length=enc.cfg.max_length, return_tensors="np")
        hidden = session.run(None, {"input_ids": tok["input_ids"].astype(np.int64),
                                    "attention_mask": tok["attention_mask"].astype(np.int64)})[0]
        m = tok["attention_mask"][..., None].astype(np.float32)  # (b, t, 1)
        emb = (hidden * m).sum(1) / m.sum(1)  # (b, d)
        out[idx] = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=default_beir_dir("scifact"))
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--json", default=None)
    p.add_argument("--no-levers", action="store_true",
                   help="only the limit, the plain encoder, the stage and its fixed cost (item 4 "
                        "skipped: the whole corpus in minutes, not an hour)")
    p.add_argument("--bf16", action="store_true",
                   help="also the teacher in bfloat16 (item 5): its GEMM peak, encoder and stage")
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    chunk = prepared.sort_by_length(next(beir.load(a.data).corpus_chunks(chunk_rows=a.docs)))
    texts = passage_texts(chunk.to_pydict())
    cfg = TeacherConfig(batch_size=a.batch, torch_threads=threads)
    enc = Encoder(dataclasses.replace(cfg, reuse_memory=False))  # glibc's malloc untouched yet
    mc = enc.model.config
    layers, d, ff = mc.num_hidden_layers, mc.hidden_size, mc.intermediate_size
    lengths = np.array([len(x) for x in enc.tokenizer(texts, truncation=True,
                                                      max_length=cfg.max_length)["input_ids"]])
    useful = model_flops(lengths, layers, d, ff)
    padded = model_flops(padded_lengths(lengths, a.batch), layers, d, ff)
    peak = gemm_peak(d, ff, a.batch * cfg.max_length)

    system_malloc_s = 0.0
    if not a.no_levers:
        enc.encode(texts[:a.batch])  # warm-up
        t0 = time.perf_counter()
        ref = enc.encode(texts)
        system_malloc_s = time.perf_counter() - t0
    allocator.reuse_freed_memory()  # what Encoder(cfg) does: the default from here on
    enc.encode(texts[:a.batch])
    t0 = time.perf_counter()
    reused = enc.encode(texts)
    plain_s = time.perf_counter() - t0
    if a.no_levers:
        ref = reused

    # The embed stage through Ray Data: one actor with every core, and 2 actors x 1 thread (the
    # shipped configs' layout).
    work = tempfile.mkdtemp(prefix="posmine-peak-")
    src, tiny_src = f"{work}/src", f"{work}/tsrc"
    storage.write_parquet(chunk, f"{src}/part-0.parquet")
    storage.write_parquet(chunk.slice(0, 4), f"{tiny_src}/part-0.parquet")
    layouts = {"1x2": TeacherConfig(batch_size=a.batch, num_actors=1, cpus_per_actor=1, torch_threads=0),
               "2x1": TeacherConfig(batch_size=a.batch, num_actors=2, cpus_per_actor=0.5, torch_threads=1)}
    stage_cfg = layouts["1x2"]
    remote.ensure_ray()
    row = {i: k for k, i in enumerate(chunk.column("id").to_pylist())}

    def stage(cfg: TeacherConfig, name: str) -> dict[str, Any]:
        dst = f"{work}/{name}"
        s = _timed(lambda: embed_ray(cfg, list_parts(src), dst, "corpus"))
        ids, mat = read_embeddings(dst)
        want = ref[[row[i] for i in ids]]  # the plain encoder's vectors in the stage's order
        return {"seconds": round(s, 2), "docs_per_s": round(len(texts) / s, 1),
                "gflops_useful": round(useful / s / 1e9, 1),
                "share_of_peak": round(useful / s / 1e9 / peak["peak"], 3),
                "max_abs_diff_vs_plain": float(np.abs(mat - want).max()),
                "min_cosine_vs_plain": float((mat * want).sum(1).min())}

    # Fixed cost: a 4-text corpus, through Ray Data (an actor process to start: Ray Data and
    # torch to import, the model to load) and as the stage now runs a corpus that small, in
    # this process (`teacher.local_corpus_below`; the model to load).
    fixed = {f"ray_data_{n}": round(_timed(lambda c=c, n=n: embed_ray(c, list_parts(tiny_src), f"{work}/t{n}",
                                                                     "corpus")), 2)
             for n, c in layouts.items()}
    fixed["in_process"] = round(_timed(lambda: embed_local(
        stage_cfg, list_parts(tiny_src), f"{work}/tlocal", "corpus", lambda: Encoder(stage_cfg))), 2)
    stages = {f"torch_{n}": stage(c, f"torch_{n}") for n, c in layouts.items()}

    def stage_variant(tag: str, **changes: Any) -> None:
        """The stage in both layouts with `changes` to its config, timed against the torch rows."""
        for n, c in layouts.items():
            got_stage = stage(dataclasses.replace(c, **changes), f"{tag}_{n}")
            torch_s = stages[f"torch_{n}"]["seconds"]
            got_stage["speedup_vs_torch_stage"] = round(torch_s / got_stage["seconds"], 3)
            stages[f"{tag}_{n}"] = got_stage

    def lever(encode: Any) -> dict[str, Any]:
        """`encode(texts)` timed after a warm-up batch (a compile, for the compiled ones)."""
        warm = _timed(lambda: encode(texts[:a.batch]))
        t0 = time.perf_counter()
        got = encode(texts)
        s = time.perf_counter() - t0
        return {"seconds": round(s, 2), "warm_up_seconds": round(warm, 2),
                "speedup_vs_torch": round(plain_s / s, 3), "gflops_useful": round(useful / s / 1e9, 1),
                "share_of_peak": round(useful / s / 1e9 / peak["peak"], 3),
                "max_cosine_diff": float(np.abs((got * ref).sum(1) - 1).max()),
                "max_abs_diff": float(np.abs(got - ref).max())}

    def run_levers() -> dict[str, Any]:
        """Item 4: each lever timed against the plain encoder, its vectors against `ref`."""
        levers: dict[str, Any] = {"system_malloc": {
            "seconds": round(system_malloc_s, 2), "speedup_vs_torch": round(plain_s / system_malloc_s, 3),
            "share_of_peak": round(useful / system_malloc_s / 1e9 / peak["peak"], 3),
            "max_abs_diff": float(np.abs(reused - ref).max())}}
        # the batching before `teacher.batch_tokens`: 32 rows, whatever their length
        levers["rows_only_batches"] = lever(Encoder(dataclasses.replace(cfg, batch_tokens=10**9)).encode)
        session = onnx_encoder(enc, work, threads)
        if session is not None:
            levers["onnxruntime_fp32"] = lever(lambda t: onnx_encode(session, enc, t, a.batch))
        try:
            ov = Encoder(dataclasses.replace(cfg, backend="openvino"))
        except ImportError:
            ov = None
        if ov is not None:
            levers["openvino_fp32"] = lever(ov.encode)
            stage_variant("openvino", backend="openvino")
        # torch.compile as it comes, and with Inductor's freezing
        levers["torch_compile"] = lever(Encoder.wrap(
            cfg, torch.compile(copy.deepcopy(enc.model), dynamic=True), enc.tokenizer, enc.device).encode)
        levers["compile_freezing"] = lever(Encoder.wrap(
            cfg, torch.compile(copy.deepcopy(enc.model), dynamic=True, options={"freezing": True}),
            enc.tokenizer, enc.device).encode)
        return levers

    def run_bf16() -> dict[str, Any]:
        """Item 5: the bf16 teacher against both peaks, and its vectors against fp32's."""
        peak16 = gemm_peak(d, ff, a.batch * cfg.max_length, dtype=torch.bfloat16)
        plain16 = lever(Encoder(dataclasses.replace(cfg, dtype="bfloat16")).encode)
        row16 = stage(dataclasses.replace(layouts["2x1"], dtype="bfloat16"), "bf16_2x1")
        row16["speedup_vs_fp32"] = round(stages["torch_2x1"]["seconds"] / row16["seconds"], 3)
        for r in (plain16, row16):
            r["share_of_bf16_peak"] = round(useful / r["seconds"] / 1e9 / peak16["peak"], 3)
        return {"gemm_gflops": {k: round(v, 1) for k, v in peak16.items()},
                "plain_encoder": plain16, "embed_stage_2x1": row16}

    bf16 = run_bf16() if a.bf16 else {}
    levers: dict[str, Any] = {}
    if not a.no_levers:
        stage_variant("torch_system_malloc", reuse_memory=False)
        levers = run_levers()
    shutil.rmtree(work, ignore_errors=True)
    # the levers left the encoder as it was: the same vectors as at the start
    unchanged = float(np.abs(enc.encode(texts[:a.batch]) - ref[:a.batch]).max())

    result = {
        "model": resolve_model(cfg.model), "docs": len(texts), "threads": threads,
        "tokens": int(lengths.sum()), "mean_tokens": round(float(lengths.mean()), 1),
        "gflop_useful": round(useful / 1e9, 1), "gflop_padded": round(padded / 1e9, 1),
        "gemm_gflops": {k: round(v, 1) for k, v in peak.items()},
        "plain_encoder": {"seconds": round(plain_s, 2), "docs_per_s": round(len(texts) / plain_s, 1),
                          "gflops_useful": round(useful / plain_s / 1e9, 1),
                          "share_of_peak": round(useful / plain_s / 1e9 / peak["peak"], 3)},
        "linear_layers_only": linear_bound(lengths, layers, d, ff, peak),
        "embed_stage": stages, "fixed_cost_seconds_4_docs": fixed,
        "levers": levers, "bf16": bf16, "reference_unchanged_max_diff": unchanged,
    }
    emit(result, a.json)


if __name__ == "__main__":
    main()
