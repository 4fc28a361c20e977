"""Megatron student backend on CUDA: one NCCL rank trains a few steps, resumes exactly, runs bf16 + recomputation.

Skipped without CUDA, and without megatron-core (the GPU image does not install it: ``pip install
megatron-core``). Needs torch + transformers + megatron-core (no Ray): ``pytest tests/gpu/test_megatron_cuda.py``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest
import torch


def _megatron_core_importable() -> bool:
    try:
        return importlib.util.find_spec("megatron.core") is not None
    except ImportError:  # no "megatron" package at all
        return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        not _megatron_core_importable(),
        reason="needs megatron-core (not in the GPU image; pip install megatron-core to run the Megatron GPU test)",
    ),
]

TEACHER_HIDDEN = 48
NUM_STEPS = 4
SAVE_AFTER = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batch(vocab_size: int, pad_token_id: int, seed: int):
    from kdscale.data.batch import MicroBatch

    generator = torch.Generator().manual_seed(seed)
    micro_batches, hidden = [], []
    for _ in range(2):
        input_ids = torch.randint(0, vocab_size, (2, 24), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        loss_mask = torch.zeros(2, 24, dtype=torch.bool)
        loss_mask[:, 8:20] = True
        attention_mask[:, 20:] = 0
        input_ids[:, 20:] = pad_token_id
        micro_batch = MicroBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask)
        micro_batches.append(micro_batch)
        hidden.append(torch.randn(micro_batch.num_loss_tokens, TEACHER_HIDDEN, generator=generator).bfloat16())
    return micro_batches, hidden, sum(mb.num_loss_tokens for mb in micro_batches)


def _worker(rank: int, port: int, root: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from transformers import AutoTokenizer

    from kdscale.student import build_student_backend

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=rank, world_size=1)
    try:
        root_path = Path(root)
        tokenizer = AutoTokenizer.from_pretrained(root_path / "student")
        vocab_size = len(tokenizer)
        teacher_head = torch.randn(vocab_size + 4, TEACHER_HIDDEN, generator=torch.Generator().manual_seed(3)) * 0.3
        micro_batches, hidden, total = _batch(vocab_size, tokenizer.pad_token_id, seed=11)

        def backend(**overrides):
            parallel_state.destroy_model_parallel()
            kwargs = {
                "model_path": str(root_path / "student"),
                "teacher_head": teacher_head,
                "vocab_size": vocab_size,
                "loss": {"kd_ratio": 0.8, "chunk_size": 16},
                "lr": 3e-3,
                "total_steps": 10,
                "device": "cuda",
                "seed": 5,
                "use_distributed_optimizer": True,
                **overrides,
            }
            instance = build_student_backend("megatron", **kwargs)
            instance.setup()
            return instance

        def train(instance, steps: int) -> list[float]:
            return [instance.train_step(micro_batches, hidden, global_num_loss_tokens=total).loss for _ in range(steps)]

        results: dict = {}
        student = backend()
        results["losses"] = train(student, SAVE_AFTER)
        ckpt = root_path / "ckpt"
        ckpt.mkdir()
        student.save(str(ckpt))
        results["losses"] += train(student, NUM_STEPS - SAVE_AFTER)
        results["eval"] = student.evaluate(micro_batches, hidden, global_num_loss_tokens=total)
        del student

        resumed = backend()
        resumed.load(str(ckpt))
        results["resumed_step"] = resumed.step
        results["resumed_losses"] = train(resumed, NUM_STEPS - SAVE_AFTER)
        del resumed

        mixed = backend(mixed_precision="bf16", recompute_activations=True)
        results["bf16_losses"] = train(mixed, NUM_STEPS)
        torch.save(results, root_path / "results.pt")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_megatron_nccl_one_rank_trains_and_resumes(tmp_path):
    import torch.multiprocessing as mp

    from tests.fixtures import make_tiny_llama, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    make_tiny_llama(tmp_path / "student", tokenizer=tokenizer, vocab_size=len(tokenizer) + 4)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    results = torch.load(tmp_path / "results.pt")

    losses = results["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses  # the same batch four times: the loss goes down
    assert results["resumed_step"] == SAVE_AFTER
    torch.testing.assert_close(
        torch.tensor(results["resumed_losses"]), torch.tensor(losses[SAVE_AFTER:]), atol=1e-5, rtol=0
    )
    assert results["eval"]["kl"] > 0
    bf16 = results["bf16_losses"]
    assert all(torch.isfinite(torch.tensor(bf16))) and bf16[0] == pytest.approx(losses[0], rel=3e-2)
    assert bf16[-1] < bf16[0], bf16
