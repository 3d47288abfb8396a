"""Cross-worker in-batch negatives: 2 gloo workers x 3 examples, gathered, give the loss and
(after DDP's averaging) the gradients of 1 worker x 6 examples; without gathering they do not."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from posmine.config import TrainConfig
from posmine.stages.train.trainer import StudentTrainer
from tests.test_grad_cache import grad_atol
from tests.test_train import ROWS

CPU = torch.device("cpu")


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight's gradient, whole (FSDP holds each worker's shard of it)."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, port: int, cfg: TrainConfig, out: str, rows: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        trainer = StudentTrainer(cfg, 1, CPU)
        trainer.model.eval()  # no dropout: the processes would draw different masks
        if cfg.strategy == "fsdp":
            trainer.shard()
        else:
            trainer.model = torch.nn.parallel.DistributedDataParallel(trainer.model)
        trainer.batch = rows
        loss = trainer.backward(rows[rank::world])  # DDP averages the gradients here
        grads = _grads(trainer.unwrapped())  # a collective under FSDP
        if rank == 0:
            torch.save({"loss": loss, "grads": grads, "masked": trainer.masked}, out)
        # Tear down together: a rank that destroys its gloo group while its peer still holds a
        # connection sometimes dies in gloo's threads at exit ("terminate called", SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_done()


def _exit_done() -> None:
    """Leave a finished worker without running C++ destructors at exit, where gloo's threads
    still abort now and then under load ("terminate called without an active exception")
    after every result is written and the group is destroyed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _two_workers(cfg: TrainConfig, tmp_path: Path, rows: list = ROWS) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / f"rank0-{cfg.gather_across_workers}-{cfg.grad_cache_chunk}-{cfg.strategy}.pt")
    mp.spawn(_worker, args=(2, port, cfg, out, rows), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on loopback")
@pytest.mark.parametrize("chunk, strategy", [(0, "ddp"), (4, "ddp"), (0, "fsdp"), (4, "fsdp")])
def test_gathering_equals_one_big_worker(tiny_model: str, tmp_path: Path, chunk: int,
                                         strategy: str) -> None:
    """DDP, and FSDP (each worker holding half of every weight), give one big worker's loss
    and gradients."""
    cfg = TrainConfig(model=tiny_model, batch_size=3, num_negatives=3, grad_cache_chunk=chunk,
                      gather_across_workers=True, strategy=strategy)
    one = StudentTrainer(replace(cfg, batch_size=6), 1, CPU)
    one.model.eval()
    want = one.backward(ROWS)
    want_grads = _grads(one.model)
    got = _two_workers(cfg, tmp_path)
    assert float(got["loss"]) == pytest.approx(float(want), rel=1e-5)
    assert got["grads"].keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got["grads"][name], g, atol=grad_atol(g), rtol=1e-4, msg=name)
    assert got["masked"] == one.masked  # counted once, not once per worker
    if chunk == 0:  # the control: each worker on its own 3 rows is another loss
        alone = _two_workers(replace(cfg, gather_across_workers=False), tmp_path)
        assert float(alone["loss"]) != pytest.approx(float(want), rel=1e-3)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on loopback")
@pytest.mark.parametrize("chunk", [0, 4])
def test_gathered_rows_bring_their_teacher_vectors(tiny_model: str, tmp_path: Path, chunk: int) -> None:
    """`train.in_batch_bound=rule` over 2 gathered workers: each worker holds the global batch's
    rows, teacher vectors included, so the bound masks what one big worker masks."""
    from tests.test_in_batch_bound import bound_rows

    rows = bound_rows()
    cfg = TrainConfig(model=tiny_model, batch_size=3, num_negatives=3, grad_cache_chunk=chunk,
                      gather_across_workers=True, in_batch_bound="rule")
    one = StudentTrainer(replace(cfg, batch_size=6), 1, CPU)
    one.model.eval()
    want = one.backward(rows)
    got = _two_workers(cfg, tmp_path, rows)
    assert float(got["loss"]) == pytest.approx(float(want), rel=1e-5)
    want_grads = _grads(one.model)
    for name, g in want_grads.items():
        torch.testing.assert_close(got["grads"][name], g, atol=grad_atol(g), rtol=1e-4, msg=name)
    assert got["masked"] == one.masked and one.masked["in_batch_bound"] > 0


def _fsdp_state_worker(rank: int, world: int, port: int, cfg: TrainConfig, out: str) -> None:
    """One FSDP step, then a checkpoint and an export (collectives), then a fresh sharded
    trainer restored from that checkpoint."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        trainer = StudentTrainer(cfg, 2, CPU)
        trainer.model.eval()
        trainer.shard()
        trainer.step(ROWS[rank::world], ROWS)
        ckpt, export = Path(out) / "ckpt", Path(out) / "model"
        trainer.save_state(str(ckpt) if rank == 0 else None)
        dist.barrier()  # the checkpoint is written before anyone reads it
        fresh = StudentTrainer(cfg, 2, CPU)
        fresh.shard()
        fresh.load_state(str(ckpt))
        saved, restored = trainer.trainable_state(), fresh.trainable_state()
        trainer.export(str(export) if rank == 0 else None)
        if rank == 0:
            torch.save({"saved": saved, "restored": restored, "step": fresh.step_no}, f"{out}/state.pt")
        dist.barrier()  # tear down together (above)
    finally:
        dist.destroy_process_group()
    _exit_done()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on loopback")
def test_fsdp_checkpoint_and_export_hold_the_whole_model(tiny_decoders: dict[str, str],
                                                         tmp_path: Path) -> None:
    """A LoRA decoder sharded over 2 workers: the checkpoint round-trips, and the export (merged
    from the gathered weights) embeds as one worker trained on the whole batch does."""
    from posmine.config import LoraConfig, TeacherConfig
    from posmine.models.encoder import Encoder

    cfg = TrainConfig(model=tiny_decoders["llama"], batch_size=3, num_negatives=3, lr=5e-2,
                      warmup_ratio=0.0, attention="bidirectional", gather_across_workers=True,
                      strategy="fsdp", lora=LoraConfig(r=4, alpha=8, dropout=0.0,
                                                       target_modules=("q_proj", "v_proj")))
    (tmp_path / "ckpt").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_state_worker, args=(2, port, cfg, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "state.pt", weights_only=True)
    assert got["step"] == 1 and got["saved"].keys() == got["restored"].keys() and got["saved"]
    assert all("lora_" in name for name in got["saved"])  # the adapters alone train
    for name, t in got["saved"].items():
        torch.testing.assert_close(got["restored"][name], t, msg=name)
    one = StudentTrainer(replace(cfg, batch_size=6), 2, CPU)
    one.model.eval()
    one.step(ROWS)
    one.model.eval()
    view = TeacherConfig(model=cfg.model, attention="bidirectional")
    want = Encoder.wrap(view, one.model, one.tokenizer, CPU).encode(["cell protein gene", "brain"])
    exported = Encoder(replace(view, model=str(tmp_path / "model"))).encode(["cell protein gene", "brain"])
    np.testing.assert_allclose(exported, want, atol=1e-5)
