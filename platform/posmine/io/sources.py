"""Training data that is not in the BEIR layout, read into the data stage's BEIR tables.

- `pairs`: (query, positive) rows in JSONL, Parquet or CSV at any fsspec URL, a `datasets`
  `save_to_disk` folder, or `hf:NAME[:SPLIT]` (`datasets.load_dataset`, needs a network). A
  query on several rows has several positives; a positive cell may also hold a list.
- `flagembedding`: FlagEmbedding's `{"query", "pos": [...], "neg": [...]}` JSONL (NeMo
  AutoModel's inline JSONL, `question`/`pos_doc`/`neg_doc`, reads the same way).
- `nemo`: NeMo AutoModel's corpus-ID JSON: `{"corpus": [{"path": DIR}], "data": [{"question_id",
  "question", "corpus_id", "pos_doc": [{"id"}], "neg_doc": [...]}]}`, each DIR holding
  `merlin_metadata.json` (`corpus_id`) and files of `id, text` rows.

Texts without ids get ids from their normalised text (`q`/`d` + 16 hex digits of its hash,
the same normalisation as `mining.text_hash`): stable across runs and machines, and texts that
normalise equal are merged into one (counted). A query's positives are its qrels (score 1);
the file's own negatives are kept per query (`negatives`) for `mining.existing_negatives`.
Every error names the file and the line or row; empty texts are skipped, counted and warned
about. None of these formats has splits: `data.test_fraction` of the queries becomes `test`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from posmine.config import DataConfig
from posmine.core.mining import normalize_text
from posmine.io import schemas, storage
from posmine.io.inputs import DataError, Warnings, iter_jsonl, resolve, split_queries

log = logging.getLogger(__name__)

FORMATS = ("beir", "pairs", "flagembedding", "nemo")
QUERY_COLUMNS = ("anchor", "query", "question")
POSITIVE_COLUMNS = ("positive", "pos", "answer")  # sentence-transformers datasets use all three
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".jsonl.gz", ".json")

Row = tuple[str, dict[str, Any]]  # (where: "file:line" or "name[row i]", record)


def text_id(prefix: str, text: str) -> str:
    """A stable id for a text: equal for texts that `mining.normalize_text` equates."""
    return prefix + hashlib.blake2b(normalize_text(text).encode(), digest_size=8).hexdigest()


@dataclass
class Collected:
    """Queries, passages and qrels gathered from records, deduplicated by normalised text."""

    docs: dict[str, str] = field(default_factory=dict)  # id -> text, first spelling seen
    queries: dict[str, str] = field(default_factory=dict)
    positives: dict[str, list[str]] = field(default_factory=dict)  # query id -> doc ids
    negatives: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    warnings: Warnings = field(default_factory=Warnings)
    columns: tuple[str, str] | None = None  # pairs: the (query, positive) columns read

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def add_text(self, table: dict[str, str], prefix: str, text: str, doc_id: str | None = None) -> str:
        """The id of `text` in `table` (its own `doc_id`, else its normalised text's), added when
        new; another spelling of a text already there is counted as merged."""
        key = doc_id if doc_id is not None else text_id(prefix, text)
        if key not in table:
            table[key] = text
        elif doc_id is None and table[key] != text:
            self.count("duplicate_query_texts" if prefix == "q" else "duplicate_passage_texts")
        return key

    def doc(self, text: Any, where: str, what: str) -> str | None:
        """The id of passage `text` (added when new); None, counted and warned, when empty."""
        text = _text(text, where, what)
        if not text.strip():
            self.warnings.add(f"empty_{what}", where)
            return None
        return self.add_text(self.docs, "d", text)

    def link(self, table: dict[str, list[str]], qid: str, did: str) -> None:
        ids = table.setdefault(qid, [])
        if did in ids:
            self.count("duplicate_pairs" if table is self.positives else "duplicate_negatives")
        else:
            ids.append(did)


def _text(value: Any, where: str, what: str) -> str:
    if isinstance(value, dict) and "text" in value:  # NeMo's {"text": ...} documents
        value = value["text"]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def _texts(value: Any) -> list[Any]:
    """A cell holding one text or a list of them, as a list."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


# ---------------------------------------------------------------- records from anywhere


def is_hf(path: str) -> bool:
    return path.startswith("hf:") or (storage.exists(path) and any(
        storage.exists(storage.join(path, m)) for m in HF_MARKERS))


def iter_rows(path: str) -> Iterator[Row]:
    """Records of a JSONL / Parquet / CSV file or a Hugging Face dataset, each with its place."""
    if is_hf(path):
        yield from _hf_rows(path)
    elif path.endswith(".parquet"):
        table = _read_table(path, pq.read_table)
        yield from ((f"{storage.redact(path)}:row {i}", r) for i, r in enumerate(table.to_pylist(), 1))
    elif path.endswith(".csv"):
        table = _read_table(path, pacsv.read_csv)
        # line 1 is the header
        yield from ((f"{storage.redact(path)}:{i}", r) for i, r in enumerate(table.to_pylist(), 2))
    else:
        for lineno, obj in iter_jsonl(path):
            yield f"{storage.redact(path)}:{lineno}", obj


def _read_table(path: str, reader: Any) -> pa.Table:
    if not storage.exists(path):
        raise DataError(f"{storage.redact(path)}: file not found")
    try:
        with storage.open_read(path) as f:
            table = reader(io.BytesIO(f.read()))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{storage.redact(path)}: not readable as {path.rsplit('.', 1)[-1]}: {e}") from e
    if table.num_rows == 0:
        raise DataError(f"{storage.redact(path)}: empty file (no rows)")
    return table


def _hf_rows(path: str) -> Iterator[Row]:
    """A `save_to_disk` folder (offline) or `hf:NAME[:SPLIT]` through `datasets`."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path}: reading a Hugging Face dataset needs `pip install datasets`") from e
    if path.startswith("hf:"):
        name, _, split = path[3:].partition(":")
        try:
            ds: Any = datasets.load_dataset(name, split=split or "train")
        except Exception as e:  # network, unknown name or split: the user's message, with the name
            raise DataError(f"{path}: datasets.load_dataset({name!r}, split={split or 'train'!r}) "
                            f"failed: {type(e).__name__}: {e}") from e
    else:
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise DataError(f"{path}: a DatasetDict with splits {list(ds)} and no `train`; "
                                "point data.path at the split's own folder (<folder>/<split>)")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if len(ds) == 0:
        raise DataError(f"{path}: empty dataset (no rows)")
    for i, row in enumerate(ds, 1):
        yield f"{storage.redact(path)}[row {i}]", row


def _column(row: dict[str, Any], where: str, configured: str | None, candidates: Iterable[str],
            key: str) -> str:
    if configured is not None:
        if configured not in row:
            raise DataError(f"{where}: no column {configured!r} ({key}); has {sorted(row)}")
        return configured
    for name in candidates:
        if name in row:
            return name
    raise DataError(f"{where}: none of the columns {list(candidates)} found (has {sorted(row)}); "
                    f"name yours with {key}")


# ---------------------------------------------------------------- the three formats


def read_pairs(cfg: DataConfig, out: Collected) -> None:
    qcol = pcol = None
    for where, row in iter_rows(cfg.path):
        if qcol is None:  # decided on the first row: every row has the same columns
            qcol = _column(row, where, cfg.query_column, QUERY_COLUMNS, "data.query_column")
            pcol = _column(row, where, cfg.positive_column, POSITIVE_COLUMNS, "data.positive_column")
            out.columns = (qcol, pcol)
        assert pcol is not None
        _add_example(out, row.get(qcol), _texts(row.get(pcol)), [], where)


def read_flagembedding(cfg: DataConfig, out: Collected) -> None:
    for where, row in iter_rows(cfg.path):
        query = row.get("query", row.get("question"))
        if "query" not in row and "question" not in row:
            raise DataError(f"{where}: missing 'query'")
        pos = row.get("pos", row.get("pos_doc"))
        if pos is None:
            raise DataError(f"{where}: missing 'pos' (the query's positive passages)")
        _add_example(out, query, _texts(pos), _texts(row.get("neg", row.get("neg_doc"))), where)


def _add_example(out: Collected, query: Any, positives: list[Any], negatives: list[Any],
                 where: str) -> None:
    out.count("records")
    query = _text(query, where, "query")
    if not query.strip():
        out.warnings.add("empty_query", where)
        out.count("records_skipped")
        return
    pos_ids = [d for p in positives if (d := out.doc(p, where, "positive")) is not None]
    if not pos_ids:
        out.warnings.add("no_positive", where)
        out.count("records_skipped")
        return
    qid = out.add_text(out.queries, "q", query)
    for d in pos_ids:
        out.link(out.positives, qid, d)
    for n in negatives:
        if (d := out.doc(n, where, "negative")) is not None:
            out.link(out.negatives, qid, d)


def read_nemo(cfg: DataConfig, out: Collected) -> None:
    """NeMo AutoModel's corpus-ID JSON: corpora by folder, examples referencing doc ids."""
    url = cfg.path
    try:
        doc = json.loads(storage.read_text(url))
    except json.JSONDecodeError as e:
        raise DataError(f"{storage.redact(url)}:{e.lineno}: malformed JSON: {e.msg}") from e
    if not isinstance(doc, dict) or "corpus" not in doc or "data" not in doc:
        raise DataError(f"{storage.redact(url)}: expected an object with 'corpus' and 'data' "
                        "(NeMo AutoModel's corpus-ID JSON)")
    ids: dict[str, dict[str, str]] = {}  # corpus id -> its doc id -> our id
    folders = nemo_corpus_folders(url, doc)
    for folder in folders:
        cid, rows = _nemo_corpus(folder)
        ids[cid] = {}
        for where, did, text in rows:
            if did in ids[cid]:
                raise DataError(f"{where}: duplicate id {did!r} in corpus {cid!r}")
            if not text.strip():
                out.warnings.add("empty_passage", where)  # kept, as BEIR keeps them
            # several corpora may reuse ids: theirs are kept apart by the corpus id
            ids[cid][did] = f"{cid}/{did}" if len(folders) > 1 else did
            out.add_text(out.docs, "d", text, doc_id=ids[cid][did])
    for i, item in enumerate(doc["data"]):
        where = f"{storage.redact(url)}: data[{i}]"
        missing = [k for k in ("question", "corpus_id", "pos_doc") if k not in item]
        if missing:
            raise DataError(f"{where}: missing {missing}")
        if item["corpus_id"] not in ids:
            raise DataError(f"{where}: corpus_id {item['corpus_id']!r} is not among the corpora "
                            f"{sorted(ids)}")
        known, cid = ids[item["corpus_id"]], item["corpus_id"]
        pos = _nemo_refs(item["pos_doc"], known, f"{where}: pos_doc", cid)
        neg = _nemo_refs(item.get("neg_doc"), known, f"{where}: neg_doc", cid)
        out.count("records")
        query = _text(item["question"], where, "question")
        if not query.strip() or not pos:
            out.warnings.add("empty_query" if not query.strip() else "no_positive", where)
            out.count("records_skipped")
            continue
        qid = str(item.get("question_id") or text_id("q", query))
        out.add_text(out.queries, "q", query, doc_id=qid)
        for d in pos:
            out.link(out.positives, qid, d)
        for d in neg:
            out.link(out.negatives, qid, d)


def _nemo_refs(refs: Any, known: dict[str, str], where: str, corpus_id: str) -> list[str]:
    """Our ids of NeMo document references (`{"id": ...}` or a bare id)."""
    out = []
    for ref in _texts(refs):
        did = str(ref["id"]) if isinstance(ref, dict) and "id" in ref else str(ref)
        if did not in known:
            raise DataError(f"{where}: id {did!r} is not in corpus {corpus_id!r}")
        out.append(known[did])
    return out


def nemo_corpus_folders(url: str, doc: dict[str, Any]) -> list[str]:
    """The corpus folders a NeMo corpus-ID JSON names, relative paths taken from its folder."""
    corpora = doc["corpus"] if isinstance(doc["corpus"], list) else [doc["corpus"]]
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    folders = []
    for i, c in enumerate(corpora):
        path = c.get("path") if isinstance(c, dict) else None
        if not isinstance(path, str):
            raise DataError(f"{storage.redact(url)}: corpus[{i}] has no 'path'")
        folders.append(path if path.startswith("/") or "://" in path else storage.join(base, path))
    return folders


def _nemo_corpus(folder: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(corpus id, [(where, doc id, text)]) of one NeMo corpus folder."""
    meta_url = storage.join(folder, "merlin_metadata.json")
    if not storage.exists(meta_url):
        raise DataError(f"{storage.redact(folder)}: no merlin_metadata.json (NeMo corpus folder)")
    meta = json.loads(storage.read_text(meta_url))
    files = [storage.join(folder, n) for n in storage.listdir(folder)
             if n.endswith(TABLE_SUFFIXES) and n != "merlin_metadata.json"]
    if not files:
        raise DataError(f"{storage.redact(folder)}: no corpus file (.parquet, .jsonl, .csv)")
    docs = []
    for f in sorted(files):
        for where, row in iter_rows(f):
            if "id" not in row or "text" not in row:
                raise DataError(f"{where}: a NeMo corpus row needs 'id' and 'text'")
            docs.append((where, str(row["id"]), _text(row["text"], where, "text")))
    return str(meta.get("corpus_id", folder.rsplit("/", 1)[-1])), docs


def read_corpus(url: str, column: str, out: Collected) -> None:
    """`data.corpus`: more passages to search in, from any table `iter_rows` reads."""
    for where, row in iter_rows(url):
        if column not in row:
            raise DataError(f"{where}: no column {column!r} (data.corpus_column); has {sorted(row)}")
        out.count("corpus_rows")
        out.doc(row[column], where, "corpus_text")


# ---------------------------------------------------------------- detection and the tables


def detect(path: str) -> str:
    """The format of `path` (data.format=auto)."""
    if path.startswith("beir:"):
        return "beir"
    if is_hf(path):
        return "pairs"
    if not storage.exists(path):
        raise DataError(f"{storage.redact(path)}: not found (data.path)")
    lower = path.lower()
    if lower.endswith(".json") and _is_nemo_json(path):
        return "nemo"
    if lower.endswith((".jsonl", ".jsonl.gz", ".json")):
        for _, first in iter_jsonl(path):
            if "pos_doc" in first or ("pos" in first and "neg" in first):
                return "flagembedding"
            return "pairs"
    if lower.endswith((".parquet", ".csv")):
        return "pairs"
    if not lower.endswith((*TABLE_SUFFIXES, ".gz")):
        return "beir"  # a folder: `data.load` says what a BEIR folder lacks, if anything
    raise DataError(f"{storage.redact(path)}: cannot tell the format of this file; set data.format")


def _is_nemo_json(path: str) -> bool:
    try:
        doc = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # JSON lines under a .json name, or not JSON: read as records
    return isinstance(doc, dict) and "corpus" in doc and "data" in doc


READERS = {"pairs": read_pairs, "flagembedding": read_flagembedding, "nemo": read_nemo}


@dataclass
class Tables:
    """What the data stage writes for a non-BEIR source."""

    corpus: pa.Table
    queries: pa.Table
    qrels: dict[str, pa.Table]
    negatives: pa.Table  # query_id, doc_ids: the file's own negatives
    summary: dict[str, Any]
    warnings: Warnings


def load(cfg: DataConfig, fmt: str) -> Tables:
    """Read `cfg.path` in format `fmt` (and `cfg.corpus`) into BEIR tables with a test split."""
    out = Collected()
    READERS[fmt](cfg, out)
    if cfg.corpus:
        read_corpus(cfg.corpus, cfg.corpus_column, out)
    if not out.positives:
        raise DataError(f"{storage.redact(cfg.path)}: no usable (query, positive) example "
                        f"({out.counts.get('records', 0)} records read, all skipped)")
    pairs = [(q, d) for q, ds in out.positives.items() for d in ds]
    qrels = pa.table({"query_id": [q for q, _ in pairs], "doc_id": [d for _, d in pairs],
                      "score": pa.array([1] * len(pairs), pa.int32())}, schema=schemas.QRELS)
    n = len(out.positives)
    # at least one test query when asked for, and never every query
    n_test = min(max(1, round(n * cfg.test_fraction)), n - 1) if cfg.test_fraction > 0 else 0
    if cfg.test_fraction > 0 and n_test == 0:
        log.warning("%s: one query only: no test split held out (data.test_fraction)",
                    storage.redact(cfg.path))
    train, test = split_queries(qrels, n_test, cfg.seed + 1)  # not the dev hold-out's draw
    splits = {"train": train, **({"test": test} if n_test else {})}
    corpus = pa.table({"id": list(out.docs), "title": [""] * len(out.docs),
                       "text": list(out.docs.values())}, schema=schemas.CORPUS)
    queries = pa.table({"id": list(out.queries), "text": list(out.queries.values())},
                       schema=schemas.QUERIES)
    negatives = pa.table({"query_id": list(out.negatives), "doc_ids": list(out.negatives.values())},
                         schema=NEGATIVES)
    summary = {"format": fmt, **out.counts, "queries": queries.num_rows,
               "passages": corpus.num_rows, "positives": len(pairs),
               "positives_per_query": round(len(pairs) / max(1, len(out.positives)), 2),
               "file_negatives": sum(len(v) for v in out.negatives.values()),
               **({"columns": list(out.columns)} if out.columns else {})}
    for kind, times in out.warnings.counts.items():
        log.warning("%s: %d skipped (first at %s)", kind, times, out.warnings.examples[kind])
    return Tables(corpus, queries, splits, negatives, summary, out.warnings)


NEGATIVES = pa.schema([("query_id", pa.string()), ("doc_ids", pa.list_(pa.string()))])


def input_fingerprints(cfg: DataConfig) -> dict[str, str]:
    """Every input the data stage reads, by the config key that names it, with its content
    fingerprint (`storage.fingerprint`): the data stage's key holds them, so an input edited in
    place is read again, and every stage after it follows. `hf:` names stand for themselves:
    the Hub's revision is `datasets`' to track."""
    out: dict[str, str] = {}
    path = cfg.path if cfg.path.startswith("hf:") else resolve(cfg.path)
    out["data.path"] = path[3:] if path.startswith("hf:") else _fingerprint(path, "data.path")
    if path.lower().endswith(".json") and storage.exists(path) and _is_nemo_json(path):
        doc = json.loads(storage.read_text(path))
        for i, folder in enumerate(nemo_corpus_folders(path, doc)):
            out[f"data.path corpus[{i}]"] = _fingerprint(folder, f"data.path corpus[{i}]")
    if cfg.corpus:
        out["data.corpus"] = cfg.corpus[3:] if cfg.corpus.startswith("hf:") else \
            _fingerprint(cfg.corpus, "data.corpus")
    return out


def _fingerprint(url: str, key: str) -> str:
    try:
        return storage.fingerprint(url)
    except FileNotFoundError as e:
        raise DataError(f"{storage.redact(url)}: not found ({key})") from e
