"""The mine stage on Ray Data over candidate shards, held to the one-process reference.

`mine.mine_shards` maps the miner over query shards with the texts and duplicate keys from the
`TextShard` actors and the positives' scores from the search shards; `mine.mine_rows` reads
every candidate, text and embedding in one process and normalises each candidate's text. On real
data (SciFact: one positive per query; Cranfield: graded, 7 per query) they must write the same
examples, bit for bit, and the same counts.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from posmine import pipeline
from posmine.config import Config, default_beir_dir, load_config
from posmine.core import metrics
from posmine.core.mining import MiningStats
from posmine.io import prepared, storage
from posmine.io.candidates import candidate_shards
from posmine.io.textstore import TextStore, bucket
from posmine.stages import mine as mine_stage
from posmine.stages import remote
from posmine.stages.evaluate import qrels_dict, run_from_candidates


def _sorted(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["query_id"], r["positive_ids"]))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One output folder per dataset for the module: settings of one dataset share its stages."""
    return tmp_path_factory.mktemp("mine-scale")


def _cfg(dataset: str, model: str, out: Path, extra: list[str]) -> Config:
    return load_config(None, [f"data.path={default_beir_dir(dataset)}", f"teacher.model={model}",
                              "teacher.max_length=32", "teacher.cpus_per_actor=0.5",
                              "teacher.torch_threads=1", "index.query_batch_size=40",
                              # a random teacher ranks positives anywhere: bound the deeper
                              # searches, or the reference normalises the whole corpus per query
                              "mining.max_depth=256",
                              f"output.dir={out / dataset}", *extra])


