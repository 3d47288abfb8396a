"""Shared test fixtures: a local Ray, a tiny random encoder, a loopback S3 server, tiny BEIR data."""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request lines

WORDS = (
    "cell protein gene cancer virus brain heart blood drug trial mouse human risk dose study "
    "effect level rate high low increase decrease patients treatment therapy vitamin diet sleep "
    "stress immune response infection liver kidney lung"
).split()

CORPUS = [
    {"_id": f"d{i}", "title": f"{WORDS[i % len(WORDS)]} study",
     "text": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12))}
    for i in range(40)
]
QUERIES = [{"_id": f"q{i}", "text": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(5))}
           for i in range(12)]
QRELS = {
    "train": [(f"q{i}", f"d{(i * 3) % 40}", 1) for i in range(8)] + [("q0", "d5", 1), ("q1", "d9", 1)],
    "test": [(f"q{i}", f"d{(i * 3 + 1) % 40}", 1) for i in range(8, 12)],
}
# Train queries q0 and q7 have one text: the data stage gives each the other's positives
# (`data.share_positives_by_text`), so the 10 train qrels become 13 (q0 +d21, q7 +d0 +d5).
TRAIN_QRELS_SHARED = 13


def write_beir(root: Path, corpus: list[dict] | None = None, queries: list[dict] | None = None,
               qrels: dict[str, list[tuple[str, str, int]]] | None = None,
               gz: bool = False) -> Path:
    """Write a small BEIR-layout dataset under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    for name, rows in (("corpus", corpus or CORPUS), ("queries", queries or QUERIES)):
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        if gz:
            (root / f"{name}.jsonl.gz").write_bytes(gzip.compress(text))
        else:
            (root / f"{name}.jsonl").write_bytes(text)
    for split, rows in (qrels or QRELS).items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in rows]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_beir(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "tiny")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised 2-layer BERT with a locally built WordPiece vocabulary."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)),
             *"abcdefghijklmnopqrstuvwxyz0123456789", *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 builds the vocabulary from `vocab` (and ignores vocab_file), 4.x from the file
    tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"), vocab={w: i for i, w in enumerate(vocab)})
    assert tok.convert_ids_to_tokens(tok("cell")["input_ids"]) == ["[CLS]", "cell", "[SEP]"]
    tok.save_pretrained(root)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(root, safe_serialization=True)
    return str(root)


DECODERS = ("llama", "mistral", "qwen2")


def make_tiny_decoder(root: Path, family: str) -> str:
    """A randomly initialised 2-layer decoder of `family` (hidden 32) with a tokenizer built
    locally, shaped as the family's own: Llama and Mistral a word-level vocabulary with BOS
    prepended, EOS and no pad token; Qwen2 a byte-level BPE (transformers rebuilds Qwen2's
    tokenizer from vocab and merges) with `<|endoftext|>` as EOS and pad, and no BOS."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

    extra = ["query", "passage", ":", "represent", "the", "for", "retrieval"]
    if family == "qwen2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([" ".join(WORDS + extra)] * 5, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")
        bos, eos = None, tok.token_to_id("<|endoftext|>")
    else:
        vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *sorted(set(WORDS)), *extra])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>")
        bos, eos = 1, 2
    fast.save_pretrained(root)
    cfg = AutoConfig.for_model(family, vocab_size=tok.get_vocab_size(), hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                               intermediate_size=64, max_position_embeddings=256,
                               bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(root, safe_serialization=True)
    return str(root)


@pytest.fixture(scope="session")
def tiny_decoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """{family: model folder} for the tiny Llama, Mistral and Qwen2 decoders."""
    return {f: make_tiny_decoder(tmp_path_factory.mktemp(f"tiny-{f}"), f) for f in DECODERS}


@pytest.fixture(scope="session")
def tiny_cross_encoder(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random BERT cross-encoder (one logit) sharing the tiny vocabulary."""
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("tiny-ce")
    for f in Path(tiny_model).iterdir():
        if f.name.startswith(("vocab", "tokenizer", "special")):
            shutil.copy(f, root / f.name)
    cfg = BertConfig.from_pretrained(tiny_model, num_labels=1)
    torch.manual_seed(1)
    BertForSequenceClassification(cfg).save_pretrained(root, safe_serialization=True)
    return str(root)


RAY_ARGS: dict = {"address": "local", "num_cpus": 2, "include_dashboard": False,
                  "log_to_driver": False}


@pytest.fixture(scope="session")
def ray_local(s3_server: str) -> Iterator[None]:
    """A local Ray; its workers inherit the S3 endpoint and dummy keys, as pods get them
    from a Secret on a cluster (so the S3 server starts first)."""
    import ray

    if not ray.is_initialized():  # a fault test's `ray_with_env` may have put one back already
        ray.init(**RAY_ARGS)
    yield
    ray.shutdown()


@contextmanager
def ray_with_env(env_vars: dict[str, str] | None) -> Iterator[None]:
    """Swap the shared local Ray for one whose workers see `env_vars` (fault injection), or for
    none at all (None: the test's CLI starts its own); the shared one is back afterwards,
    whatever happened, so the tests after this one find it as the fixture left it."""
    import ray

    ray.shutdown()
    if env_vars is not None:
        ray.init(**RAY_ARGS, runtime_env={"env_vars": env_vars})
    try:
        yield
    finally:
        ray.shutdown()
        ray.init(**RAY_ARGS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible HTTP server (moto server mode) on loopback; yields its endpoint."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
           "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh bucket on the loopback server; yields `s3://<bucket>`."""
    import uuid

    import boto3

    name = f"posmine-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A real filesystem of 256 KiB (tmpfs; `@pytest.mark.disk_kib(N)` for another size),
    mounted for the test and gone after it."""
    marker = request.node.get_closest_marker("disk_kib")
    kib = marker.args[0] if marker else 256
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
