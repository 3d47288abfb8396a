"""posmine from Python: `mine_hard_negatives` (a drop-in for sentence-transformers'), `run`.

Both run the same stages as the CLI, with the same caching and resume: a second call with the
same data, model and settings answers from the stages' manifests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

import posmine.pipeline as pipeline
from posmine.config import Config, ConfigError, MiningConfig, load_config
from posmine.io import export, lease, storage
from posmine.models.backbone import ModelError, resolve_model

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("triplet", "n-tuple", "n-tuple-scores", "labeled-pair", "labeled-list")


def cache_root() -> Path:
    """Where `mine_hard_negatives` keeps its stages by default: `$POSMINE_CACHE/mine`."""
    return Path(os.environ.get("POSMINE_CACHE", Path.home() / ".cache" / "posmine")) / "mine"


def mine_hard_negatives(
    dataset: Dataset,
    model: Any = "default",
    anchor_column_name: str | None = None,
    positive_column_name: str | None = None,
    corpus: Sequence[str] | None = None,
    cross_encoder: Any = None,
    range_min: int = 0,
    range_max: int | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    num_negatives: int = 3,
    sampling_strategy: Literal["random", "top"] = "top",
    query_prompt_name: str | None = None,
    query_prompt: str | None = None,
    corpus_prompt_name: str | None = None,
    corpus_prompt: str | None = None,
    include_positives: bool = False,
    output_format: str = "triplet",
    output_scores: bool = False,
    batch_size: int = 32,
    faiss_batch_size: int = 16384,
    use_faiss: bool = False,
    use_multi_process: list[str] | bool = False,
    verbose: bool = True,
    cache_folder: str | None = None,
    as_triplets: bool | None = None,
    margin: float | None = None,
    *,
    rule: str | None = None,
    output_dir: str | None = None,
    **mining: Any,
) -> Dataset:
    """Add positive-aware hard negatives to (anchor, positive) pairs; returns a `datasets.Dataset`.

    A drop-in for `sentence_transformers.util.mine_hard_negatives`: the same parameters with the
    same meaning, the same output formats, columns and errors. Import it from `posmine` instead
    of `sentence_transformers.util`, and the same call (`mine_hard_negatives(dataset, model,
    relative_margin=0.05, num_negatives=4, output_format="n-tuple")`) mines with NV-Retriever's
    rules, anchored per pair, with known positives kept out.

    The margins are the paper's rules: `relative_margin=r` is TopK-PercPos with `perc = 1 - r`
    (keep `s < s+ - |s+| r`), `absolute_margin=m` TopK-MarginPos (`s < s+ - m`), `max_score`
    alone TopK-Abs; with a margin, `max_score` and `min_score` bound it as well. `range_max` is the
    window (`mining.top_k`) and `range_min` passes over its first survivors.

    Where posmine differs on purpose:

    - **No margin given**: posmine mines with TopK-PercPos at 95% (the paper's best rule), not the
      plain top-k. `rule="naive_topk"` gives sentence-transformers' behaviour.
    - **The anchor `s+`** is each pair's own positive (`anchor="pair"`), not the query's weakest
      positive; `anchor="min"` is sentence-transformers' choice.
    - **The window** holds the first `range_max` candidates that pass the rule, searched as deep
      as needed (`window="survivors"`), so a weak positive still gets negatives from just below
      it; `window="rank"` cuts the list at `range_max` first, as sentence-transformers does.
    - **Texts equal to a positive after normalisation** (case, punctuation, spaces) are never
      negatives (`dedup_text="normalized"`), and queries written the same way share positives.
    - `labeled-pair` lists, per query, its positives and then the negatives mined against its
      weakest positive, as sentence-transformers lists one negative set per query.
    - `include_positives=True` (reranking sets with positives among the candidates) is refused:
      posmine keeps labelled positives out of every negative list.
    - Search is always exact FAISS (`use_faiss` and `faiss_batch_size` set only the query batch);
      `use_multi_process=True` embeds on Ray actors (`teacher.num_actors`, one per CPU or GPU).

    Args:
        dataset: a `datasets.Dataset` of (anchor, positive) pairs; a query on several rows has
            several positives.
        model: a `SentenceTransformer`, a model folder, a Hugging Face id or `"default"` (the
            packaged all-MiniLM-L6-v2). Its pooling, prompts, normalisation and maximum length
            are read from its sentence-transformers configuration.
        cross_encoder: a `CrossEncoder` or a sequence-classification model folder that rescores
            the candidates and positives before the rule.
        cache_folder: where the stages keep their files (default `$POSMINE_CACHE/mine`, else
            `~/.cache/posmine/mine`); one folder per dataset, reused by a second call.
        rule: one of posmine's rules (`naive_topk`, `topk_shifted`, `topk_abs`, `topk_marginpos`,
            `topk_percpos`), instead of deriving it from the margins.
        output_dir: the stages' folder itself (a local path or an fsspec URL such as `s3://...`).
        **mining: any `mining` config key: `anchor`, `window`, `perc`, `dedup_text`,
            `sample_from`, `seed`, ... (see the configuration reference).

    The other arguments are sentence-transformers'.

    Raises:
        ValueError: an empty dataset, fewer than two columns, a bad `output_format`, or a window
            (`range_min`, `range_max`, `num_negatives`) with no room for the negatives.
    """
    try:
        from datasets import Dataset
    except ImportError as e:  # pragma: no cover - the hf and test extras carry it
        raise ImportError("mine_hard_negatives reads and returns a datasets.Dataset: "
                          "pip install 'posmine[hf]'") from e

    if len(dataset) == 0:
        raise ValueError("The dataset is empty. Please provide a non-empty dataset.")
    anchor_col, positive_col = _columns(dataset, anchor_column_name, positive_column_name)
    if as_triplets is not None:
        output_format = "triplet" if as_triplets else "n-tuple"
    if output_format == "n-tuple-scores":
        output_format, output_scores = "n-tuple", True
    if margin is not None:
        absolute_margin = margin
    top_k = _check(output_format, include_positives, num_negatives, range_min, range_max,
                   faiss_batch_size)
    pairs = dataset.select_columns([anchor_col, positive_col]).data.table  # (rows, 2)
    pairs = pairs.rename_columns(["query", "positive"]).combine_chunks()
    root = Path(cache_folder) if cache_folder else cache_root()
    out = output_dir or str(root / _content_key(pairs, corpus))
    inputs = _write_inputs(out, pairs, corpus)
    teacher = {**_model_settings(_model_path(model, root), query_prompt, query_prompt_name,
                                 corpus_prompt, corpus_prompt_name),
               **_placement(use_multi_process), "batch_size": batch_size, "normalize": True}
    rules = _rule(rule, relative_margin, absolute_margin, max_score, min_score)
    sampling = ({"sampling": "sample", "sample_from": top_k - range_min}
                if sampling_strategy == "random" else {"sampling": "topk"})
    mining_keys = {**rules, **sampling, "num_negatives": num_negatives, "top_k": top_k,
                   "range_min": range_min, "too_few": "keep", **mining}
    if cross_encoder is not None:
        mining_keys["cross_encoder"] = _model_path(cross_encoder, root)
    cfg = _config(inputs, teacher, mining_keys, out, faiss_batch_size)
    mined = _mine(cfg, verbose)
    table = _shape(_in_input_order(mined, pairs), output_format, output_scores, num_negatives)
    names = {"anchor": anchor_col, "positive": positive_col}
    return Dataset(table.rename_columns([names.get(c, c) for c in table.column_names]))


def _placement(use_multi_process: bool | list[str]) -> dict[str, int]:
    """Where the teacher embeds: an actor pool on Ray with `use_multi_process`, as
    sentence-transformers' process pool, else in this process, with no Ray to start for it."""
    if not use_multi_process:
        return {"local_corpus_below": 10**12, "local_queries_below": 10**12}
    actors = (len(use_multi_process) if isinstance(use_multi_process, list)
              else max(1, (os.cpu_count() or 1) // 2))
    return {"num_actors": actors, "local_corpus_below": 0, "local_queries_below": 0}


def _check(output_format: str, include_positives: bool, num_negatives: int, range_min: int,
           range_max: int | None, faiss_batch_size: int) -> int:
    """sentence-transformers' refusals, in its words; returns the window (`mining.top_k`)."""
    if faiss_batch_size <= 0:
        raise ValueError(f"faiss_batch_size must be a positive integer, got {faiss_batch_size}.")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"Invalid output_format: {output_format}. Must be one of 'triplet', "
                         "'n-tuple', 'labeled-pair', or 'labeled-list'.")
    if include_positives:
        raise ValueError("include_positives=True puts labelled positives among the candidates; "
                         "posmine keeps them out of every negative list by design")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got num_negatives={num_negatives}.")
    if range_min < 0:
        raise ValueError(f"range_min must be non-negative, got range_min={range_min}.")
    # sentence-transformers derives range_max from num_negatives; posmine's window defaults to
    # mining.top_k (30), searched deeper where the rule leaves it short
    top_k = range_max if range_max is not None else max(MiningConfig().top_k, range_min + num_negatives)
    if range_min >= top_k:
        raise ValueError(f"range_min must be smaller than range_max, got range_min={range_min} "
                         f"and range_max={top_k}.")
    if num_negatives > top_k - range_min:
        raise ValueError(f"Cannot mine {num_negatives} negatives per query: only "
                         f"{top_k - range_min} candidates remain after skipping the first "
                         f"range_min={range_min} of range_max={top_k}.")
    return top_k


def _config(inputs: Mapping[str, str], teacher: Mapping[str, Any], mining: Mapping[str, Any],
            out: str, query_batch: int) -> Config:
    """The config that `mine_hard_negatives` runs: every query mined (no held-out split)."""
    sections = {"data": {**inputs, "format": "pairs", "query_column": "query",
                         "positive_column": "positive", "test_fraction": 0.0},
                "teacher": dict(teacher), "mining": dict(mining), "output": {"dir": out},
                "index": {"query_batch_size": query_batch}}
    try:
        return load_config(None, sections=sections)
    except ConfigError as e:
        raise ValueError(str(e)) from e


def _columns(dataset: Dataset, anchor: str | None, positive: str | None) -> tuple[str, str]:
    """The anchor and positive columns: the named ones, else the first and the second."""
    columns = list(dataset.column_names)
    anchor = anchor if anchor in columns else columns[0]
    if positive not in columns:
        if len(columns) < 2:
            raise ValueError("Dataset must contain at least two columns to select the positive "
                             "column automatically.")
        positive = columns[1]
    return str(anchor), str(positive)


def _content_key(pairs: pa.Table, corpus: Sequence[str] | None) -> str:
    """A folder name per dataset: the sha256 of its pairs and corpus."""
    h = hashlib.sha256()
    for col in pairs.columns:
        for chunk in col.chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(buf)
    for text in corpus or ():
        h.update(str(text).encode() + b"\0")
    return h.hexdigest()[:16]


def _write_inputs(out: str, pairs: pa.Table, corpus: Sequence[str] | None) -> dict[str, str]:
    """The pairs (and corpus) as Parquet under `<out>/inputs`: the data stage reads them, and
    keys itself by their content, so a changed dataset is read again."""
    urls = {"path": storage.join(out, "inputs", "pairs.parquet")}
    tables = {"path": pairs}
    if corpus is not None:
        urls["corpus"] = storage.join(out, "inputs", "corpus.parquet")
        tables["corpus"] = pa.table({"text": pa.array([str(t) for t in corpus], pa.string())})
    for key, table in tables.items():
        buf = io.BytesIO()
        pq.write_table(table, buf)
        if not storage.exists(urls[key]) or storage.read_bytes(urls[key]) != buf.getvalue():
            storage.write_bytes(urls[key], buf.getvalue())
    return urls


def _model_path(model: Any, root: Path) -> str:
    """A model name or folder as given; a `SentenceTransformer` or `CrossEncoder` object saved
    once per content under `<root>/models/<hash of its weights and settings>` (the embed stage
    loads folders), so a model changed in place, by training, is saved and embedded again."""
    if isinstance(model, str | os.PathLike):
        return os.fspath(model)
    if not hasattr(model, "save") or not hasattr(model, "state_dict"):
        raise TypeError(f"model must be a SentenceTransformer, a CrossEncoder, a folder or a "
                        f"model id, got {type(model).__name__}")
    final = root / "models" / _object_key(model)
    if not final.exists():
        tmp = root / "models" / f".saving-{uuid.uuid4().hex}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save(str(tmp))
        tmp.rename(final)
    return str(final)


def _object_key(model: Any) -> str:
    """sha256 of a model object's weights, its modules' settings (repr) and prompts."""
    import torch

    h = hashlib.sha256(f"{model!r}\n{getattr(model, 'prompts', None)!r}".encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _model_settings(model: str, query_prompt: str | None, query_prompt_name: str | None,
                    corpus_prompt: str | None, corpus_prompt_name: str | None) -> dict[str, Any]:
    """`teacher` keys that embed as the sentence-transformers model at `model` does: its
    pooling, whether the prompt is pooled, its maximum length and the prompts it would use."""
    folder = Path(resolve_model(model))
    out: dict[str, Any] = {"model": model}
    settings = _read_json(folder / "config_sentence_transformers.json")
    prompts = settings.get("prompts") or {}
    default = prompts.get(settings.get("default_prompt_name") or "", "")

    def prompt(given: str | None, name: str | None, names: Sequence[str]) -> str:
        if given is not None:
            return given
        if name is not None:
            if name not in prompts:
                raise ValueError(f"Prompt name '{name}' not found in the model's prompts "
                                 f"({sorted(prompts)})")
            return str(prompts[name])
        return str(next((prompts[n] for n in names if n in prompts), default))

    out["query_prefix"] = prompt(query_prompt, query_prompt_name, ["query"])
    out["passage_prefix"] = prompt(corpus_prompt, corpus_prompt_name, ["document", "passage", "corpus"])
    for module in _read_json(folder / "modules.json", []):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            out.update(_pooling(folder / module["path"] / "config.json"))
        elif kind not in ("Transformer", "Normalize"):
            raise ModelError(f"model {model!r}: module {module.get('type')} is not one posmine embeds "
                             "with (Transformer, Pooling, Normalize)")
    length = _read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if length:
        out["max_length"] = int(length)
    return out


def _pooling(path: Path) -> dict[str, Any]:
    """The pooling of a sentence-transformers Pooling config: `pooling_mode` (v6 and later) or
    one `pooling_mode_*` flag (earlier versions)."""
    cfg = _read_json(path)
    names = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
    if isinstance(cfg.get("pooling_mode"), str):
        chosen = [str(cfg["pooling_mode"])]
    else:
        chosen = [k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
                  for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    if len(chosen) != 1 or chosen[0] not in names:
        raise ModelError(f"{path}: pooling {chosen} is not one posmine embeds with "
                         "(one of mean, cls, lasttoken)")
    return {"pooling": names[chosen[0]], "pool_prefix": bool(cfg.get("include_prompt", True))}


def _read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else (
        {} if default is None else default)


def _rule(rule: str | None, relative: float | None, absolute: float | None,
          max_score: float | None, min_score: float | None) -> dict[str, Any]:
    """posmine's rule for sentence-transformers' margins: relative -> TopK-PercPos,
    absolute -> TopK-MarginPos, max_score alone -> TopK-Abs; the scores bound any rule. A rule
    given by name takes the margins as its parameters."""
    params: dict[str, Any] = {}
    if relative is not None:
        params["perc"] = 1.0 - relative
    if absolute is not None:
        params["margin"] = absolute
    if rule is None:
        if relative is not None and absolute is not None:
            raise ValueError("posmine applies one margin rule: give relative_margin or "
                             "absolute_margin, not both")
        rule = ("topk_percpos" if relative is not None else "topk_marginpos" if absolute is not None
                else "topk_abs" if max_score is not None else "topk_percpos")
    if rule == "topk_abs" and max_score is not None:  # the rule's own threshold
        params["threshold"], max_score = max_score, None
    return {"rule": rule, **params, "max_score": max_score, "min_score": min_score}


def _mine(cfg: Config, verbose: bool) -> pa.Table:
    level = logging.getLogger("posmine").level
    if not verbose:
        logging.getLogger("posmine").setLevel(logging.WARNING)
    try:
        with lease.hold(cfg.output.dir):
            manifest = pipeline.mine(cfg)
    finally:
        logging.getLogger("posmine").setLevel(level)
    if verbose:
        rows = manifest.get("rows", {})
        log.info("mined %s examples into %s", rows.get("examples", "?"), manifest["dir"])
    mined, _ = export.read_mined(str(manifest["dir"]))
    return mined


def _in_input_order(mined: pa.Table, pairs: pa.Table) -> pa.Table:
    """The mined rows in the order of their (anchor, positive) in the input, as
    sentence-transformers returns them; rows whose texts were merged with another spelling last."""
    first: dict[tuple[str, str], int] = {}
    for i, (q, p) in enumerate(zip(pairs.column("query").to_pylist(),
                                   pairs.column("positive").to_pylist(), strict=True)):
        first.setdefault((q, p), i)
    keys = [first.get((q, ps[0] if ps else ""), len(first))
            for q, ps in zip(mined.column("query").to_pylist(),
                             mined.column("positives").to_pylist(), strict=True)]
    order = sorted(range(mined.num_rows), key=keys.__getitem__)
    return mined.take(pa.array(order, pa.int64()))


def _shape(mined: pa.Table, fmt: str, scores: bool, k: int) -> pa.Table:
    """The mined rows in sentence-transformers' `output_format` (columns `anchor`, `positive`)."""
    if fmt == "triplet":
        return export.st_triplet(mined, scores)[0]
    if fmt == "n-tuple":
        return export.st_n_tuple(mined, k, scores)[0]
    if fmt == "labeled-pair":
        return export.st_labeled_pair(mined, scores)[0]
    return export.st_labeled_list(mined, scores)[0]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What `run` did: where its outputs are, what mining kept and how the model scored."""

    output_dir: str
    model_dir: str
    split: str  # the split the metrics were scored on
    base: dict[str, float]  # the student before fine-tuning
    fine_tuned: dict[str, float]
    mining: dict[str, Any]  # the mine stage's counts
    summary: dict[str, Any]  # summary.json as written


def run(config: str | os.PathLike[str] | Config | None = None, overrides: Sequence[str] = (),
        **sections: Mapping[str, Any]) -> RunResult:
    """The whole line, as `posmine run`: mine, fine-tune, evaluate base and fine-tuned.

    `config` is a YAML file, a `Config` or None (every default); overrides are `key.sub=value`
    strings, or sections as keywords: `run("cisi.yaml", train={"max_steps": 20})`.
    """
    if isinstance(config, Config):
        if overrides or sections:
            raise ValueError("give overrides with a YAML path, or change the Config with "
                             "dataclasses.replace")
        cfg = config
    else:
        cfg = load_config(config, overrides, sections=sections)
    with lease.hold(cfg.output.dir):
        summary = pipeline.run(cfg)
    mine_manifest = storage.read_manifest(storage.join(cfg.output.dir, pipeline.last_mine(cfg))) or {}
    stats = mine_manifest.get("stats", {})
    counts = {k: stats[k] for k in ("examples", "examples_out", "negatives_kept", "dropped_by_rule",
                                    "candidates") if k in stats}
    return RunResult(output_dir=cfg.output.dir, model_dir=str(summary["model_dir"]),
                     split=str(summary["split"]), base=dict(summary["base"]),
                     fine_tuned=dict(summary["fine_tuned"]), mining=counts, summary=summary)
