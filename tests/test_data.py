import gzip
import http.server
import io
import json
import os
import shutil
import threading
import zipfile
from pathlib import Path

import pytest

from posmine.cli import main
from posmine.config import DataConfig, default_beir_dir
from posmine.io import beir, inputs, prepared, storage
from posmine.io.inputs import DataError
from posmine.stages import data
from tests.conftest import CORPUS, QRELS, QUERIES, write_beir

SCIFACT = default_beir_dir("scifact")


def _scifact_counts(summary: dict) -> None:
    assert summary["corpus"] == 5183 and summary["queries"] == 1109
    assert summary["qrels"] == {"test": 339, "train": 919}


def test_scifact_counts() -> None:
    _scifact_counts(beir.load(SCIFACT).summary())


def test_cli_data_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", SCIFACT]) == 0
    _scifact_counts(json.loads(capsys.readouterr().out))


def test_scifact_through_s3(s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(SCIFACT, f"{s3_bucket[5:]}/beir/scifact", recursive=True)
    assert main(["data", "check", f"{s3_bucket}/beir/scifact"]) == 0
    _scifact_counts(json.loads(capsys.readouterr().out))


def test_gzip_and_parquet_layouts(tmp_path: Path) -> None:
    gz = beir.load(str(write_beir(tmp_path / "gz", gz=True))).summary()
    assert gz["corpus"] == len(CORPUS) and gz["queries"] == len(QUERIES)
    # the same dataset as Parquet, written by the data stage, reads back as a BEIR folder
    data.run(DataConfig(path=str(tmp_path / "gz")), str(tmp_path / "out"))
    pq_root = tmp_path / "pq"
    (pq_root / "qrels").mkdir(parents=True)
    staged = tmp_path / "out" / "data"
    storage.write_parquet(storage.read_parquet(str(staged / "corpus")), str(pq_root / "corpus.parquet"))
    storage.write_parquet(storage.read_parquet(str(staged / "queries.parquet")),
                          str(pq_root / "queries.parquet"))
    storage.write_parquet(storage.read_parquet(str(staged / "qrels" / "test.parquet")),
                          str(pq_root / "qrels" / "test.parquet"))
    summary = beir.load(str(pq_root)).summary()
    assert summary["corpus"] == len(CORPUS) and summary["qrels"] == {"test": len(QRELS["test"])}


def test_dev_holdout_is_seeded_and_disjoint(tiny_beir: Path) -> None:
    ds = beir.load(str(tiny_beir))
    a = data.prepared_qrels(ds.qrels, DataConfig(path=str(tiny_beir), dev_fraction=0.25, holdout_dev=True))
    b = data.prepared_qrels(ds.qrels, DataConfig(path=str(tiny_beir), dev_fraction=0.25, holdout_dev=True))
    dev = set(a["dev"].column("query_id").to_pylist())
    train = set(a["train"].column("query_id").to_pylist())
    assert dev and not dev & train
    assert dev | train == set(ds.qrels["train"].column("query_id").to_pylist())
    assert dev == set(b["dev"].column("query_id").to_pylist())


def test_prepare_resumes_by_manifest(tiny_beir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    cfg = DataConfig(path=str(tiny_beir))
    first = data.run(cfg, out)
    # skipped: the manifest file itself is not rewritten (not a timestamp of 1 s resolution)
    manifest = Path(out) / "data" / storage.MANIFEST
    inode, mtime = manifest.stat().st_ino, manifest.stat().st_mtime_ns
    assert data.run(cfg, out) == first
    assert (manifest.stat().st_ino, manifest.stat().st_mtime_ns) == (inode, mtime)
    os.remove(manifest)  # as if it died before committing
    assert storage.read_manifest(str(Path(out) / "data")) is None
    redone = data.run(cfg, out)
    assert redone["rows"]["corpus"] == len(CORPUS)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_input_edited_in_place_is_read_again(where: str, tmp_path: Path,
                                                 request: pytest.FixtureRequest,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """One document's text, then one qrels line, edited under the same path (the same size
    too, so only the content tells): each rerun of the same call prepares the data again, with
    the new text and judgement; an untouched rerun is current and says so."""
    import logging

    root = write_beir(tmp_path / "ds", gz=True)
    corpus = [dict(d) for d in CORPUS]
    url = str(root)
    if where == "s3":
        url = f"{request.getfixturevalue('s3_bucket')}/ds"
    out = str(tmp_path / "out") if where == "local" else f"{url}-out"

    def publish() -> None:
        if where == "s3":
            fs, path = storage.filesystem(url)
            fs.put(str(root) + "/", path, recursive=True)

    publish()
    cfg = DataConfig(path=url)
    first = data.run(cfg, out)
    caplog.set_level(logging.DEBUG, logger="posmine")  # said once a process: at DEBUG after the run
    assert data.run(cfg, out) == first
    assert "data: current" in caplog.text and "inputs' content" in caplog.text
    corpus[3]["text"] = corpus[3]["text"].replace("a", "o", 1)  # same length: the size is no tell
    write_beir(root, corpus=corpus, gz=True)
    publish()
    second = data.run(cfg, out)
    assert second["config_hash"] != first["config_hash"]
    assert second["inputs"]["data.path"] != first["inputs"]["data.path"]
    texts = prepared.read_texts(f"{out}/data/corpus")
    assert texts["d3"] == f"{corpus[3]['title']} {corpus[3]['text']}"
    qrels = {s: list(rows) for s, rows in QRELS.items()}
    qrels["train"][0] = (qrels["train"][0][0], "d7", 1)  # q0 now judges d7 instead of d0
    write_beir(root, corpus=corpus, qrels=qrels, gz=True)
    publish()
    third = data.run(cfg, out)
    assert third["config_hash"] not in (first["config_hash"], second["config_hash"])
    train = prepared.read_prepared_qrels(f"{out}/data", "train").to_pylist()
    assert {"query_id": "q0", "doc_id": "d7"}.items() <= next(
        r for r in train if r["query_id"] == "q0" and r["doc_id"] == "d7").items()


def test_the_data_key_covers_every_input_file(tmp_path: Path) -> None:
    """`data.corpus` and the corpus folders a NeMo JSON names are inputs too."""
    from posmine.io import sources

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "cell", "positive": "cell study"}\n')
    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"text": "heart"}\n')
    cfg = DataConfig(path=str(pairs), corpus=str(extra))
    before = sources.input_fingerprints(cfg)
    assert set(before) == {"data.path", "data.corpus"}
    extra.write_text('{"text": "liver"}\n')
    after = sources.input_fingerprints(cfg)
    assert after["data.path"] == before["data.path"] and after["data.corpus"] != before["data.corpus"]
    with pytest.raises(DataError, match=r"missing\.jsonl: not found \(data\.corpus\)"):
        sources.input_fingerprints(DataConfig(path=str(pairs), corpus=str(tmp_path / "missing.jsonl")))


def test_queries_are_written_in_parts_and_the_most_positives_per_split_recorded(
        tmp_path: Path) -> None:
    """Cranfield (graded, 1-4; up to dozens of positives a query): the queries land in parts of
    `rows_per_part`, together every query once, in file order; the manifest's most positives
    per split equals a plain count over the prepared qrels."""
    out = str(tmp_path / "out")
    manifest = data.run(DataConfig(path=default_beir_dir("cranfield"), rows_per_part=100), out)
    parts = storage.parquet_files(f"{out}/data/{prepared.QUERIES}")
    assert len(parts) == 3  # 225 queries
    whole = storage.read_parquet(f"{out}/data/{prepared.QUERIES}")
    assert [storage.read_parquet(p).num_rows for p in parts] == [100, 100, 25]
    assert whole.num_rows == manifest["rows"]["queries"] == len(set(whole.column("id").to_pylist()))
    assert (whole.column("id").to_pylist()
            == beir.load(default_beir_dir("cranfield")).queries.column("id").to_pylist())
    for split in ("train", "test", "dev"):
        counts: dict[str, int] = {}
        for row in prepared.read_prepared_qrels(f"{out}/data", split).to_pylist():
            counts[row["query_id"]] = counts.get(row["query_id"], 0) + (row["score"] > 0)
        assert manifest["stats"][prepared.MAX_POSITIVES][split] == max(counts.values()) > 7
        assert prepared.split_max_positives(f"{out}/data", split) == max(counts.values())


def test_another_dataset_leaves_no_qrels_of_the_first(tiny_beir: Path, tmp_path: Path) -> None:
    """Re-preparing into the same output with a dataset that has no test split: the first
    dataset's test qrels must not stay behind to be evaluated on."""
    out = str(tmp_path / "out")
    data.run(DataConfig(path=str(tiny_beir)), out)
    assert prepared.read_prepared_qrels(f"{out}/data", "test").num_rows > 0
    second = tiny_beir.parent / "no-test"
    shutil.copytree(tiny_beir, second)
    (second / "qrels" / "test.tsv").unlink()
    data.run(DataConfig(path=str(second)), out)
    with pytest.raises(DataError, match="split 'test' not in the dataset"):
        prepared.read_prepared_qrels(f"{out}/data", "test")


def test_beir_download_path_on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`beir:<name>` downloads the zip from the (here: loopback) BEIR URL into the cache."""
    src = write_beir(tmp_path / "src" / "tinyset")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in src.rglob("*"):
            if f.is_file():
                z.write(f, f.relative_to(src.parent))
    body = buf.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path.endswith("/tinyset.zip")
            self.send_response(200 if ok else 404)
            self.end_headers()
            if ok:
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("POSMINE_BEIR_URL", f"http://127.0.0.1:{server.server_port}/{{name}}.zip")
    monkeypatch.setenv("POSMINE_CACHE", str(tmp_path / "cache"))
    try:
        assert beir.load("beir:tinyset").summary()["corpus"] == len(CORPUS)
        assert (tmp_path / "cache" / "beir" / "tinyset" / "corpus.jsonl").exists()
        with pytest.raises(DataError, match="beir:missing: download"):
            beir.load("beir:missing")
    finally:
        server.shutdown()


# ---------------------------------------------------------------- bad input


def _lines(rows: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


BAD_CASES = {
    "malformed_json": ("corpus.jsonl", _lines([CORPUS[0], '{"_id": "x", "text": '] ),
                       r"corpus\.jsonl:2: malformed JSON"),
    "not_an_object": ("corpus.jsonl", _lines([CORPUS[0], "[1, 2]"]),
                      r"corpus\.jsonl:2: expected a JSON object"),
    "missing_id": ("corpus.jsonl", _lines([CORPUS[0], {"text": "t"}]),
                   r"corpus\.jsonl:2: missing '_id'"),
    "missing_text": ("queries.jsonl", _lines([QUERIES[0], {"_id": "q1"}]),
                     r"queries\.jsonl:2 \(id 'q1'\): missing 'text'"),
    "id_wrong_type": ("corpus.jsonl", _lines([{"_id": ["a"], "text": "t"}]),
                      r"corpus\.jsonl:1: '_id' must be a string"),
    "duplicate_id": ("corpus.jsonl", _lines([*CORPUS, CORPUS[3]]),
                     rf"corpus\.jsonl:{len(CORPUS) + 1}: duplicate id 'd3'"),
    "non_utf8": ("queries.jsonl", _lines(QUERIES[:2]) + b'{"_id": "qx", "text": "caf\xe9"}\n',
                 r"queries\.jsonl:3: not valid UTF-8"),
    "empty_file": ("corpus.jsonl", b"", r"corpus\.jsonl: empty file"),
    "blank_only_file": ("queries.jsonl", b"\n\n", r"queries\.jsonl: empty file"),
    "qrels_bad_header": ("qrels/train.tsv", b"qid\tdocid\trel\nq0\td0\t1\n",
                         r"train\.tsv:1: bad header"),
    "qrels_bad_score": ("qrels/train.tsv", b"query-id\tcorpus-id\tscore\nq0\td0\thigh\n",
                        r"train\.tsv:2: score 'high' is not an integer"),
    "qrels_wrong_fields": ("qrels/train.tsv", b"query-id\tcorpus-id\tscore\nq0 d0 1\n",
                           r"train\.tsv:2: expected 3 tab-separated fields"),
    "qrels_missing_query": ("qrels/train.tsv", b"query-id\tcorpus-id\tscore\nq0\td0\t1\nq99\td1\t1\n",
                            r"train\.tsv:3: query id 'q99' is not in the queries file"),
    "qrels_missing_doc": ("qrels/test.tsv", b"query-id\tcorpus-id\tscore\nq0\tnope\t1\n",
                          r"test\.tsv:2: doc id 'nope' \(query 'q0'\) is not in the corpus"),
    "qrels_empty": ("qrels/test.tsv", b"query-id\tcorpus-id\tscore\n", r"test\.tsv: empty file"),
    "empty_id": ("queries.jsonl", _lines([{"_id": " ", "text": "t"}]), r"queries\.jsonl:1: empty '_id'"),
    "lone_surrogate": ("corpus.jsonl",
                       _lines(CORPUS[:2]) + b'{"_id": "dx", "text": "lone \\ud800 surrogate"}\n',
                       r"corpus\.jsonl:3: 'text' holds an unpaired surrogate"),
    "qrels_score_overflow": ("qrels/train.tsv", b"query-id\tcorpus-id\tscore\nq0\td0\t99999999999999999999\n",
                             r"train\.tsv:2: score 99999999999999999999 is out of range"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_and_line(case: str, tiny_beir: Path, tmp_path: Path) -> None:
    name, content, pattern = BAD_CASES[case]
    (tiny_beir / name).write_bytes(content)
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match=pattern):
        data.run(DataConfig(path=str(tiny_beir)), out)
    assert storage.read_manifest(str(tmp_path / "out" / "data")) is None  # nothing looks finished


def test_repeated_qrels_pairs_are_dropped_and_warned_and_unknown_ids_named_in_file_order(
        tiny_beir: Path) -> None:
    """Checked in Arrow over the whole file: the first row of a pair is kept, each later one is
    warned about by line; of an unknown query on line 5 and an unknown doc on line 4, line 4
    is named."""
    (tiny_beir / "qrels" / "train.tsv").write_bytes(
        b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq0\td0\t1\nq1\td1\t2\nq0\td2\t1\nq1\td1\t1\n")
    ds = beir.load(str(tiny_beir))
    t = ds.qrels["train"]
    assert list(zip(*(t.column(c).to_pylist() for c in ("query_id", "doc_id", "score")), strict=True)) == [
        ("q1", "d1", 1), ("q0", "d0", 1), ("q0", "d2", 1)]
    assert ds.warnings.counts["qrels_duplicate_pair"] == 2
    assert ds.warnings.examples["qrels_duplicate_pair"].endswith("train.tsv:4")
    (tiny_beir / "qrels" / "train.tsv").write_bytes(
        b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq0\td0\t1\nq1\tnope\t1\nq99\td0\t1\n")
    with pytest.raises(DataError, match=r"train\.tsv:4: doc id 'nope' \(query 'q1'\)"):
        beir.load(str(tiny_beir))


def test_bad_gzip_line_is_named(tiny_beir: Path) -> None:
    (tiny_beir / "corpus.jsonl").unlink()
    (tiny_beir / "corpus.jsonl.gz").write_bytes(gzip.compress(_lines([CORPUS[0], "{oops"])))
    with pytest.raises(DataError, match=r"corpus\.jsonl\.gz:2: malformed JSON"):
        beir.load(str(tiny_beir))


def test_parquet_missing_column_is_named(tiny_beir: Path) -> None:
    import pyarrow as pa

    (tiny_beir / "corpus.jsonl").unlink()
    storage.write_parquet(pa.table({"id": ["a"], "body": ["x"]}), str(tiny_beir / "corpus.parquet"))
    with pytest.raises(DataError, match=r"corpus\.parquet: missing column\(s\) \['title', 'text'\]"):
        beir.load(str(tiny_beir))


def test_missing_folder_and_qrels(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset folder not found"):
        beir.load(str(tmp_path / "nope"))
    root = write_beir(tmp_path / "noqrels")
    for f in (root / "qrels").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="no qrels files"):
        beir.load(str(root))


def test_empty_text_is_warned_and_counted(tmp_path: Path) -> None:
    corpus = [*CORPUS, {"_id": "blank", "title": "", "text": "  "}]
    summary = beir.load(str(write_beir(tmp_path / "t", corpus=corpus))).summary()
    assert summary["warnings"] == {"corpus_empty_text": 1}
    assert summary["corpus"] == len(CORPUS) + 1


def test_cli_reports_bad_data_nonzero(tiny_beir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tiny_beir / "corpus.jsonl").write_bytes(b'{"_id": "a", "text": "x"}\n{bad\n')
    assert main(["data", "check", str(tiny_beir)]) == 1
    assert "corpus.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_ids_with_surrounding_whitespace_are_stripped_and_counted(tiny_beir: Path) -> None:
    """Qrels ids are stripped; a corpus or query id with a trailing space is too, so the
    qrels find it, and the warning names the first such line."""
    corpus = [dict(d) for d in CORPUS]
    corpus[0]["_id"] = "d0 "
    queries = [dict(q) for q in QUERIES]
    queries[1]["_id"] = " q1"
    write_beir(tiny_beir, corpus=corpus, queries=queries)
    ds = beir.load(str(tiny_beir))
    assert "d0" in ds.corpus_ids.to_pylist() and "q1" in ds.queries.column("id").to_pylist()
    assert ds.warnings.counts["corpus_id_whitespace_stripped"] == 1
    assert ds.warnings.examples["corpus_id_whitespace_stripped"].endswith("corpus.jsonl:1 (id 'd0 ')")
    assert ds.warnings.counts["queries_id_whitespace_stripped"] == 1
    corpus[1]["_id"] = "d0"  # the same id once stripped: a duplicate, named at its line
    write_beir(tiny_beir, corpus=corpus, queries=queries)
    with pytest.raises(DataError, match=r"corpus\.jsonl:2: duplicate id 'd0'"):
        beir.load(str(tiny_beir))


def test_a_query_with_no_positive_judgement_is_counted(tiny_beir: Path) -> None:
    (tiny_beir / "qrels" / "train.tsv").write_bytes(
        b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq0\td0\t0\nq2\td2\t-1\nq0\td3\t0\n")
    ds = beir.load(str(tiny_beir))
    assert ds.warnings.counts["qrels_query_without_positive"] == 2
    assert ds.warnings.examples["qrels_query_without_positive"].endswith("train.tsv:3 (query 'q0')")


def test_beir_names_read_from_posmine_beir_dir_first(tiny_beir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`beir:NAME` (as every shipped config names its data) is `$POSMINE_BEIR_DIR/NAME` when
    that folder holds the dataset: no download, and the variable moves every config at once."""
    from posmine.config import load_config

    monkeypatch.setenv("POSMINE_BEIR_DIR", str(tiny_beir.parent))
    monkeypatch.setenv("POSMINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("POSMINE_BEIR_URL", "http://127.0.0.1:9/{name}.zip")  # no download happens
    assert inputs.resolve("beir:tiny") == str(tiny_beir)
    assert beir.load("beir:tiny").summary()["corpus"] == len(CORPUS)
    monkeypatch.delenv("POSMINE_BEIR_DIR")
    for name in ("cisi", "cranfield", "scifact"):
        cfg = load_config(f"jobs/configs/{name}.yaml", [])
        assert cfg.data.path == f"beir:{name}"
        assert inputs.resolve(cfg.data.path) == default_beir_dir(name)
