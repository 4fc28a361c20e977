"""FSDP2 student backend on CUDA: one NCCL rank trains, resumes and exports; the chunked loss matches the naive one.

Skipped without CUDA. Needs torch + transformers only (no Ray): ``pytest tests/gpu/test_fsdp2_cuda.py``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TEACHER_HIDDEN = 48


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
            kwargs = {
                "model_path": str(root_path / "student"),
                "teacher_head": teacher_head,
                "vocab_size": vocab_size,
                "loss": {"kd_ratio": 0.8, "chunk_size": 16},
                "lr": 3e-3,
                "total_steps": 10,
                "device": "cuda",
                "seed": 5,
                **overrides,
            }
            instance = build_student_backend("fsdp2", **kwargs)
            instance.setup()
            return instance

        def train(instance, steps: int) -> list[float]:
            return [instance.train_step(micro_batches, hidden, global_num_loss_tokens=total).loss for _ in range(steps)]

        results: dict = {}
        student = backend()
        results["losses"] = train(student, 3)
        ckpt = root_path / "ckpt"
        ckpt.mkdir()
        student.save(str(ckpt))
        results["losses"] += train(student, 3)
        results["eval"] = student.evaluate(micro_batches, hidden, global_num_loss_tokens=total)

        # Export, then compare the exported model's logits with the backend's.
        sample = micro_batches[0]
        student.module.unshard()
        with torch.no_grad():
            logits = student.module.model(
                input_ids=sample.input_ids.cuda(), attention_mask=sample.attention_mask.cuda()
            ).logits
        student.module.reshard()
        student.export_hf(str(root_path / "export"))
        exported = AutoModelForCausalLM.from_pretrained(root_path / "export", dtype=torch.float32).cuda()
        with torch.no_grad():
            reference = exported(input_ids=sample.input_ids.cuda(), attention_mask=sample.attention_mask.cuda()).logits
        results["export_error"] = float((reference - logits).abs().max())
        del student, exported

        resumed = backend()
        resumed.load(str(ckpt))
        results["resumed_losses"] = train(resumed, 3)
        del resumed

        mixed = backend(mixed_precision="bf16", activation_checkpointing=True)
        results["bf16_losses"] = train(mixed, 3)
        torch.save(results, root_path / "results.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp2_nccl_one_rank_trains_resumes_exports(tmp_path):
    import torch.multiprocessing as mp

    from tests.fixtures import make_tiny_llama, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    make_tiny_llama(tmp_path / "student", tokenizer=tokenizer, vocab_size=len(tokenizer) + 4)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    results = torch.load(tmp_path / "results.pt")

    losses = results["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses  # the same batch six times: the loss goes down
    torch.testing.assert_close(torch.tensor(results["resumed_losses"]), torch.tensor(losses[3:]), atol=1e-5, rtol=0)
    assert results["export_error"] < 1e-4
    assert results["eval"]["kl"] > 0
    bf16 = results["bf16_losses"]
    assert all(torch.isfinite(torch.tensor(bf16))) and bf16[0] == pytest.approx(losses[0], rel=3e-2)


def test_chunked_loss_matches_naive_on_cuda():
    from kdscale.losses import chunked_distill_loss, naive_distill_loss

    generator = torch.Generator(device="cuda").manual_seed(0)
    num_tokens, hidden_size, vocab_size = 300, 64, 1000
    student_hidden = torch.randn(num_tokens, hidden_size, device="cuda", generator=generator, requires_grad=True)
    student_head = torch.nn.Parameter(
        torch.randn(vocab_size + 24, hidden_size, device="cuda", generator=generator) * 0.1
    )
    teacher_hidden = torch.randn(num_tokens, 32, device="cuda", generator=generator).bfloat16()
    teacher_head = torch.randn(vocab_size + 8, 32, device="cuda", generator=generator) * 0.2
    labels = torch.randint(0, vocab_size, (num_tokens,), device="cuda", generator=generator)
    kwargs = {"vocab_size": vocab_size, "kd_ratio": 0.6, "temperature": 2.0, "normalizer": 512.0}

    chunked = chunked_distill_loss(
        student_hidden, student_head, teacher_hidden, teacher_head, labels, chunk_size=64, **kwargs
    )
    chunked.loss.backward()
    grads = student_hidden.grad.clone(), student_head.grad.clone()
    student_hidden.grad, student_head.grad = None, None

    naive = naive_distill_loss(
        student_hidden @ student_head.T, teacher_hidden.float() @ teacher_head.T, labels, **kwargs
    )
    naive.loss.backward()
    torch.testing.assert_close(chunked.loss, naive.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], student_hidden.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grads[1], student_head.grad, atol=1e-6, rtol=1e-4)
