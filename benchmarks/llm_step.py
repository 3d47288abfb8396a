"""NV-Retriever-v1's recipe at full shape: a training step of a randomly initialised
Mistral-7B-shaped student (bf16, LoRA r16 on the attention matrices, gradient checkpointing,
GradCache, bidirectional attention) and teacher embedding throughput (a 7B decoder in bf16 at
512 tokens, and all-MiniLM-L6-v2), each with its model-FLOPs utilisation against the device's
peak, and posmine's Encoder against a plain Hugging Face loop over the same texts.

    python benchmarks/llm_step.py --peak-tflops 989 --json benchmarks/results/llm_step-h100.json  # GPU
    python benchmarks/llm_step.py --tiny                    # CPU: the same code on a 2-layer model

FLOPs are counted, not profiled: a forward pass costs 2 x (non-embedding parameters) per token
plus attention's 4 x layers x seq x hidden per token; a LoRA step with gradient checkpointing
costs the forward twice (GradCache's first pass without the graph, then with it), the
recomputation inside checkpointing once more, and the backward to the activations (2 x per
token; the frozen weights take no gradient): model FLOPs are counted as forward + backward to
activations (4 x N per token), the rest is overhead the MFU shows.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch

from _common import emit
from posmine.config import LoraConfig, TeacherConfig, TrainConfig
from posmine.models import backbone
from posmine.models.encoder import Encoder
from posmine.stages.train.trainer import StudentTrainer

WORDS = ("retrieval embedding passage negative positive teacher student corpus query model "
         "mining margin score index shard batch token layer attention").split()


def text(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n_words))


def make_model(root: str, tiny: bool) -> str:
    """A random Mistral-7B-shaped (or 2-layer) model folder with a byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MistralConfig, MistralModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(root)
    shape = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128) if tiny else
             dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=14336))
    cfg = MistralConfig(vocab_size=32000, max_position_embeddings=4096, eos_token_id=0, **shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialise where it will run: 7B in fp32 on the host is slow
        model = MistralModel(cfg).to(torch.bfloat16)
    model.save_pretrained(root, safe_serialization=True)
    return root


def forward_flops(n_params: int, layers: int, hidden: int, tokens: int, seq: int) -> float:
    return 2 * n_params * tokens + 4 * layers * seq * hidden * tokens


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_step(path: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = TrainConfig(model=path, attention="bidirectional", pooling="mean", pool_prefix=False,
                      query_prefix="query: ", passage_prefix="passage: ", batch_size=args.batch,
                      num_negatives=4, query_max_length=args.query_len,
                      passage_max_length=args.passage_len, lora=LoraConfig(
                          r=16, alpha=32, dropout=0.1,
                          target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
                      gradient_checkpointing=True, grad_cache_chunk=args.chunk)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = StudentTrainer(cfg, args.steps + 1, device)
    if device.type == "cuda":
        trainer.model.to(torch.bfloat16)
    # texts long enough to fill the max lengths, so the FLOP count below is exact
    rows = [{"query_id": f"q{i}", "query": text(args.query_len, i), "positive": text(args.passage_len, i),
             "negatives": [text(args.passage_len, i * 5 + j) for j in range(4)], "positive_hash": i,
             "negative_hashes": [10**6 + i * 5 + j for j in range(4)], "known": frozenset([i]),
             "scores": [0.9, 0.5, 0.4, 0.3, 0.2]} for i in range(args.batch)]
    times = []
    for _ in range(args.steps + 1):
        sync()
        start = time.perf_counter()
        trainer.step(rows)
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:])
    model = trainer.unwrapped()
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    mc = model.config
    tokens_q, tokens_p = args.batch * args.query_len, args.batch * 5 * args.passage_len
    fwd = (forward_flops(n, mc.num_hidden_layers, mc.hidden_size, tokens_q, args.query_len)
           + forward_flops(n, mc.num_hidden_layers, mc.hidden_size, tokens_p, args.passage_len))
    model_flops = 2 * fwd  # forward + backward to the activations
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"step_s": round(step_s, 3), "tokens_per_step": tokens_q + tokens_p,
            "tokens_per_s": round((tokens_q + tokens_p) / step_s, 1),
            "model_tflops_per_step": round(model_flops / 1e12, 2),
            "achieved_tflops": round(model_flops / step_s / 1e12, 2),
            "mfu": round(model_flops / step_s / 1e12 / args.peak_tflops, 4) if args.peak_tflops else None,
            "peak_gpu_gib": round(peak, 2) if peak else None, "params_non_embedding": n}


