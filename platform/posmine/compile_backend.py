"""`teacher.backend: compile`: the teacher's forward pass through `torch.compile` with
Inductor's freezing.

Freezing turns the (frozen) teacher's weights into constants of the compiled graph, so Inductor
prepacks them for oneDNN on the CPU and fuses the bias and GELU into the matrix multiplies;
the attention, LayerNorm and residual adds become fused kernels. It keeps torch's vectors
(max difference ~2e-7 on SciFact) and ran 1.2-1.3x the eager encoder on 2 cores, after a
one-off compile of ~15 s per process (`benchmarks/embed_peak.py`): worth it for corpora that
take minutes, not seconds. Tokenizing, pooling and normalising stay posmine's own (`backbone`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch
import torch.fx.experimental._config as fx_config


class CompiledForward(torch.nn.Module):
    """Called as a transformers model is by `backbone.forward_hidden`: (input_ids,
    attention_mask) -> `.last_hidden_state` (batch, seq, dim)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model  # its parameters and config, as `backbone` reads them
        # dynamic: batches of every row count and length share one graph
        self.compiled = torch.compile(model, dynamic=True, options={"freezing": True})

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        with _one_graph():
            return self._forward(input_ids, attention_mask)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        if input_ids.shape[0] > 1:
            return self.compiled(input_ids=input_ids, attention_mask=attention_mask)
        # Dynamic shapes still specialise a dimension of size 1: a batch of one row would
        # compile a second graph (another ~15 s). Two copies of the row take the first's graph;
        # rows never see each other, so the first copy's states are the row's own.
        out = self.compiled(input_ids=torch.cat([input_ids, input_ids]),
                            attention_mask=torch.cat([attention_mask, attention_mask]))
        return SimpleNamespace(last_hidden_state=out.last_hidden_state[:1])  # (1, seq, dim)


@contextlib.contextmanager
def _one_graph() -> Iterator[None]:
    """Compile settings that keep one graph for every batch, and compile it once.

    Duck shaping would give a first batch whose row count equals its length (32 queries of 32
    tokens) one symbol for both, and every other batch a second graph; a float traced as a
    symbol made Dynamo restart and trace the model twice (15 s against 9 s, measured).
    """
    # (the fx config module gets its `patch` when torch installs it: mypy cannot see it)
    with torch._dynamo.config.patch(specialize_float=True), fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
        yield
