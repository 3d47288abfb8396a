"""Decoder backbones (tiny random Llama, Mistral and Qwen2): bidirectional attention really is,
padding and the appended EOS change nothing, prefix tokens are left out of pooling, LoRA trains
the adapters alone, and both exports give the trained model's embeddings."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from posmine.config import LoraConfig, TeacherConfig, TrainConfig
from posmine.models import backbone
from posmine.models.backbone import ModelError
from posmine.models.encoder import Encoder
from posmine.stages.train.loop import train_plain
from posmine.stages.train.trainer import StudentTrainer
from tests.conftest import DECODERS
from tests.test_train import ROWS

TEXTS = ["cell protein gene cancer virus heart", "brain", "drug trial dose"]


def _load(path: str) -> tuple:
    from transformers import AutoTokenizer

    return backbone.load_model(path).eval(), backbone.prepare_tokenizer(AutoTokenizer.from_pretrained(path))


@pytest.mark.parametrize("family", DECODERS)
def test_bidirectional_attention_sees_later_tokens(tiny_decoders: dict[str, str], family: str) -> None:
    """Changing the last word changes no earlier token's state under the causal mask, and
    every earlier token's state once the mask is removed."""
    model, tok = _load(tiny_decoders[family])
    a = backbone.tokenize(tok, ["cell protein gene cancer"], 32)
    b = backbone.tokenize(tok, ["cell protein gene virus"], 32)
    ids_a, ids_b = a.input_ids[0].tolist(), b.input_ids[0].tolist()
    shared = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y)
    assert shared >= 3
    with torch.no_grad():
        causal = [backbone.forward_hidden(model, t, False)[0, :shared] for t in (a, b)]
        torch.testing.assert_close(causal[0], causal[1])
        backbone.make_bidirectional(model)
        both = [backbone.forward_hidden(model, t, True)[0, :shared] for t in (a, b)]
    assert (both[0] - both[1]).abs().amax(dim=-1).min() > 1e-4  # every earlier position moved


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_padding_changes_no_embedding(tiny_decoders: dict[str, str], family: str, pooling: str,
                                      attention: str) -> None:
    """A text embedded alone and beside longer ones (padded) gives the same vector."""
    enc = Encoder(TeacherConfig(model=tiny_decoders[family], pooling=pooling, attention=attention))
    together = enc.encode(TEXTS)
    alone = np.stack([enc.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_last_pooling_ends_every_text_with_eos(tiny_decoders: dict[str, str], family: str) -> None:
    _, tok = _load(tiny_decoders[family])
    long_text = " ".join(["cell"] * 50)
    t = backbone.tokenize(tok, [long_text, "brain"], 8, append_eos=True)
    assert t.input_ids.shape == (2, 8)  # truncated one token early to make room
    lengths = t.attention_mask.sum(1).tolist()
    assert [t.input_ids[i, n - 1].item() for i, n in enumerate(lengths)] == [tok.eos_token_id] * 2
    assert t.attention_mask[1, lengths[1]:].sum() == 0  # padded on the right


@pytest.mark.parametrize("family", [*DECODERS, "bert"])
def test_prefix_tokens_left_out_of_pooling(tiny_decoders: dict[str, str], tiny_model: str,
                                           family: str) -> None:
    """The pooled tokens spell the text without its prefix; the others, the prefix."""
    _, tok = _load(tiny_model if family == "bert" else tiny_decoders[family])
    prefix, texts = "query: ", ["cell protein gene", "brain"]
    t = backbone.tokenize(tok, [prefix + x for x in texts], 32, prefix_chars=len(prefix))
    for i, text in enumerate(texts):
        pooled = t.input_ids[i][t.pool_mask[i].bool()]
        left_out = t.input_ids[i][(t.attention_mask[i] - t.pool_mask[i]).bool()]
        assert tok.decode(pooled, skip_special_tokens=True).strip() == text
        # the tiny BERT has no ':' (an [UNK], a special token)
        assert tok.decode(left_out, skip_special_tokens=True).replace(" ", "") in ("query:", "query")


def test_pool_prefix_changes_mean_pooling_only(tiny_decoders: dict[str, str]) -> None:
    path = tiny_decoders["llama"]
    with_prefix = Encoder(TeacherConfig(model=path)).encode(["cell protein"], prefix="query: ")
    without = Encoder(TeacherConfig(model=path, pool_prefix=False)).encode(["cell protein"], prefix="query: ")
    assert not np.allclose(with_prefix, without, atol=1e-4)
    last = [Encoder(TeacherConfig(model=path, pooling="last", pool_prefix=p)).encode(["cell"], "query: ")
            for p in (True, False)]
    np.testing.assert_allclose(last[0], last[1], atol=1e-6)


def test_causal_attention_on_an_encoder_is_refused(tiny_model: str) -> None:
    with pytest.raises(ModelError, match="attention=causal on an encoder"):
        Encoder(TeacherConfig(model=tiny_model, attention="causal"))


LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))


def _lora_cfg(path: str, **kw: object) -> TrainConfig:
    return replace(TrainConfig(model=path, batch_size=3, num_negatives=3, lr=5e-2, warmup_ratio=0.0,
                               attention="bidirectional", lora=LORA), **kw)


def _student_view(cfg: TrainConfig, model: str) -> TeacherConfig:
    return TeacherConfig(model=model, pooling=cfg.pooling, attention=cfg.attention,
                         pool_prefix=cfg.pool_prefix, max_length=cfg.export_max_length)