def hf_loop(path: str, texts: list[str], max_length: int, batch: int) -> float:
    """The plain loop a user writes: batches in input order, padded to the longest, bf16 on GPU."""
    from transformers import AutoModel, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = backbone.prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
            hidden = model(**enc).last_hidden_state
            (hidden * enc["attention_mask"].unsqueeze(-1)).sum(1)
    sync()
    return time.perf_counter() - start


def embed_rate(path: str, args: argparse.Namespace, name: str) -> dict[str, Any]:
    # lengths spread as a corpus's are (about two tokens a word): 32 tokens to max_length
    texts = [text(16 + (i * 37) % (args.embed_len // 2 - 16), i) for i in range(args.texts)]
    enc = Encoder(TeacherConfig(model=path, max_length=args.embed_len, batch_size=args.embed_batch,
                                pooling="mean", dtype="auto"))
    enc.encode(texts[:args.embed_batch])  # warm-up
    sync()
    start = time.perf_counter()
    enc.encode(texts)
    sync()
    ours = time.perf_counter() - start
    lengths = [len(enc.tokenizer(t, truncation=True, max_length=args.embed_len)["input_ids"]) for t in texts]
    model = enc.model
    n = sum(p.numel() for pn, p in model.named_parameters() if "embed" not in pn)
    mc = model.config
    flops = sum(forward_flops(n, mc.num_hidden_layers, mc.hidden_size, t, t) for t in lengths)
    del enc, model
    plain = hf_loop(path, texts, args.embed_len, args.embed_batch)
    return {"model": name, "texts": len(texts), "tokens": sum(lengths),
            "posmine_tokens_per_s": round(sum(lengths) / ours, 1),
            "hf_loop_tokens_per_s": round(sum(lengths) / plain, 1),
            "posmine_vs_hf_loop": round(plain / ours, 3),
            "achieved_tflops": round(flops / ours / 1e12, 3),
            "mfu": round(flops / ours / 1e12 / args.peak_tflops, 4) if args.peak_tflops else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer model: check the script on a CPU")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's dense bf16 peak (H100 SXM 989, H200 989, A100 312)")
    p.add_argument("--batch", type=int, default=16, help="queries per step (each with 5 passages)")
    p.add_argument("--chunk", type=int, default=16, help="GradCache chunk")
    p.add_argument("--query-len", type=int, default=192)
    p.add_argument("--passage-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--embed-len", type=int, default=512)
    p.add_argument("--embed-batch", type=int, default=32)
    p.add_argument("--json")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.chunk, args.query_len, args.passage_len = 4, 4, 16, 32
        args.texts, args.embed_len, args.steps = 64, 128, 2
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as root:
        path = make_model(root, args.tiny)
        result = {"device": device, "tiny": args.tiny, "peak_tflops": args.peak_tflops,
                  "train_step": train_step(path, args),
                  "embed": [embed_rate(path, args, "mistral-7b-shaped" if not args.tiny else "tiny-mistral")]}
    result["embed"].append(embed_rate(resolve_default(), args, "all-MiniLM-L6-v2"))
    emit(result, args.json)


def resolve_default() -> str:
    from posmine.models.backbone import resolve_model

    return resolve_model("default")


if __name__ == "__main__":
    main()
