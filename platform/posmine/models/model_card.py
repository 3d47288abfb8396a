"""The model card: `README.md` in an exported model folder, in sentence-transformers' style, so
the folder is ready for `huggingface-cli upload`. It says what the model was trained from, on
what, with which mining rule and what it did, how it trained, how well it scores when `posmine
run` evaluated it, and the config that reproduces it.

The card is left out of the model's fingerprint (`backbone.model_fingerprint`): writing it never
makes the model's embeddings stale.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from posmine.config import MODEL_DEFAULT, Config, dump_yaml
from posmine.core.mining import describe_auto, describe_rule
from posmine.io import storage
from posmine.models.backbone import MODEL_CARD as CARD

DEFAULT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what `default` packages


def _base(model: str) -> str:
    return DEFAULT_HUB_ID if model == MODEL_DEFAULT else model


def _front_matter(base: str, rule: str) -> str:
    base_line = "" if base.startswith(("/", ".", "s3://", "gs://")) else f"base_model: {base}\n"
    return ("---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\n"
            f"{base_line}tags:\n- sentence-transformers\n- feature-extraction\n- posmine\n"
            f"- hard-negative-mining\n- {rule}\n---\n")


def _number(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _metrics_table(summary: Mapping[str, Any]) -> str:
    base, tuned = summary["base"], summary["fine_tuned"]
    rows = [f"| {m} | {base[m]:.4f} | {tuned[m]:.4f} | {tuned[m] - base[m]:+.4f} |"
            for m in sorted(tuned) if m in base]
    return "\n".join([f"On the `{summary.get('split')}` split:", "",
                      "| metric | base | fine-tuned | delta |", "|---|---|---|---|", *rows])


def card_text(cfg: Config, data: Mapping[str, Any], mine: Mapping[str, Any],
              train: Mapping[str, Any], summary: Mapping[str, Any] | None = None) -> str:
    """The card's Markdown from the resolved config, the data, mine and train manifests and the
    run's summary (when it was evaluated)."""
    t, m, stats = train.get("train", {}), mine.get("mining", {}), mine.get("stats", {})
    base, rows = _base(str(t.get("model"))), data.get("rows", {})
    path = f"`{storage.redact(cfg.data.path)}`"
    parts = [
        _front_matter(base, str(m.get("rule"))),
        f"# Fine-tuned from {base} with posmine\n",
        f"This embedding model was fine-tuned from `{base}` with contrastive learning on hard "
        "negatives mined by posmine: positive-aware "
        "mining (NV-Retriever, 2024), which drops candidates scored too close to the "
        "query's positive by the teacher, as likely unlabelled positives.\n",
        "## Training data\n",
        f"{path}: {rows.get('corpus', '?')} passages, {rows.get('queries', '?')} queries, "
        f"{rows.get('qrels_' + str(mine.get('split', 'train')), '?')} judged pairs in the "
        f"`{mine.get('split', 'train')}` split.\n",
        "## Mining\n",
        f"Rule `{describe_rule(m)}`, anchored per `{m.get('anchor')}`, window `{m.get('window')}`: "
        f"{stats.get('examples', '?')} examples of {stats.get('queries_in', '?')} queries, "
        f"{stats.get('negatives_kept', '?')} hard negatives kept ({m.get('num_negatives')} per "
        f"example), {stats.get('examples_too_few', 0)} examples short of negatives; "
        f"{stats.get('dropped_by_rule', '?')} times a candidate was passed over as too close to "
        "the positive (counted once per example whose window it was in)."
        + (f" {describe_auto(mine['auto'])}." if mine.get("auto") else "") + "\n",
        "## Training\n",
        f"{train.get('rows', {}).get('steps', '?')} steps of batch {t.get('batch_size')} "
        f"(lr {t.get('lr')}, temperature {t.get('temperature')}, in-batch negatives "
        f"{'on' if t.get('in_batch_negatives') else 'off'}, {t.get('num_negatives')} hard negatives "
        f"per example), final loss {_number(train.get('stats', {}).get('final_loss'))}.\n",
    ]
    if summary is not None:
        parts += ["## Evaluation\n", _metrics_table(summary) + "\n"]
    parts += ["## Use\n", "```python\nfrom sentence_transformers import SentenceTransformer\n\n"
              "model = SentenceTransformer(\"path/or/hub-id\")\n"
              "embeddings = model.encode([\"a query\", \"a passage\"])\n```\n",
              "## Reproduce\n", "Save the config below as `config.yaml` and run "
              "`posmine run config.yaml`:\n", f"```yaml\n{dump_yaml(cfg)}```\n"]
    return "\n".join(parts)


def write_card(model_dir: str, text: str) -> str:
    """Write the card into `model_dir`; returns its URL."""
    url = storage.join(model_dir, CARD)
    storage.write_bytes(url, text.encode())
    return url
