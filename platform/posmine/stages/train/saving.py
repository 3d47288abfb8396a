"""The exported student: safetensors, tokenizer and sentence-transformers' pooling and
normalise configs, loadable by `transformers.AutoModel` and `SentenceTransformer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posmine.config import TrainConfig
from posmine.models import backbone

# What an exported model folder must hold before the stage may say it is there.
MODEL_FILES = ("model/config.json", ("model/model.safetensors", "model/model.safetensors.index.json"),
               "model/tokenizer_config.json", "model/modules.json")


def model_files(cfg: TrainConfig) -> tuple[str | tuple[str, ...], ...]:
    """What an exported model folder must hold before the stage may say it is there."""
    if cfg.export_adapter:
        return ("model/adapter_config.json", "model/adapter_model.safetensors",
                "model/tokenizer_config.json", "model/modules.json")
    return MODEL_FILES


def export_model(model: Any, tokenizer: Any, directory: str, cfg: TrainConfig,
                 bidirectional: bool = False) -> None:
    d = Path(directory)
    model.save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    if bidirectional and not cfg.export_adapter:
        write_bidirectional_code(d, type(model).__name__)
    dim = backbone.hidden_size(model)
    (d / "1_Pooling").mkdir(exist_ok=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim, "pooling_mode_cls_token": cfg.pooling == "cls",
        "pooling_mode_mean_tokens": cfg.pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": cfg.pooling == "last", "include_prompt": cfg.pool_prefix},
        indent=2))
    (d / "2_Normalize").mkdir(exist_ok=True)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}], indent=2))
    (d / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": cfg.export_max_length, "do_lower_case": False}, indent=2))
    (d / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": cfg.query_prefix, "document": cfg.passage_prefix},
        "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2))


BIDIRECTIONAL_CODE = '''"""{base} without its causal mask, as posmine fine-tuned it (attention:
bidirectional). Written by posmine; load with trust_remote_code=True (transformers,
sentence-transformers)."""

import torch
from transformers import {base} as _Base
from transformers.masking_utils import create_bidirectional_mask


class BidirectionalModel(_Base):
    def __init__(self, config):
        super().__init__(config)
        for module in self.modules():  # flash attention reads the flag
            if getattr(module, "is_causal", False):
                module.is_causal = False

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        if attention_mask.ndim == 2:  # padding alone: every token sees every other
            stub = torch.empty(*attention_mask.shape, 1, dtype=self.dtype, device=attention_mask.device)
            full = create_bidirectional_mask(config=self.config, inputs_embeds=stub,
                                             attention_mask=attention_mask,
                                             allow_is_bidirectional_skip=False)
            if isinstance(full, torch.Tensor):
                attention_mask = full
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
'''


def write_bidirectional_code(d: Path, base: str) -> None:
    """A decoder trained bidirectionally is only that model with its mask removed: ship the few
    lines that remove it (`auto_map`, as NV-Embed and NeMo AutoModel's exports do), and mark the
    config so posmine's `attention=auto` removes it too."""
    (d / "modeling_posmine.py").write_text(BIDIRECTIONAL_CODE.format(base=base))
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_posmine.BidirectionalModel"}
    config[backbone.BIDIRECTIONAL_KEY] = True
    (d / "config.json").write_text(json.dumps(config, indent=2))