def test_lora_trains_the_adapters_alone_and_both_exports_embed_alike(
        tiny_decoders: dict[str, str], tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    path = tiny_decoders["mistral"]
    cfg = _lora_cfg(path)
    before = {n: p.detach().clone() for n, p in backbone.load_model(path).named_parameters()}
    trainer = train_plain(cfg, ROWS, steps=2)
    moved = {n.replace("base_model.model.", "").replace(".base_layer", ""): not torch.equal(
        p.detach(), before[n.replace("base_model.model.", "").replace(".base_layer", "")])
        for n, p in trainer.model.named_parameters() if "lora_" not in n}
    assert moved and not any(moved.values())  # every base weight as it was
    lora = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora and all(p.abs().sum() > 0 for p in lora)  # B starts at zero: the adapters trained
    trainer.model.eval()
    want = Encoder.wrap(_student_view(cfg, path), trainer.model, trainer.tokenizer,
                        trainer.device).encode(TEXTS)

    adapter = tmp_path / "adapter"
    StudentTrainer.export(_with_cfg(trainer, replace(cfg, export_adapter=True)), str(adapter))
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
    np.testing.assert_allclose(Encoder(_student_view(cfg, str(adapter))).encode(TEXTS), want, atol=1e-5)

    merged = tmp_path / "merged"
    _with_cfg(trainer, cfg).export(str(merged))
    AutoModel.from_pretrained(merged)
    # attention=auto: the export says it was trained bidirectionally
    got = Encoder(replace(_student_view(cfg, str(merged)), attention="auto")).encode(TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-5)
    st = SentenceTransformer(str(merged), device="cpu", trust_remote_code=True)
    np.testing.assert_allclose(st.encode(TEXTS), want, atol=1e-5)
    causal = Encoder(replace(_student_view(cfg, str(merged)), attention="causal"))
    assert not np.allclose(causal.encode(TEXTS), want, atol=1e-4)  # the control: the mask matters


def _with_cfg(trainer: StudentTrainer, cfg: TrainConfig) -> StudentTrainer:
    trainer.cfg = cfg
    return trainer


def test_lora_checkpoint_round_trip(tiny_decoders: dict[str, str], tmp_path: Path) -> None:
    cfg = _lora_cfg(tiny_decoders["qwen2"])
    trainer = train_plain(cfg, ROWS, steps=1)
    trainer.save_state(str(tmp_path))
    fresh = StudentTrainer(cfg, 1, torch.device("cpu"))
    fresh.load_state(str(tmp_path))
    assert fresh.step_no == 1
    for name, p in fresh.trainable_state().items():
        torch.testing.assert_close(p, trainer.trainable_state()[name])
    full = StudentTrainer(replace(cfg, lora=None), 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="do not match the model's trainable ones"):
        full.load_state(str(tmp_path))


def test_lora_target_modules_that_do_not_exist(tiny_decoders: dict[str, str]) -> None:
    cfg = _lora_cfg(tiny_decoders["llama"], lora=replace(LORA, target_modules=("query_key_value",)))
    with pytest.raises(ValueError, match=r"train.lora.target_modules"):
        StudentTrainer(cfg, 1, torch.device("cpu"))


@pytest.mark.e2e  # a whole `posmine run` with a LoRA decoder
@pytest.mark.integration
def test_posmine_run_with_the_llm_recipe(ray_local: None, tiny_beir: Path,
                                         tiny_decoders: dict[str, str], tmp_path: Path) -> None:
    """`posmine run` end to end with NV-Retriever-v1's recipe in miniature: a decoder teacher
    (Qwen2, last-token pooling, causal), a decoder student (Mistral, bidirectional, mean pooling
    without its instruction prefix, LoRA), GradCache and two Ray Train workers sharding it with
    FSDP and gathering each other's in-batch negatives; a checkpoint every 2 steps."""
    from posmine import pipeline
    from posmine.config import load_config
    from posmine.io import storage

    out = str(tmp_path / "out")
    cfg = load_config(None, [
        f"data.path={tiny_beir}", f"teacher.model={tiny_decoders['qwen2']}", "teacher.pooling=last",
        "teacher.attention=causal", "teacher.cpus_per_actor=0.5", "teacher.torch_threads=1",
        "mining.top_k=10", "mining.num_negatives=3", f"train.model={tiny_decoders['mistral']}",
        "train.attention=bidirectional", "train.pool_prefix=false", "train.query_prefix='query: '",
        "train.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}",
        "train.grad_cache_chunk=3", "train.num_workers=2", "train.gather_across_workers=true",
        "train.strategy=fsdp",
        "train.cpus_per_worker=0.5", "train.batch_size=2", "train.num_negatives=3", "train.lr=1e-2",
        "train.checkpoint_every=2", "train.log_every=1", "evaluate.k_values=[10]",
        "evaluate.top_k=20", f"output.dir={out}"])
    summary = pipeline.run(cfg)
    manifest = storage.read_manifest(f"{out}/train")
    assert manifest is not None and manifest["rows"]["steps"] == manifest["rows"]["steps_planned"] >= 2
    model_dir = Path(summary["model_dir"])
    config = json.loads((model_dir / "config.json").read_text())
    assert config["posmine_bidirectional"] and config["model_type"] == "mistral"
    assert not any("lora" in k for k in _safetensors_keys(model_dir))  # merged at export
    base = Encoder(_student_view(cfg.train, tiny_decoders["mistral"])).encode(TEXTS, "query: ")
    tuned = Encoder(_student_view(cfg.train, str(model_dir))).encode(TEXTS, "query: ")
    assert not np.allclose(base, tuned, atol=1e-4)  # the adapters trained and were merged
    assert set(summary["base"]) == set(summary["fine_tuned"]) == {"ndcg@10", "recall@10", "map@10",
                                                                   "mrr@10"}


def _safetensors_keys(model_dir: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return list(f.keys())
