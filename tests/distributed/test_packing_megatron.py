"""Packed (padding-free) micro-batches train the Megatron student exactly like right-padded ones.

The samples and teacher rows of ``tests/unit/test_packing.py``, laid out padded and packed, must give the same
loss and the same (DP-reduced) gradients at TP1 x DP2, TP2 and PP2 (block-diagonal attention mask on every
pipeline stage, RoPE following the restarting position ids), and one optimizer step on each gives the same
metrics. One 2-rank spawned group runs every layout; the tests only compare its results.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from tests.distributed.megatron_utils import run_spawned  # noqa: E402
from tests.unit.test_packing import (  # noqa: E402
    LOSS,
    TEACHER_HIDDEN,
    layouts,
    make_samples,
    step_inputs,
    teacher_rows,
)

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "tp1_dp2": {"tensor_parallel_size": 1, "pipeline_parallel_size": 1},
    "tp2": {"tensor_parallel_size": 2, "pipeline_parallel_size": 1},
    "pp2": {"tensor_parallel_size": 1, "pipeline_parallel_size": 2},
}
LOSS_TOLERANCE = 1e-6
GRAD_TOLERANCE = 1e-7


def _backend(root: Path, teacher_head: torch.Tensor, vocab_size: int, megatron_kwargs: dict):
    from megatron.core import parallel_state

    from kdscale.student import build_student_backend

    parallel_state.destroy_model_parallel()  # the backend initializes the parallel state of its layout
    backend = build_student_backend(
        "megatron",
        model_path=str(root / "student"),
        teacher_head=teacher_head,
        vocab_size=vocab_size,
        loss=LOSS,
        lr=3e-3,
        teacher_head_dtype="float32",
        seed=1234,
        **megatron_kwargs,
    )
    backend.setup()
    return backend


def _inputs(backend, layout, rows):
    micro_batches, hidden = step_inputs(layout, rows, backend.dp_rank)
    return micro_batches, (hidden if backend.consumes_teacher_outputs else [])


def _loss_and_grads(backend, layout, rows) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and this rank's DP-reduced gradients of one step, through the backend's schedule (no optimizer step)."""
    from kdscale.student.common import all_reduce_sum, per_token_losses

    micro_batches, hidden = _inputs(backend, layout, rows)
    for chunk in backend.chunks:
        chunk.zero_grad_buffer()
    backend.optimizer.zero_grad()
    total = layout.global_num_loss_tokens
    sums = backend._run_schedule(micro_batches, hidden, float(total), forward_only=False)
    kd_sum, ce_sum = all_reduce_sum(sums, backend.device).tolist()
    grads = {
        f"{index}.{name}": param.main_grad.detach().clone()
        for index, model in enumerate(backend.models)
        for name, param in model.named_parameters()
    }
    return per_token_losses(backend.loss_kwargs, kd_sum, ce_sum, total)[0], grads


def _group(rank: int, root: str) -> dict:
    from transformers import AutoTokenizer

    root_path = Path(root)
    tokenizer = AutoTokenizer.from_pretrained(root_path / "student")
    vocab_size, pad = len(tokenizer), tokenizer.pad_token_id
    teacher_head = torch.randn(vocab_size + 8, TEACHER_HIDDEN, generator=torch.Generator().manual_seed(7)) * 0.3
    samples = make_samples(vocab_size, pad)
    rows = teacher_rows(samples)
    results: dict = {}
    for name, megatron_kwargs in LAYOUTS.items():
        backend = _backend(root_path, teacher_head, vocab_size, megatron_kwargs)
        padded, packed = layouts(samples, dp_size=backend.dp_size, pad_token_id=pad)
        result = {
            "num_micro_batches": len(packed.shards[backend.dp_rank]),
            "padded": _loss_and_grads(backend, padded, rows),
            "packed": _loss_and_grads(backend, packed, rows),
        }
        for label, layout in (("padded", padded), ("packed", packed)):
            if label == "packed":
                backend = _backend(root_path, teacher_head, vocab_size, megatron_kwargs)
            micro_batches, hidden = _inputs(backend, layout, rows)
            total = layout.global_num_loss_tokens
            result[f"{label}_eval"] = backend.evaluate(micro_batches, hidden, global_num_loss_tokens=total)
            metrics = backend.train_step(micro_batches, hidden, global_num_loss_tokens=total).as_dict()
            result[f"{label}_metrics"] = metrics
        results[name] = result
    results["rope"] = _rope_of_packed_positions(backend)
    del backend
    return results


def _rope_of_packed_positions(backend) -> tuple[torch.Tensor, torch.Tensor]:
    """(RoPE table of positions 0..5, RoPE that the chunk computes for packed position ids [[0, 1, 2, 0, 1, 0]])."""
    from kdscale.student.megatron.model import attention_takes_mask

    model = backend.models[0]
    assert attention_takes_mask(model) is None  # the local spec's DotProductAttention applies a given mask
    backend._rope_position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])  # what _forward_step sets for a packed one
    try:
        packed = model.rotary_pos_emb(6)
    finally:
        backend._rope_position_ids = None
    return model.rotary_pos_emb(6), packed


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.fixtures import make_tiny_llama, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("packing_megatron")
    tokenizer = make_tiny_tokenizer()
    make_tiny_llama(root / "student", tokenizer=tokenizer, vocab_size=len(tokenizer) + 12, seed=3)
    return run_spawned(_group, 2, args=(str(root),), timeout_s=600)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_megatron_packed_loss_and_grads_equal_padded(results, layout):
    for rank_results in results:
        result = rank_results[layout]
        assert result["num_micro_batches"] >= 2
        padded_loss, padded_grads = result["padded"]
        packed_loss, packed_grads = result["packed"]
        assert packed_loss == pytest.approx(padded_loss, abs=LOSS_TOLERANCE)
        assert set(packed_grads) == set(padded_grads) and padded_grads
        for name, grad in padded_grads.items():
            torch.testing.assert_close(
                packed_grads[name], grad, rtol=0, atol=GRAD_TOLERANCE, msg=lambda m, n=name: f"{layout} {n}: {m}"
            )


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_megatron_packed_step_and_evaluate_match_padded(results, layout):
    result = results[0][layout]
    for key in ("kl", "loss", "kd", "ce"):
        assert result["packed_eval"][key] == pytest.approx(result["padded_eval"][key], abs=LOSS_TOLERANCE), key
    padded, packed = result["padded_metrics"], result["packed_metrics"]
    for key in ("loss", "kd", "ce", "grad_norm"):
        assert packed[key] == pytest.approx(padded[key], abs=LOSS_TOLERANCE), key
    assert packed["num_loss_tokens"] == padded["num_loss_tokens"] and packed["num_tokens"] == padded["num_tokens"]
    assert packed["loss"] == pytest.approx(result["padded"][0], abs=LOSS_TOLERANCE)  # same step, same loss


def test_megatron_rope_follows_packed_position_ids(results):
    table, packed = results[0]["rope"]
    assert table.shape[:3] == (6, 1, 1) and packed.shape == table.shape  # [L, B=1, 1, D]
    assert torch.equal(packed[:, 0, 0], table[[0, 1, 2, 0, 1, 0], 0, 0])  # bit for bit the padded layout's angles
    assert not torch.equal(packed, table)
