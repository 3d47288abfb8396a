"""Cross-worker in-batch negatives: 2 gloo workers x 3 examples, gathered, give the loss and
(after DDP's averaging) the gradients of 1 worker x 6 examples; without gathering they do not."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from posmine.config import TrainConfig
from posmine.train import StudentTrainer
from tests.test_train import ROWS

CPU = torch.device("cpu")


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, port: int, cfg: TrainConfig, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        trainer = StudentTrainer(cfg, 1, CPU)
        trainer.model.eval()  # no dropout: the processes would draw different masks
        trainer.model = torch.nn.parallel.DistributedDataParallel(trainer.model)
        trainer.batch = ROWS
        loss = trainer.backward(ROWS[rank::world])  # DDP averages the gradients here
        if rank == 0:
            torch.save({"loss": loss, "grads": _grads(trainer.model.module),
                        "masked": trainer.masked}, out)
    finally:
        dist.destroy_process_group()


def _two_workers(cfg: TrainConfig, tmp_path: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / f"rank0-{cfg.gather_across_workers}-{cfg.grad_cache_chunk}.pt")
    mp.spawn(_worker, args=(2, port, cfg, out), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on loopback")
@pytest.mark.parametrize("chunk", [0, 4])
def test_gathering_equals_one_big_worker(tiny_model: str, tmp_path: Path, chunk: int) -> None:
    cfg = TrainConfig(model=tiny_model, batch_size=3, num_negatives=3, grad_cache_chunk=chunk,
                      gather_across_workers=True)
    one = StudentTrainer(replace(cfg, batch_size=6), 1, CPU)
    one.model.eval()
    want = one.backward(ROWS)
    want_grads = _grads(one.model)
    got = _two_workers(cfg, tmp_path)
    assert float(got["loss"]) == pytest.approx(float(want), rel=1e-5)
    assert got["grads"].keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got["grads"][name], g, atol=1e-6, rtol=1e-4, msg=name)
    assert got["masked"] == one.masked  # counted once, not once per worker
    if chunk == 0:  # the control: each worker on its own 3 rows is another loss
        alone = _two_workers(replace(cfg, gather_across_workers=False), tmp_path)
        assert float(alone["loss"]) != pytest.approx(float(want), rel=1e-3)
