"""`teacher.backend: openvino`: an encoder's forward pass compiled by OpenVINO for the CPU.

Tokenizing, pooling and normalising stay posmine's own (`backbone`); only the transformer runs
in OpenVINO, converted from the loaded torch model (a copy: tracing leaves the model it traced
changed). float32 only: it keeps torch's vectors; its bfloat16 mode drifts too far from them
on short texts to be offered (`benchmarks/embed_peak.py` measures both).
"""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace
from typing import Any

import torch


class _Hidden(torch.nn.Module):
    """The model as (input_ids, attention_mask) -> last hidden state: what gets converted."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class OpenVinoForward:
    """Called as a transformers model is by `backbone.forward_hidden`: (input_ids,
    attention_mask) -> `.last_hidden_state` (batch, seq, dim), float32 torch."""

    def __init__(self, model: Any, threads: int) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise ImportError("teacher.backend=openvino needs `pip install 'posmine[openvino]'`") from e
        example = torch.ones((2, 8), dtype=torch.long)
        root, level = logging.getLogger(), logging.getLogger().level
        try:
            converted = ov.convert_model(_Hidden(copy.deepcopy(model).eval()),
                                         example_input={"input_ids": example, "attention_mask": example})
        finally:
            # a conversion that fails leaves the root logger at ERROR (seen with OpenVINO
            # 2026.4): every warning after it would be lost
            root.setLevel(level)
        self.compiled = ov.Core().compile_model(converted, "CPU", {
            # f32: OpenVINO would otherwise run bf16 on CPUs that have it
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
            # unpinned: each actor's OpenVINO pins its threads from core 0, so two actors on one
            # node shared a core (1,000 abstracts, 2 actors x 1 thread: 56 s pinned, 42 s not)
            "ENABLE_CPU_PINNING": False})

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        out = self.compiled({"input_ids": input_ids.cpu().numpy(),
                             "attention_mask": attention_mask.cpu().numpy()})[0]
        return SimpleNamespace(last_hidden_state=torch.from_numpy(out))
