"""teacher.backend=openvino: the same vectors as the torch encoder (float32), and what it
refuses."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from posmine.config import ConfigError, TeacherConfig
from posmine.models.backbone import ModelError
from posmine.models.encoder import Encoder
from posmine.stages.embed import output_key

pytest.importorskip("openvino")

TEXTS = ["cell protein", "the brain and the heart of a mouse study with a long text here",
         "drug", "vitamin diet sleep stress immune response infection liver kidney lung " * 6]


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_float32_gives_the_torch_vectors(tiny_model: str, pooling: str) -> None:
    cfg = TeacherConfig(model=tiny_model, pooling=pooling, batch_size=3)  # type: ignore[arg-type]
    ours = Encoder(replace(cfg, backend="openvino"))
    torch_enc = Encoder(cfg)
    for prefix in ("", "query: "):  # padded batches of 3 and 1 texts: dynamic shapes
        np.testing.assert_allclose(ours.encode(TEXTS, prefix), torch_enc.encode(TEXTS, prefix), atol=1e-5)


def test_packaged_minilm_gives_the_torch_vectors() -> None:
    ref = Encoder(TeacherConfig()).encode(TEXTS)
    np.testing.assert_allclose(Encoder(TeacherConfig(backend="openvino")).encode(TEXTS), ref, atol=1e-5)


def test_refusals_and_keys(tiny_decoders: dict[str, str]) -> None:
    for dtype in ("float16", "bfloat16"):
        with pytest.raises(ConfigError, match=f"float32 only .* not {dtype}"):
            TeacherConfig(backend="openvino", dtype=dtype)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="runs on the CPU"):
        TeacherConfig(backend="openvino", device="cuda")
    with pytest.raises(ModelError, match=r"runs encoders .* bidirectional is not converted"):
        Encoder(TeacherConfig(model=tiny_decoders["llama"], pooling="last", attention="bidirectional",
                              backend="openvino"))
    with pytest.raises(ModelError, match="did not convert"):  # decoders: not yet
        Encoder(TeacherConfig(model=tiny_decoders["qwen2"], pooling="last", backend="openvino"))
    # its vectors are kept apart from torch's (bfloat16 differs; float32 by a few 1e-7)
    assert output_key(TeacherConfig(backend="openvino")) != output_key(TeacherConfig())
