"""Driver peak memory of the data + embed stages as the corpus grows (synthetic, tiny encoder).

Each size runs in a fresh subprocess; its peak RSS is read from the OS after it exits.
Embeddings stream from the actor pool to storage, so the driver should stay flat.

    python benchmarks/driver_memory.py [--sizes 100000 300000 1000000] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import emit

ROOT = Path("/tmp/posmine-bench-memory")
WORDS = ("cell protein gene cancer virus brain heart blood drug trial mouse human risk dose study "
         "effect level rate high low increase decrease patients treatment therapy").split()


def make_dataset(n: int) -> Path:
    root = ROOT / f"corpus-{n}"
    if (root / "qrels" / "test.tsv").exists():
        return root
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(n):
            text = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(20))
            f.write(json.dumps({"_id": f"d{i}", "title": WORDS[i % len(WORDS)], "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for i in range(100):
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(WORDS[i % 20:i % 20 + 4])}) + "\n")
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i * 7}\t1\n" for i in range(100)))
    return root


def make_tiny_model() -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = ROOT / "tiny-bert"
    if (root / "model.safetensors").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 builds the vocabulary from `vocab` (and ignores vocab_file), 4.x from the file
    BertTokenizerFast(vocab_file=str(root / "vocab.txt"),
                      vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(root, safe_serialization=True)
    return root


def child(data: str, model: str, out: str) -> None:
    from posmine import pipeline
    from posmine.config import load_config

    cfg = load_config(None, [f"data.path={data}", f"teacher.model={model}", "teacher.max_length=32",
                             "teacher.batch_size=256", "teacher.num_actors=2",
                             "teacher.cpus_per_actor=0.5", "teacher.torch_threads=1",
                             f"output.dir={out}"])
    pipeline.embed(cfg)
    # this process only (the driver), not Ray's own processes
    print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    model = make_tiny_model()
    rows = []
    for n in a.sizes:
        data = make_dataset(n)
        out = ROOT / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", str(data), str(model), str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        peak = int(proc.stdout.split("PEAK_RSS_KIB")[-1].split()[0]) // 1024
        rows.append({"docs": n, "driver_peak_rss_mib": peak,
                     "corpus_jsonl_mib": round((data / "corpus.jsonl").stat().st_size / 2**20, 1),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    emit(rows, a.json)


if __name__ == "__main__":
    main()