@pytest.mark.parametrize(("dataset", "extra"), [
    # On Ray actors (search shards, the mining pool): SciFact, 5,183 documents, and Cranfield.
    # Cranfield's few candidates are also searched and mined in the process, as the defaults
    # place them.
    pytest.param("scifact", ["index.local_below=0"], marks=pytest.mark.e2e, id="scifact-actors"),
    pytest.param("cranfield", ["index.local_below=0"], id="cranfield-actors"),
    pytest.param("cranfield", [], id="cranfield"),
    pytest.param("cranfield", ["mining.dedup_text=exact", "mining.anchor=max", "mining.window=rank"],
                 id="cranfield-exact-max-rank"),
    # grades 1 and 2 of 4 judged but not positives: never negatives, masked in training
    pytest.param("cranfield", ["data.min_positive_score=3"], id="cranfield-graded"),
])
def test_mine_stage_on_shards_equals_the_one_process_reference(
        ray_local: None, tiny_model: str, outputs: Path, dataset: str, extra: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    on_actors = "index.local_below=0" in extra
    # placement is in no stage's key: the actors get folders of their own, or they find the
    # in-process run's stages current and do nothing
    cfg = _cfg(dataset, tiny_model, outputs / "actors" if on_actors else outputs, extra)
    if on_actors:
        monkeypatch.setattr(remote, "LOCAL_CANDIDATES", 0)  # the pool, however few
    manifest = pipeline.mine(cfg)
    shards = storage.listdir(f"{manifest['dir']}/mined.parquet")
    assert len(shards) > 2  # several query shards, one mined shard each
    data_dir, _ = pipeline.prepare(cfg)
    ref_rows, ref_stats = mine_stage.mine_rows(cfg.mining, data_dir, pipeline.embed(cfg)["dir"],
                                               manifest["candidate_dirs"], cfg.data.split)
    got = storage.read_parquet(f"{manifest['dir']}/mined.parquet").to_pylist()
    ref = pa.Table.from_pylist(ref_rows, schema=mine_stage.schemas.MINED).to_pylist()
    assert len(got) == len(ref) == manifest["rows"]["examples"] > 0
    assert _sorted(got) == _sorted(ref)  # texts, scores, hashes: every column, every bit
    want = {k: v for k, v in ref_stats.to_dict().items()}
    have = {k: v for k, v in manifest["stats"].items() if k in want}
    assert have == want
    if dataset == "scifact":  # one positive per query
        assert want["positives"] == want["examples"]
    elif cfg.data.min_positive_score > 1:
        judged = prepared.judged_by_query(data_dir, "train")
        assert want["judged_below_min"] == sum(len(j) for q, j in judged.items()
                                               if q in {r["query_id"] for r in got}) > 0
        assert want["removed_judged"] > 0  # the random teacher ranks some among the candidates
        for r in got:
            weak = set(judged.get(r["query_id"], ()))
            assert not weak & set(r["negative_ids"]) and not weak & set(r["positive_ids"])
            assert weak <= set(r["query_positive_ids"])  # masked as known positives in training
    else:
        assert want["positives"] > 3 * want["queries_in"]


def test_stats_of_shards_add_up_to_the_stats_of_the_whole() -> None:
    a, b = MiningStats(queries_in=2, candidates=10), MiningStats(queries_in=3, candidates=5)
    whole = MiningStats()
    a.hist_kept[3] = 2
    b.hist_kept[3] = 1
    for s in (a, b):
        whole.add(s.to_dict())
    assert whole.queries_in == 5 and whole.candidates == 15 and whole.hist_kept[3] == 3


def test_text_store_answers_in_request_order_from_the_shard_that_holds_each_id(
        ray_local: None, tiny_beir: Path, tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.path={tiny_beir}", f"output.dir={tmp_path / 'out'}"])
    data_dir, _ = pipeline.prepare(cfg)
    store = TextStore(data_dir, "normalized", num_shards=3)
    try:
        corpus = prepared.read_texts(f"{data_dir}/corpus")
        ids = list(corpus)[::-1]
        assert len(set(bucket(ids, 3).tolist())) == 3  # the ids are spread over every shard
        assert store.texts("corpus", ids) == {i: corpus[i] for i in ids}
        keys = store.keys("corpus", ids)
        assert keys.tolist() == [mine_stage.mining.text_hash(corpus[i]) for i in ids]
        assert np.array_equal(store.hashes("corpus", ids), keys)
        with pytest.raises(KeyError, match="'nope' is not in the data stage's corpus"):
            store.texts("corpus", ["nope"])
    finally:
        store.close()


@pytest.mark.parametrize("where", ["pool", "here"])
def test_a_mine_stage_that_fails_midway_leaves_no_manifest_and_a_rerun_finishes(
        ray_local: None, tiny_model: str, outputs: Path, where: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One unreadable candidate shard: the other shards may be mined, but the stage has no
    manifest and the error names the shard; mended, a rerun writes the same examples as a
    clean run. On the actor pool, and in this process (Cranfield's few candidates)."""
    if where == "pool":
        monkeypatch.setattr(remote, "LOCAL_CANDIDATES", 0)
    cfg = _cfg("cranfield", tiny_model, outputs, ["mining.num_negatives=3"])
    dirs, upstream, _ = pipeline.candidates(cfg, cfg.teacher, [cfg.mining])
    data_dir, _ = pipeline.prepare(cfg)
    shard = candidate_shards(dirs[0])[1]
    good = Path(shard).read_bytes()
    Path(shard).write_bytes(good[: len(good) // 2])
    out = outputs / f"faulty-{where}"
    try:
        with pytest.raises(Exception, match=r"part-00001\.parquet") as failed:
            mine_stage.run(cfg.mining, data_dir, dirs, str(out), "train", upstream)
        assert storage.read_manifest(str(out / "mine")) is None
        # the error, still held here, does not hold the actor pool's CPUs (a search after it hung)
        assert failed.value is not None and _all_cpus_free_within(60)
    finally:  # the module's later tests read this shard
        Path(shard).write_bytes(good)
    manifest = mine_stage.run(cfg.mining, data_dir, dirs, str(out), "train", upstream)
    clean = mine_stage.run(cfg.mining, data_dir, dirs, str(outputs / "clean"), "train", upstream)
    assert manifest["rows"] == clean["rows"] and manifest["stats"] == clean["stats"]
    assert (storage.read_parquet(str(out / "mine" / "mined.parquet")).to_pylist()
            == storage.read_parquet(str(outputs / "clean" / "mine" / "mined.parquet")).to_pylist())


def test_search_rounds_are_found_without_reading_a_candidate_and_a_lost_round_is_redone(
        ray_local: None, tiny_model: str, outputs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cranfield with a random teacher needs deeper rounds. Once searched, the rounds are read
    from their record: the queries to deepen are not listed again (that read a million queries'
    candidates in the driver of every later stage); a round removed since is searched again."""
    cfg = _cfg("cranfield", tiny_model, outputs, ["mining.num_negatives=3"])
    first = pipeline.candidates(cfg, cfg.teacher, [cfg.mining])
    assert len(first[0]) > 1 and first[2]["search_rounds"][1][1] > 0

    def never(*args: object) -> None:
        raise AssertionError("the queries to deepen were listed again")

    monkeypatch.setattr(mine_stage, "unfilled", never)
    assert pipeline.candidates(cfg, cfg.teacher, [cfg.mining]) == first
    with pytest.raises(AssertionError, match="listed again"):  # a lost round must be redone
        storage.remove(first[0][-1])
        pipeline.candidates(cfg, cfg.teacher, [cfg.mining])
    monkeypatch.undo()
    assert pipeline.candidates(cfg, cfg.teacher, [cfg.mining]) == first
    assert storage.read_manifest(first[0][-1]) is not None


def _all_cpus_free_within(seconds: float) -> bool:
    import ray

    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_evaluation_summed_over_candidate_shards_equals_one_pass_over_the_whole_run(
        ray_local: None, tiny_model: str, outputs: Path) -> None:
    """SciFact test, 300 queries in shards of 40: the stage's Ray tasks each score one shard
    against its own queries' qrels; the sums give the one-process means (which
    tests/test_metrics.py holds to pytrec_eval)."""
    cfg = _cfg("scifact", tiny_model, outputs, [])
    got = pipeline.evaluate(cfg)["metrics"]
    cand_dir, _ = pipeline.search(cfg, cfg.teacher, cfg.evaluate.split, cfg.evaluate.top_k)
    assert len(candidate_shards(cand_dir)) > 5
    data_dir, _ = pipeline.prepare(cfg)
    want = metrics.evaluate(qrels_dict(data_dir, cfg.evaluate.split),
                            run_from_candidates(f"{cand_dir}/candidates.parquet"),
                            cfg.evaluate.k_values, cfg.evaluate.ignore_identical_ids)
    assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-12, abs=1e-15)
