"""Your own data in, every peer's format out: (query, positive) pairs as JSONL, Parquet, CSV and
a `datasets` folder; FlagEmbedding JSONL and NeMo AutoModel's corpus-ID JSON, both also read
back from posmine's own exports; `posmine export` in every format, loaded by `datasets`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from posmine.cli import main
from posmine.config import DataConfig
from posmine.io import export, sources, storage
from posmine.io.inputs import DataError
from tests.conftest import WORDS

# 12 queries; query i has 1 + i % 3 positives, each on its own row; "Cell protein gene!"
# repeats query 0 in another spelling; one row has an empty positive and is skipped.
PAIRS = [{"anchor": f"{WORDS[i]} {WORDS[i + 12]} {WORDS[(i * 5) % len(WORDS)]}",
          "positive": " ".join(WORDS[(i * 7 + p * 3 + j) % len(WORDS)] for j in range(9))}
         for i in range(12) for p in range(1 + i % 3)]
PAIRS += [{"anchor": PAIRS[0]["anchor"].upper() + "!", "positive": "sleep stress immune response"},
          {"anchor": "liver kidney", "positive": ""}]


def write_pairs(path: Path, rows: list[dict[str, Any]] = PAIRS) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        pacsv.write_csv(pa.Table.from_pylist(rows), path)
    else:  # a datasets save_to_disk folder
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def tables(path: Path, **kw: Any) -> sources.Tables:
    cfg = DataConfig(path=str(path), **kw)
    return sources.load(cfg, sources.detect(str(path)) if cfg.format == "auto" else cfg.format)


def as_examples(t: sources.Tables) -> dict[str, tuple[set[str], set[str]]]:
    """query text -> (positive texts, the file's negative texts): what a reader understood."""
    docs = dict(zip(t.corpus["id"].to_pylist(), t.corpus["text"].to_pylist(), strict=True))
    qtext = dict(zip(t.queries["id"].to_pylist(), t.queries["text"].to_pylist(), strict=True))
    negs = dict(zip(t.negatives["query_id"].to_pylist(), t.negatives["doc_ids"].to_pylist(),
                    strict=True))
    out: dict[str, tuple[set[str], set[str]]] = {}
    for split in t.qrels.values():
        for q, d in zip(split["query_id"].to_pylist(), split["doc_id"].to_pylist(), strict=True):
            out.setdefault(qtext[q], (set(), {docs[n] for n in negs.get(q, [])}))[0].add(docs[d])
    return out


def test_pairs_jsonl_merges_repeated_queries_and_counts_what_it_did(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    t = tables(write_pairs(tmp_path / "pairs.jsonl"), test_fraction=0.25)
    s = t.summary
    assert s["format"] == "pairs" and s["columns"] == ["anchor", "positive"]
    assert s["records"] == len(PAIRS) and s["records_skipped"] == 1  # the empty positive
    assert s["queries"] == 12 and s["duplicate_query_texts"] == 1  # the upper-case spelling
    assert t.warnings.counts == {"empty_positive": 1, "no_positive": 1}
    assert "pairs.jsonl:" + str(len(PAIRS)) in t.warnings.examples["empty_positive"]  # file:line
    got = as_examples(t)
    q0 = PAIRS[0]["anchor"]
    assert got[q0][0] == {PAIRS[0]["positive"], "sleep stress immune response"}  # merged query
    assert sum(len(p) for p, _ in got.values()) == s["positives"] == len(PAIRS) - 1
    assert max(len(p) for p, _ in got.values()) == 3
    # ids are the normalised text's hash: stable, and the same for the other spelling
    assert sources.text_id("q", q0) == sources.text_id("q", q0.upper() + "!")
    assert sources.text_id("q", q0) in t.queries["id"].to_pylist()
    # 3 of 12 queries held out as test, all rows of a query on one side
    train, test = (set(t.qrels[s]["query_id"].to_pylist()) for s in ("train", "test"))
    assert len(test) == 3 and not train & test and len(train | test) == 12


@pytest.mark.parametrize("kind", [".parquet", ".csv", "_hf", "hf:"])
def test_parquet_csv_and_datasets_folder_read_as_the_jsonl(tmp_path: Path, kind: str) -> None:
    """`hf:` goes through `datasets.load_dataset` (the Hub path), here on a local folder of
    data files, which it loads offline."""
    ref = tables(write_pairs(tmp_path / "pairs.jsonl"))
    if kind == "hf:":
        (tmp_path / "hub").mkdir()
        write_pairs(tmp_path / "hub" / "train.jsonl")
        other = tables(Path(f"hf:{tmp_path / 'hub'}:train"))
    else:
        other = tables(write_pairs(tmp_path / f"pairs{kind}"))
    for name in ("corpus", "queries", "negatives"):
        assert getattr(other, name).equals(getattr(ref, name)), name
    assert all(other.qrels[s].equals(ref.qrels[s]) for s in ref.qrels)
    assert other.summary["positives"] == ref.summary["positives"]


def test_query_pos_columns_lists_and_an_extra_corpus(tmp_path: Path) -> None:
    rows = [{"query": "cell protein", "pos": ["gene study", "virus study"]},
            {"query": "brain heart", "pos": ["blood drug"]}]
    corpus = write_pairs(tmp_path / "corpus.jsonl", [{"text": "liver kidney lung"}, {"text": "gene study"}])
    t = tables(write_pairs(tmp_path / "p.jsonl", rows), corpus=str(corpus), test_fraction=0.0)
    assert t.summary["columns"] == ["query", "pos"] and list(t.qrels) == ["train"]
    assert sorted(t.corpus["text"].to_pylist()) == ["blood drug", "gene study", "liver kidney lung",
                                                    "virus study"]  # "gene study" once
    assert as_examples(t)["cell protein"][0] == {"gene study", "virus study"}


@pytest.mark.parametrize("content, message", [
    ('{"anchor": "a", "positive": "b"}\n{"anchor": "a", "positive": 7}\n',
     "p.jsonl:2: positive must be a string"),
    ('{"anchor": "a", "positive": "b"}\n{"anchor": "a"\n', "p.jsonl:2: malformed JSON"),
    ('{"question": "a", "reply": "b"}\n', "p.jsonl:1: none of the columns ['positive', 'pos', 'answer']"),
])
def test_bad_pairs_name_the_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tables(tmp_path / "p.jsonl")


def test_configured_column_that_is_missing_names_the_key(tmp_path: Path) -> None:
    path = write_pairs(tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet:row 1: no column 'q' \(data.query_column\)"):
        tables(path, query_column="q")


def test_flagembedding_input_keeps_the_files_negatives(tmp_path: Path) -> None:
    rows = [{"query": "cell protein", "pos": ["gene study"], "neg": ["brain heart", "drug trial"]},
            {"query": "virus", "pos": ["mouse human"], "neg": []},
            {"query": "virus", "pos": ["risk dose"], "neg": ["brain heart"], "prompt": "ignored"}]
    path = write_pairs(tmp_path / "flag.jsonl", rows)
    t = tables(path, test_fraction=0.0)
    assert t.summary["format"] == "flagembedding" and t.summary["file_negatives"] == 3
    got = as_examples(t)
    assert got["cell protein"] == ({"gene study"}, {"brain heart", "drug trial"})
    assert got["virus"] == ({"mouse human", "risk dose"}, {"brain heart"})
    (tmp_path / "bad.jsonl").write_text('{"query": "x", "neg": ["y"], "pos": null}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing 'pos'"):
        tables(tmp_path / "bad.jsonl", format="flagembedding")


# ---------------------------------------------------------------- exports


def mined_table() -> pa.Table:
    """Three mined examples as the mine stage writes them (anchor=pair: one positive each);
    the last has one negative only."""
    rows = [("q1", "cell protein", "d1", "gene study", 0.8, ["d3", "d4"], ["brain heart", "drug trial"]),
            ("q1", "cell protein", "d2", "virus study", 0.7, ["d3", "d5"], ["brain heart", "liver lung"]),
            ("q2", "mouse human", "d6", "risk dose", 0.9, ["d4"], ["drug trial"])]
    return pa.table({
        "query_id": [r[0] for r in rows], "query": [r[1] for r in rows],
        "positive_ids": [[r[2]] for r in rows], "positives": [[r[3]] for r in rows],
        "positive_scores": pa.array([[r[4]] for r in rows], pa.list_(pa.float32())),
        "negative_ids": [r[5] for r in rows], "negatives": [r[6] for r in rows],
        "negative_scores": pa.array([[0.5, 0.25][:len(r[5])] for r in rows], pa.list_(pa.float32())),
        "query_positive_ids": [["d1", "d2"], ["d1", "d2"], ["d6"]],
        "query_positive_hashes": [[1, 2], [1, 2], [3]]})


@pytest.fixture
def mine_dir(tmp_path: Path) -> str:
    d = tmp_path / "mine"
    storage.write_parquet(mined_table(), str(d / "mined.parquet"))
    storage.write_json(str(d / "_manifest.json"), {"stage": "mine", "mining": {"num_negatives": 2}})
    return str(d)


# (format, scores) -> the columns and rows `mine_hard_negatives` gives for the same examples
EXPECTED = {
    ("st-triplet", False): (["anchor", "positive", "negative"], 5),
    ("st-triplet", True): (["anchor", "positive", "negative", "scores"], 5),
    ("st-n-tuple", False): (["anchor", "positive", "negative_1", "negative_2"], 2),
    ("st-n-tuple", True): (["anchor", "positive", "negative_1", "negative_2", "scores"], 2),
    # per query its positives, then the negatives of its weakest positive's example
    ("st-labeled-pair", False): (["anchor", "positive", "label"], 6),
    ("st-labeled-pair", True): (["anchor", "positive", "score"], 6),
    ("st-labeled-list", False): (["anchor", "positive", "labels"], 3),
    ("st-labeled-list", True): (["anchor", "positive", "scores"], 3),
    ("parquet", False): (["query_id", "query", "positive_ids", "positives", "negative_ids",
                          "negatives", "query_positive_ids", "query_positive_hashes"], 3),
}


@pytest.mark.parametrize("fmt, scores", sorted(EXPECTED))
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_every_export_loads_in_datasets(mine_dir: str, tmp_path: Path, fmt: str, scores: bool,
                                        suffix: str) -> None:
    import datasets

    out = str(tmp_path / f"out{suffix}")
    flags = ["--scores"] if scores else []
    assert main(["export", mine_dir, out, "--format", fmt, *flags]) == 0
    ds = datasets.load_dataset("parquet" if suffix == ".parquet" else "json", data_files=out,
                               split="train")
    columns, rows = EXPECTED[fmt, scores]
    assert ds.column_names == columns and len(ds) == rows
    first = ds[0]
    if fmt == "st-triplet":
        assert (first["anchor"], first["positive"], first["negative"]) == (
            "cell protein", "gene study", "brain heart")
        assert first.get("scores", [0.8, 0.5]) == pytest.approx([0.8, 0.5])
    if fmt == "st-n-tuple":  # q2's example has 1 negative of 2: left out
        assert ds["anchor"] == ["cell protein"] * 2 and ds["negative_2"] == ["drug trial", "liver lung"]
    if fmt == "st-labeled-pair":
        key = "score" if scores else "label"
        assert ds["positive"][:5] == ["gene study", "virus study", "brain heart", "liver lung",
                                      "risk dose"]
        assert ds[key][:5] == pytest.approx([0.8, 0.7, 0.5, 0.25, 0.9] if scores else [1, 1, 0, 0, 1])
    if fmt == "st-labeled-list":
        assert first["positive"] == ["gene study", "brain heart", "drug trial"]
        assert first["scores" if scores else "labels"] == pytest.approx([0.8, 0.5, 0.25] if scores
                                                                        else [1, 0, 0])


def test_export_of_an_unfinished_stage_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage.write_parquet(mined_table(), str(tmp_path / "mine" / "mined.parquet"))
    assert main(["export", str(tmp_path / "mine"), str(tmp_path / "x.parquet"), "--format", "parquet"]) == 1
    assert "not a finished mine stage" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize("fmt", ["flagembedding", "nemo"])
def test_flagembedding_and_nemo_exports_read_back_as_the_same_examples(mine_dir: str, tmp_path: Path,
                                                                       fmt: str) -> None:
    out = tmp_path / ("flag.jsonl" if fmt == "flagembedding" else "nemo")
    export.export(mine_dir, fmt, str(out), scores=True)
    back = tables(out / "train.json" if fmt == "nemo" else out, test_fraction=0.0)
    assert back.summary["format"] == fmt
    mined = mined_table().to_pylist()
    want: dict[str, tuple[set[str], set[str]]] = {}
    for r in mined:
        pos, neg = want.setdefault(r["query"], (set(), set()))
        pos.update(r["positives"])
        neg.update(r["negatives"])
    assert as_examples(back) == want
    if fmt == "flagembedding":
        first = json.loads(out.read_text().splitlines()[0])
        assert first["pos_scores"] == pytest.approx([0.8]) and first["neg_scores"] == [0.5, 0.25]
    else:  # the layout NeMo AutoModel's loader reads: corpus by relative path, metadata beside it
        doc = json.loads((out / "train.json").read_text())
        assert doc["corpus"] == [{"path": "corpus"}] and doc["data"][0]["pos_doc"] == [{"id": "d1"}]
        assert json.loads((out / "corpus" / "merlin_metadata.json").read_text())["corpus_id"] == "posmine"


def test_nemo_input_errors_name_the_entry(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "merlin_metadata.json").write_text('{"class": "TextQADataset", "corpus_id": "c"}')
    (tmp_path / "c" / "docs.jsonl").write_text('{"id": "a", "text": "gene"}\n')
    doc = {"corpus": [{"path": "c"}], "data": [
        {"question_id": "q", "question": "x", "corpus_id": "c", "pos_doc": [{"id": "b"}], "neg_doc": []}]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"t.json: data\[0\]: pos_doc: id 'b' is not in corpus 'c'"):
        tables(tmp_path / "t.json")


def test_sentence_transformers_trains_a_step_on_the_n_tuple_export(mine_dir: str, tmp_path: Path,
                                                                   tiny_model: str) -> None:
    st = pytest.importorskip("sentence_transformers")  # the bench extra
    import datasets
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    out = str(tmp_path / "n.parquet")
    export.export(mine_dir, "st-n-tuple", out)
    train = datasets.load_dataset("parquet", data_files=out, split="train")
    model = st.SentenceTransformer(tiny_model, device="cpu")
    args = st.SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "st"), max_steps=1,
                                                   per_device_train_batch_size=2, report_to=[],
                                                   use_cpu=True, save_strategy="no")
    trainer = st.SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train,
        loss=MultipleNegativesRankingLoss(model))
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.train()
    assert result.global_step == 1
    assert any(not (a == b).all() for a, b in zip(before, model.parameters(), strict=True))


def test_st_formats_match_mine_hard_negatives(tmp_path: Path, tiny_model: str) -> None:
    """The columns of each ST export are those sentence-transformers' own miner writes."""
    st = pytest.importorskip("sentence_transformers")
    import datasets
    from sentence_transformers.util import mine_hard_negatives

    model = st.SentenceTransformer(tiny_model, device="cpu")
    pairs = datasets.Dataset.from_dict({"anchor": ["cell protein", "mouse human"],
                                        "positive": ["gene study", "risk dose"]})
    corpus = ["brain heart", "drug trial", "liver lung", "sleep stress", "virus cancer"]
    for (fmt, scores), (columns, _) in EXPECTED.items():
        if fmt == "parquet":
            continue
        theirs = mine_hard_negatives(pairs, model, corpus=corpus, num_negatives=2, range_max=5,
                                     output_format=fmt.removeprefix("st-"), output_scores=scores,
                                     verbose=False)
        assert theirs.column_names == columns, (fmt, scores)


# ---------------------------------------------------------------- end to end


def _run_args(data: Path, tiny_model: str, out: Path, *extra: str) -> list[str]:
    return [f"data.path={data}", f"teacher.model={tiny_model}", f"train.model={tiny_model}",
            "teacher.cpus_per_actor=0.5", "teacher.torch_threads=1", "data.test_fraction=0.25",
            "mining.top_k=8", "mining.num_negatives=2", "train.batch_size=4", "train.max_steps=2",
            "train.log_every=1", "train.cpus_per_worker=0.5", "evaluate.k_values=[10]",
            "evaluate.top_k=20", f"output.dir={out}", *extra]


@pytest.mark.e2e  # a whole `posmine run` with tracking
def test_posmine_run_on_pairs_with_tensorboard(ray_local: None, tiny_model: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A JSONL of pairs with repeated queries and no corpus, mined and trained end to end; then
    the same data as Parquet and as a datasets folder give the same mined examples."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from posmine import pipeline
    from posmine.config import load_config

    out = tmp_path / "out"
    jsonl = write_pairs(tmp_path / "pairs.jsonl")
    assert main(["run", "jobs/configs/scifact.yaml",
                 *_run_args(jsonl, tiny_model, out, "train.track=tensorboard")]) == 0
    printed = capsys.readouterr().out
    assert "read pairs: 12 queries, 15 passages; 26 records" in printed
    assert "1 query spellings merged" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["format"] == "pairs" and summary["data"]["rows"]["qrels_test"] > 0
    assert [s for s, _ in summary["loss_curve"]] == [1, 2]
    events = EventAccumulator(str(out / "train" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [round(e.value, 5) for e in events.Scalars("train/loss")] == [
        round(v, 5) for _, v in summary["loss_curve"]]
    mined = storage.read_parquet(str(out / "mine" / "mined.parquet"))
    for kind in (".parquet", "_hf"):
        other = str(tmp_path / f"o{kind}")
        cfg = load_config("jobs/configs/scifact.yaml",
                          _run_args(write_pairs(tmp_path / f"pairs{kind}"), tiny_model, Path(other)))
        manifest = pipeline.mine(cfg)
        assert storage.read_parquet(f"{other}/mine/mined.parquet").equals(mined), kind
        assert manifest["rows"]["examples"] == mined.num_rows > 0


def test_flagembedding_negatives_join_the_candidates(ray_local: None, tiny_model: str,
                                                     tmp_path: Path) -> None:
    """mining.existing_negatives=candidates: the file's negatives are scored and filtered with
    the searched candidates; `ignore` leaves them to the search."""
    from posmine import pipeline
    from posmine.config import load_config

    rows = [{"query": p["anchor"], "pos": [p["positive"]], "neg": [PAIRS[(i + 5) % 20]["positive"]]}
            for i, p in enumerate(PAIRS[:20])]
    path = write_pairs(tmp_path / "flag.jsonl", rows)
    stats = {}
    for mode in ("candidates", "ignore"):
        cfg = load_config("jobs/configs/scifact.yaml", _run_args(
            path, tiny_model, tmp_path / "out", "mining.top_k=2", "mining.rule=naive_topk",
            "data.test_fraction=0", f"mining.existing_negatives={mode}"))
        stats[mode] = pipeline.mine(cfg)["stats"]
    # top_k=2 of 11+ candidates: the file's negatives rarely make the search's depth on their
    # own, so joining them adds most of them
    assert stats["candidates"]["existing_negatives_joined"] > 0
    assert stats["ignore"]["existing_negatives_joined"] == 0
