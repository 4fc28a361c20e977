"""kdscale.losses.cross_tokenizer: shared-vocabulary KD and DSKD against naive full-logit references.

Checks: values and gradients of both losses against unchunked float64 references (chunk sizes that do and do not
divide N), that the teacher gets no gradient, forward KL 0 for identical sides, a toy DSKD optimization, the
projector gradient all-reduce (no-op alone; averaging over a real 2-process gloo group), and every shape error.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from kdscale.losses import DIVERGENCES, per_token_divergence
from kdscale.losses.cross_tokenizer import (
    DSKDProjector,
    all_reduce_projector_grads,
    dskd_loss,
    shared_vocab_kd_loss,
)

F64 = torch.float64
PARAMS = {"jsd_beta": 0.3, "skew_lambda": 0.2, "adaptive_alpha": 0.5}


def _shared_problem(num_rows: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    student_vocab, teacher_vocab, student_size, teacher_size = 30, 40, 8, 12
    # 17 shared entries, scattered and in a different order on each side.
    student_ids = torch.randperm(student_vocab, generator=g)[:17]
    teacher_ids = torch.randperm(teacher_vocab, generator=g)[:17]
    return {
        "student_hidden": torch.randn(num_rows, student_size, generator=g, dtype=F64).requires_grad_(),
        "student_head": torch.randn(student_vocab, student_size, generator=g, dtype=F64).requires_grad_(),
        "teacher_hidden": torch.randn(num_rows, teacher_size, generator=g, dtype=F64).requires_grad_(),
        "teacher_head": torch.randn(teacher_vocab, teacher_size, generator=g, dtype=F64).requires_grad_(),
        "student_ids": student_ids,
        "teacher_ids": teacher_ids.numpy(),  # numpy, as SharedVocab holds them
    }


def _restricted_log_probs(hidden, head, ids, temperature):
    """Full softmax over the whole vocabulary, then renormalized over the shared entries (no chunking)."""
    probs = torch.softmax(hidden @ head.T / temperature, dim=-1)[:, torch.as_tensor(ids)]
    return (probs / probs.sum(dim=-1, keepdim=True)).log()


def _naive_shared(p: dict, *, divergence: str, temperature: float, normalizer: float | None) -> torch.Tensor:
    log_q = _restricted_log_probs(p["student_hidden"], p["student_head"], p["student_ids"], temperature)
    with torch.no_grad():
        log_p = _restricted_log_probs(p["teacher_hidden"], p["teacher_head"], p["teacher_ids"], temperature)
    per_row = per_token_divergence(log_q, log_p, divergence=divergence, **PARAMS)  # log-probs are valid logits
    return per_row.sum() / (normalizer or log_q.shape[0])


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_size", [4, 5, 64])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_shared_vocab_kd_matches_naive_reference(divergence: str, chunk_size: int) -> None:
    p = _shared_problem()
    kwargs = {"divergence": divergence, "temperature": 1.7, "normalizer": 20.0}
    out = shared_vocab_kd_loss(
        p["student_hidden"], p["student_head"], p["teacher_hidden"], p["teacher_head"], student_ids=p["student_ids"],
        teacher_ids=p["teacher_ids"], chunk_size=chunk_size, compute_dtype=F64, **kwargs, **PARAMS,
    )  # fmt: skip
    ref = _naive_shared(p, **kwargs)
    torch.testing.assert_close(out.loss, ref)
    assert out.kd_sum == pytest.approx(float(ref.detach()) * 20.0) and out.ce_sum == 0.0 and out.num_tokens == 12
    got = _grads(out.loss, p["student_hidden"], p["student_head"])
    want = _grads(ref, p["student_hidden"], p["student_head"])
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want)


def test_shared_vocab_kd_forward_kl_by_hand_and_teacher_gets_no_grad() -> None:
    p = _shared_problem(num_rows=9, seed=1)
    out = shared_vocab_kd_loss(
        p["student_hidden"], p["student_head"], p["teacher_hidden"], p["teacher_head"], student_ids=p["student_ids"],
        teacher_ids=p["teacher_ids"], chunk_size=2, compute_dtype=F64,
    )  # fmt: skip
    # forward KL written out: sum_k p_k (log p_k - log q_k) over the renormalized shared entries, mean over rows.
    log_q = _restricted_log_probs(p["student_hidden"], p["student_head"], p["student_ids"], 1.0)
    log_p = _restricted_log_probs(p["teacher_hidden"], p["teacher_head"], p["teacher_ids"], 1.0).detach()
    torch.testing.assert_close(out.loss, (log_p.exp() * (log_p - log_q)).sum() / 9)
    out.loss.backward()
    assert p["teacher_hidden"].grad is None and p["teacher_head"].grad is None
    outside = torch.ones(p["student_head"].shape[0], dtype=torch.bool)
    outside[p["student_ids"]] = False
    assert p["student_head"].grad[outside].abs().max() == 0  # only the shared rows of the student head learn
    assert p["student_head"].grad[~outside].abs().max() > 0 and p["student_hidden"].grad.abs().max() > 0


def test_shared_vocab_kd_identical_sides_is_zero() -> None:
    g = torch.Generator().manual_seed(2)
    hidden, head = torch.randn(10, 8, generator=g), torch.randn(25, 8, generator=g)
    ids = torch.arange(25)
    out = shared_vocab_kd_loss(hidden, head, hidden.clone(), head.clone(), student_ids=ids, teacher_ids=ids)
    assert abs(float(out.loss)) < 1e-6 and abs(out.kd_sum) < 1e-5
    subset = torch.tensor([3, 17, 0, 9])  # any subset of the identity mapping: still 0
    out = shared_vocab_kd_loss(hidden, head, hidden, head, student_ids=subset, teacher_ids=subset.numpy())
    assert abs(float(out.loss)) < 1e-6


def test_shared_vocab_kd_shape_errors() -> None:
    p = _shared_problem()
    args = (p["student_hidden"], p["student_head"], p["teacher_hidden"], p["teacher_head"])
    ids = {"student_ids": p["student_ids"], "teacher_ids": p["teacher_ids"]}
    with pytest.raises(ValueError, match=r"12 rows but teacher_hidden has 11: .*PredictionPairs"):
        shared_vocab_kd_loss(args[0], args[1], args[2][:11], args[3], **ids)
    with pytest.raises(ValueError, match=r"student_ids has 16 entries but teacher_ids has 17"):
        shared_vocab_kd_loss(*args, student_ids=p["student_ids"][:16], teacher_ids=p["teacher_ids"])
    with pytest.raises(ValueError, match=r"student_ids contains id 30 outside the student head's 30 rows"):
        shared_vocab_kd_loss(*args, student_ids=torch.full((17,), 30), teacher_ids=p["teacher_ids"])
    with pytest.raises(ValueError, match=r"teacher_ids contains id -1 outside"):
        shared_vocab_kd_loss(*args, student_ids=p["student_ids"], teacher_ids=-torch.ones(17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"1-D integer array"):
        shared_vocab_kd_loss(*args, student_ids=p["student_ids"].float(), teacher_ids=p["teacher_ids"])
    with pytest.raises(ValueError, match=r"1-D integer array"):
        shared_vocab_kd_loss(*args, student_ids=p["student_ids"].view(1, -1), teacher_ids=p["teacher_ids"])
    with pytest.raises(ValueError, match=r"is empty"):
        shared_vocab_kd_loss(*args, student_ids=torch.zeros(0, dtype=torch.long), teacher_ids=p["teacher_ids"][:0])
    with pytest.raises(ValueError, match=r"teacher_hidden has hidden size 11 but teacher_head"):
        shared_vocab_kd_loss(args[0], args[1], args[2][:, :11], args[3], **ids)
    with pytest.raises(ValueError, match=r"student_hidden must be 2-D"):
        shared_vocab_kd_loss(args[0][None], *args[1:], **ids)
    with pytest.raises(ValueError, match=r"Did you mean 'forward_kl'"):
        shared_vocab_kd_loss(*args, **ids, divergence="fkl")


# ------------------------------------------------------------------------------------------------ DSKD


def _dskd_problem(num_rows: int = 11, seed: int = 0, vocab_size: int = 27) -> dict:
    g = torch.Generator().manual_seed(seed)
    student_size, teacher_size, head_rows = 8, 12, 32  # head rows past vocab_size are padding
    projector = DSKDProjector(teacher_size, student_size, dtype=F64)
    with torch.no_grad():
        projector.weight.copy_(torch.randn(student_size, teacher_size, generator=g, dtype=F64) / 3)
    return {
        "projector": projector,
        "student_hidden": torch.randn(num_rows, student_size, generator=g, dtype=F64).requires_grad_(),
        "student_head": torch.randn(head_rows, student_size, generator=g, dtype=F64).requires_grad_(),
        "teacher_hidden": torch.randn(num_rows, teacher_size, generator=g, dtype=F64).requires_grad_(),
        "labels": torch.randint(0, vocab_size, (num_rows,), generator=g),
        "vocab_size": vocab_size,
    }


def _naive_dskd(p: dict, *, divergence: str, temperature: float, ce_weight: float, normalizer: float) -> torch.Tensor:
    head = p["student_head"][: p["vocab_size"]]
    projected = p["teacher_hidden"].detach() @ p["projector"].weight.T
    student_logits = p["student_hidden"] @ head.T
    teacher_logits = (projected @ head.T).detach()
    kd = per_token_divergence(student_logits / temperature, teacher_logits / temperature, divergence=divergence)
    ce = F.cross_entropy(projected @ head.detach().T, p["labels"], reduction="sum")
    return (kd.sum() + ce_weight * ce) / normalizer


@pytest.mark.parametrize(
    ("divergence", "temperature", "chunk_size"), [("forward_kl", 1.0, 4), ("reverse_kl", 2.0, 11), ("jsd", 0.7, 3)]
)
def test_dskd_matches_naive_reference(divergence: str, temperature: float, chunk_size: int) -> None:
    p = _dskd_problem()
    kwargs = {"divergence": divergence, "temperature": temperature, "normalizer": 15.0}
    out = dskd_loss(
        p["projector"], p["student_hidden"], p["student_head"], p["teacher_hidden"], labels=p["labels"],
        vocab_size=p["vocab_size"], projector_ce_weight=0.5, chunk_size=chunk_size, compute_dtype=F64, **kwargs,
    )  # fmt: skip
    ref = _naive_dskd(p, ce_weight=0.5, **kwargs)
    torch.testing.assert_close(out.loss, ref)
    assert out.num_tokens == 11 and out.kd_sum > 0 and out.projector_ce_sum > 0
    leaves = (p["student_hidden"], p["student_head"], p["projector"].weight)
    got, want = _grads(out.loss, *leaves), _grads(ref, *leaves)
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want)
    assert all(g.abs().max() > 0 for g in got)  # the student (rows and head) and the projector all learn
    assert got[1][p["vocab_size"] :].abs().max() == 0  # padding rows of the head do not


def test_dskd_teacher_gets_no_grad_and_ce_weight_zero_freezes_projector() -> None:
    p = _dskd_problem(seed=3)
    out = dskd_loss(p["projector"], p["student_hidden"], p["student_head"], p["teacher_hidden"], labels=p["labels"])
    out.loss.backward()
    assert p["teacher_hidden"].grad is None and p["projector"].weight.grad.abs().max() > 0
    p["projector"].zero_grad(set_to_none=True)
    out = dskd_loss(
        p["projector"], p["student_hidden"], p["student_head"], p["teacher_hidden"], projector_ce_weight=0.0
    )
    out.loss.backward()
    assert p["projector"].weight.grad is None and out.projector_ce_sum == 0.0 and p["teacher_hidden"].grad is None


def test_dskd_toy_optimization_reduces_loss() -> None:
    p = _dskd_problem(num_rows=16, seed=4)
    params = [p["student_hidden"], p["student_head"], *p["projector"].parameters()]
    optimizer = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        out = dskd_loss(p["projector"], p["student_hidden"], p["student_head"], p["teacher_hidden"],
                        labels=p["labels"], vocab_size=p["vocab_size"], chunk_size=5)  # fmt: skip
        out.loss.backward()
        all_reduce_projector_grads(p["projector"])  # no process group: a no-op
        optimizer.step()
        losses.append((out.kd_sum, out.projector_ce_sum))
    assert losses[-1][0] < 0.5 * losses[0][0] and losses[-1][1] < 0.5 * losses[0][1], losses


def test_dskd_projector_state_dict_and_errors() -> None:
    projector = DSKDProjector(12, 8)
    assert list(projector.state_dict()) == ["weight"] and projector.weight.shape == (8, 12)
    assert projector(torch.randn(3, 12, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"teacher_hidden_size must be an integer >= 1"):
        DSKDProjector(0, 8)
    p = _dskd_problem()
    args = (p["projector"], p["student_hidden"], p["student_head"], p["teacher_hidden"])
    with pytest.raises(ValueError, match=r"11 rows but teacher_hidden has 10:"):
        dskd_loss(*args[:3], p["teacher_hidden"][:10], labels=p["labels"])
    with pytest.raises(ValueError, match=r"projector expects 12"):
        dskd_loss(*args[:3], p["teacher_hidden"][:, :10], labels=p["labels"])
    with pytest.raises(ValueError, match=r"projector maps to hidden size 8"):
        dskd_loss(p["projector"], p["student_hidden"][:, :6], p["student_head"][:, :6], p["teacher_hidden"],
                  labels=p["labels"])  # fmt: skip
    with pytest.raises(ValueError, match=r"student_hidden has hidden size 8 but student_head"):
        dskd_loss(args[0], args[1], p["student_head"][:, :6], args[3], labels=p["labels"])
    with pytest.raises(ValueError, match=r"labels are required"):
        dskd_loss(*args)
    with pytest.raises(ValueError, match=r"labels has shape \(10,\) but there are 11"):
        dskd_loss(*args, labels=p["labels"][:10])
    with pytest.raises(ValueError, match=r"token id 30 outside \[0, vocab_size=27\)"):
        dskd_loss(*args, labels=torch.full((11,), 30), vocab_size=27)
    with pytest.raises(ValueError, match=r"projector_ce_weight must be >= 0"):
        dskd_loss(*args, labels=p["labels"], projector_ce_weight=-1.0)


# ------------------------------------------------------------------------------------------------ all-reduce


def test_all_reduce_projector_grads_without_process_group_is_noop() -> None:
    assert not dist.is_initialized()
    projector = DSKDProjector(4, 3)
    all_reduce_projector_grads(projector)
    assert projector.weight.grad is None
    projector.weight.grad = torch.full_like(projector.weight, 2.0)
    all_reduce_projector_grads(projector)
    assert torch.equal(projector.weight.grad, torch.full_like(projector.weight, 2.0))


def _all_reduce_worker(rank: int, init_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30)
    )
    try:
        projector = DSKDProjector(4, 3)
        projector.weight.grad = torch.full_like(projector.weight, float(rank + 1))  # ranks hold 1 and 2
        all_reduce_projector_grads(projector)
        torch.testing.assert_close(projector.weight.grad, torch.full_like(projector.weight, 1.5))
        other = DSKDProjector(4, 3)  # rank 0 has no gradient: it joins with zeros, nobody hangs
        if rank == 1:
            other.weight.grad = torch.full_like(other.weight, 4.0)
        all_reduce_projector_grads(other, group=dist.group.WORLD)
        torch.testing.assert_close(other.weight.grad, torch.full_like(other.weight, 2.0))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_all_reduce_projector_grads_averages_over_two_gloo_ranks(tmp_path) -> None:
    init_file = os.path.join(tmp_path, "init")
    mp.spawn(_all_reduce_worker, args=(init_file,), nprocs=2, join=True)
