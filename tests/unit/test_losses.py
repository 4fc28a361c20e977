"""kdscale.losses: the chunked hidden-state loss equals full-logit distillation, and the reference is right.

Three layers of checks: (1) each divergence of the full-logit reference against a hand-written formula in
float64, (2) the chunked loss against the reference (values and gradients, padded vocabularies, awkward chunk
sizes, bf16 and read-only teacher inputs), (3) gradcheck of the chunked autograd Function, plus every user error.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdscale.losses import (
    DIVERGENCES,
    DistillLossOutput,
    chunked_distill_loss,
    naive_distill_loss,
    per_token_divergence,
)

PARAMS = {"jsd_beta": 0.3, "skew_lambda": 0.2, "adaptive_alpha": 0.5}


def _problem(
    num_tokens: int = 37,
    *,
    vocab_size: int = 50,
    student_rows: int = 56,
    teacher_rows: int = 64,
    student_hidden_size: int = 16,
    teacher_hidden_size: int = 24,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random hidden states and heads; the student and teacher heads are padded differently past vocab_size."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "student_hidden": torch.randn(num_tokens, student_hidden_size, generator=gen, dtype=dtype),
        "student_head": 0.4 * torch.randn(student_rows, student_hidden_size, generator=gen, dtype=dtype),
        "teacher_hidden": torch.randn(num_tokens, teacher_hidden_size, generator=gen, dtype=dtype),
        "teacher_head": 0.4 * torch.randn(teacher_rows, teacher_hidden_size, generator=gen, dtype=dtype),
        "labels": torch.randint(0, vocab_size, (num_tokens,), generator=gen),
    }


def _chunked_and_grads(problem, **kwargs) -> tuple[DistillLossOutput, torch.Tensor, torch.Tensor]:
    """Chunked loss and its gradients; also checks that no input was written to (the loss works in place)."""
    snapshot = {name: tensor.clone() for name, tensor in problem.items()}
    hidden = problem["student_hidden"].clone().requires_grad_()
    head = torch.nn.Parameter(problem["student_head"].clone())
    out = chunked_distill_loss(
        hidden, head, problem["teacher_hidden"], problem["teacher_head"], problem["labels"], **kwargs
    )
    grad_hidden, grad_head = torch.autograd.grad(out.loss, [hidden, head])
    for name, tensor in snapshot.items():
        assert torch.equal(problem[name], tensor), f"{name} was modified"
    assert torch.equal(hidden.detach(), snapshot["student_hidden"]) and torch.equal(
        head.detach(), snapshot["student_head"]
    )
    return out, grad_hidden, grad_head


def _naive_and_grads(problem, *, chunk_size: int | None = None, **kwargs):
    del chunk_size  # the reference has no chunks
    hidden = problem["student_hidden"].float().clone().requires_grad_()
    head = problem["student_head"].float().clone().requires_grad_()
    teacher_logits = problem["teacher_hidden"].float() @ problem["teacher_head"].float().T
    out = naive_distill_loss(hidden @ head.T, teacher_logits, problem["labels"], **kwargs)
    grad_hidden, grad_head = torch.autograd.grad(out.loss, [hidden, head])
    return out, grad_hidden, grad_head


# ---------------------------------------------------------------------------------------------------------------
# (1) The reference against hand-written formulas (float64, probabilities rather than log space).


def _by_hand(divergence: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    p, q = teacher_logits.softmax(-1), student_logits.softmax(-1)
    beta, lam, alpha = PARAMS["jsd_beta"], PARAMS["skew_lambda"], PARAMS["adaptive_alpha"]
    if divergence == "forward_kl":  # kl_div(input=log q, target=log p) = KL(p || q)
        return F.kl_div(q.log(), p.log(), reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(p.log(), q.log(), reduction="none", log_target=True).sum(-1)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    if divergence == "skew_forward_kl":
        return (p * (p / (lam * p + (1 - lam) * q)).log()).sum(-1)
    if divergence == "skew_reverse_kl":
        return (q * (q / (lam * q + (1 - lam) * p)).log()).sum(-1)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    assert divergence == "adaptive_kl"
    values = []
    for p_row, q_row in zip(p.tolist(), q.tolist()):  # plain Python: sort, walk the cumulative mass, split
        order = sorted(range(len(p_row)), key=lambda v: -p_row[v])
        head, tail, cumulative = 0.0, 0.0, 0.0
        for rank, v in enumerate(order):
            cumulative += p_row[v]
            gap = abs(p_row[v] - q_row[v])
            if rank == 0 or cumulative <= alpha:
                head += gap
            else:
                tail += gap
        fkl = sum(a * math.log(a / b) for a, b in zip(p_row, q_row))
        rkl = sum(b * math.log(b / a) for a, b in zip(p_row, q_row))
        values.append((head * fkl + tail * rkl) / (head + tail))
    return torch.tensor(values, dtype=p.dtype)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_per_token_divergence_matches_hand_written_formula(divergence):
    gen = torch.Generator().manual_seed(1)
    student = 2.0 * torch.randn(6, 11, generator=gen, dtype=torch.float64)
    teacher = 2.0 * torch.randn(6, 11, generator=gen, dtype=torch.float64)
    got = per_token_divergence(student, teacher, divergence=divergence, **PARAMS)
    torch.testing.assert_close(got, _by_hand(divergence, student, teacher), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_naive_loss_matches_hand_written_loss(divergence):
    """Slicing to vocab_size, temperature on KD only, CE on unscaled logits, kd_ratio mix, normalizer."""
    gen = torch.Generator().manual_seed(2)
    vocab_size, temperature, kd_ratio, normalizer = 9, 1.7, 0.6, 13.0
    student = torch.randn(5, 12, generator=gen, dtype=torch.float64)  # 3 padding columns
    teacher = torch.randn(5, 10, generator=gen, dtype=torch.float64)  # 1 padding column
    labels = torch.randint(0, vocab_size, (5,), generator=gen)
    out = naive_distill_loss(
        student, teacher, labels, vocab_size=vocab_size, divergence=divergence, temperature=temperature,
        kd_ratio=kd_ratio, normalizer=normalizer, compute_dtype=torch.float64, **PARAMS,
    )  # fmt: skip
    s, t = student[:, :vocab_size], teacher[:, :vocab_size]
    kd_sum = _by_hand(divergence, s / temperature, t / temperature).sum()
    ce_sum = F.cross_entropy(s, labels, reduction="sum")
    assert out.num_tokens == 5
    assert out.kd_sum == pytest.approx(float(kd_sum), rel=1e-10)
    assert out.ce_sum == pytest.approx(float(ce_sum), rel=1e-10)
    assert float(out.loss) == pytest.approx(
        float((kd_ratio * kd_sum + (1 - kd_ratio) * ce_sum) / normalizer), rel=1e-10
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_is_zero_for_identical_and_nonnegative_otherwise(divergence):
    gen = torch.Generator().manual_seed(3)
    logits = 3.0 * torch.randn(8, 40, generator=gen)
    same = per_token_divergence(logits, logits + 5.0, divergence=divergence, **PARAMS)  # softmax is shift-invariant
    assert same.abs().max() < 1e-5
    other = 3.0 * torch.randn(8, 40, generator=gen)
    assert (per_token_divergence(logits, other, divergence=divergence, **PARAMS) >= 0).all()
    peaked = per_token_divergence(300.0 * logits, 300.0 * other, divergence=divergence, **PARAMS)  # probs underflow
    assert torch.isfinite(peaked).all() and (peaked >= 0).all()


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_zero_teacher_probability_is_finite(divergence):
    """A teacher probability of exactly 0 (a -inf logit) contributes 0, with a finite gradient."""
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(4, 10, generator=gen, requires_grad=True)
    teacher = torch.randn(4, 10, generator=gen)
    teacher[:, 3] = -math.inf
    value = per_token_divergence(student, teacher, divergence=divergence, **PARAMS)
    (grad,) = torch.autograd.grad(value.sum(), student)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------------------------------
# (2) The chunked hidden-state loss against the full-logit reference.


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(("num_tokens", "chunk_size"), [(37, 8), (37, 1), (37, 100), (1, 4)])
def test_chunked_matches_naive(divergence, num_tokens, chunk_size):
    problem = _problem(num_tokens)
    kwargs = dict(vocab_size=50, divergence=divergence, temperature=2.0, kd_ratio=0.7, chunk_size=chunk_size, **PARAMS)
    out, grad_hidden, grad_head = _chunked_and_grads(problem, **kwargs)
    ref, ref_grad_hidden, ref_grad_head = _naive_and_grads(problem, **kwargs)
    assert out.num_tokens == ref.num_tokens == num_tokens
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert out.kd_sum == pytest.approx(ref.kd_sum, rel=1e-5, abs=1e-6)
    assert out.ce_sum == pytest.approx(ref.ce_sum, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_head, ref_grad_head, rtol=1e-5, atol=1e-6)
    assert grad_head[50:].abs().max() == 0  # padding rows of the student head get no gradient


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_matches_naive_at_unit_temperature(divergence):
    """T = 1 takes other branches (CE from the KD log-probabilities)."""
    problem = _problem(23, seed=5)
    kwargs = dict(vocab_size=50, divergence=divergence, temperature=1.0, kd_ratio=0.4, chunk_size=5, **PARAMS)
    out, grad_hidden, grad_head = _chunked_and_grads(problem, **kwargs)
    ref, ref_grad_hidden, ref_grad_head = _naive_and_grads(problem, **kwargs)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_head, ref_grad_head, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("divergence", "skew_lambda"), [("skew_forward_kl", 0.0), ("skew_reverse_kl", 0.0), ("skew_forward_kl", 1.0)]
)
def test_skew_end_points(divergence, skew_lambda):
    """lambda = 0 is the plain KL; lambda = 1 compares a distribution with itself: 0, with a zero gradient."""
    problem = _problem(9)
    kwargs = dict(vocab_size=50, temperature=1.3, kd_ratio=1.0, chunk_size=4)
    out, grad_hidden, grad_head = _chunked_and_grads(problem, divergence=divergence, skew_lambda=skew_lambda, **kwargs)
    if skew_lambda == 1.0:
        assert abs(out.kd_sum) < 1e-6 and grad_hidden.abs().max() == 0 and grad_head.abs().max() == 0
        return
    plain = "forward_kl" if divergence == "skew_forward_kl" else "reverse_kl"
    ref, ref_grad_hidden, ref_grad_head = _naive_and_grads(problem, divergence=plain, **kwargs)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_head, ref_grad_head, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kd_ratio", [0.0, 1.0])
def test_chunked_matches_naive_at_pure_kd_and_pure_ce_with_normalizer(kd_ratio):
    problem = _problem(20)
    kwargs = dict(vocab_size=50, divergence="jsd", temperature=0.5, kd_ratio=kd_ratio, normalizer=123.0, chunk_size=6)
    out, grad_hidden, grad_head = _chunked_and_grads(problem, **kwargs)
    ref, ref_grad_hidden, ref_grad_head = _naive_and_grads(problem, **kwargs)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_head, ref_grad_head, rtol=1e-5, atol=1e-7)


def test_autocast_does_not_change_the_math():
    """Inside a bf16 autocast region the loss still computes logits and softmax in compute_dtype (fp32)."""
    problem = _problem(20)
    kwargs = dict(vocab_size=50, divergence="reverse_kl", kd_ratio=0.5, chunk_size=8)
    out, grad_hidden, grad_head = _chunked_and_grads(problem, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_amp, grad_hidden_amp, grad_head_amp = _chunked_and_grads(problem, **kwargs)
    torch.testing.assert_close(out_amp.loss, out.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_hidden_amp, grad_hidden, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_head_amp, grad_head, rtol=1e-6, atol=1e-7)


def test_empty_micro_batch_gives_zero_loss_and_zero_grads():
    out, grad_hidden, grad_head = _chunked_and_grads(_problem(0), vocab_size=50)
    assert float(out.loss.detach()) == 0.0 and out.num_tokens == 0 and out.kd_sum == 0.0
    assert grad_hidden.shape == (0, 16) and grad_head.abs().max() == 0


def _read_only_bf16(tensor: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """What the Ray transport hands over: a non-writable int16 numpy array viewed as bf16 without a copy."""
    bits = tensor.to(torch.bfloat16).view(torch.int16).numpy().copy()
    bits.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable": intended
        view = torch.from_numpy(bits).view(torch.bfloat16)
    return view, bits


def test_bf16_student_and_read_only_bf16_teacher_view():
    problem = _problem(29, dtype=torch.bfloat16)
    teacher_view, bits = _read_only_bf16(problem["teacher_hidden"])
    snapshot = bits.copy()
    problem["teacher_hidden"] = teacher_view
    kwargs = dict(vocab_size=50, divergence="forward_kl", temperature=1.5, kd_ratio=0.8, chunk_size=8)
    out, grad_hidden, grad_head = _chunked_and_grads(problem, **kwargs)
    assert out.loss.dtype == torch.float32
    assert grad_hidden.dtype == torch.bfloat16 and grad_head.dtype == torch.bfloat16
    assert np.array_equal(bits, snapshot)  # the shared-memory view was never written
    ref, ref_grad_hidden, ref_grad_head = _naive_and_grads(problem, **kwargs)  # fp32 math on the same bf16 values
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_hidden.float(), ref_grad_hidden, rtol=1e-2, atol=1e-4)  # bf16 rounding only
    torch.testing.assert_close(grad_head.float(), ref_grad_head, rtol=1e-2, atol=1e-4)


def test_teacher_hidden_from_read_only_memory_map(tmp_path):
    """Writing into a read-only mapping would crash the process: the loss only ever reads teacher rows."""
    problem = _problem(12)
    path = tmp_path / "teacher.bin"
    problem["teacher_hidden"].to(torch.bfloat16).view(torch.int16).numpy().tofile(path)
    mapped = np.memmap(path, dtype=np.int16, mode="r", shape=tuple(problem["teacher_hidden"].shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        problem["teacher_hidden"] = torch.from_numpy(mapped).view(torch.bfloat16)
    out, _, _ = _chunked_and_grads(problem, vocab_size=50, divergence="adaptive_kl", chunk_size=5)
    assert math.isfinite(float(out.loss.detach()))


def test_never_allocates_full_logits():
    """With H << N, any [N, V] tensor would be the biggest allocation by far; chunks of 16 rows must stay small."""
    num_tokens, vocab_size, chunk_size = 256, 1000, 16
    problem = _problem(
        num_tokens, vocab_size=vocab_size, student_rows=vocab_size, teacher_rows=vocab_size + 8,
        student_hidden_size=8, teacher_hidden_size=8,
    )  # fmt: skip
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        _chunked_and_grads(problem, vocab_size=vocab_size, divergence="jsd", kd_ratio=0.5, chunk_size=chunk_size)
    allocations = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    full_logits_bytes = num_tokens * vocab_size * 4
    assert allocations and max(allocations) < full_logits_bytes / 4, (max(allocations), full_logits_bytes)


# ---------------------------------------------------------------------------------------------------------------
# (3) gradcheck of the autograd Function, and user errors.


@pytest.mark.parametrize(
    ("divergence", "temperature"),
    [("forward_kl", 1.5), ("reverse_kl", 1.0), ("jsd", 1.5), ("skew_reverse_kl", 1.0), ("tvd", 2.0)],
)
def test_gradcheck_float64(divergence, temperature):
    problem = _problem(5, vocab_size=6, student_rows=7, teacher_rows=8, student_hidden_size=4,
                       teacher_hidden_size=3, dtype=torch.float64)  # fmt: skip
    hidden = problem["student_hidden"].requires_grad_()
    head = problem["student_head"].requires_grad_()

    def loss(hidden: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        return chunked_distill_loss(
            hidden, head, problem["teacher_hidden"], problem["teacher_head"], problem["labels"], vocab_size=6,
            divergence=divergence, temperature=temperature, kd_ratio=0.6, chunk_size=2, compute_dtype=torch.float64,
        ).loss  # fmt: skip

    assert torch.autograd.gradcheck(loss, (hidden, head), eps=1e-6, atol=1e-6)


def _call(problem, **overrides):
    tensors = {k: overrides.pop(k, v) for k, v in problem.items()}
    kwargs = {"vocab_size": 50, **overrides}
    return chunked_distill_loss(
        tensors["student_hidden"], tensors["student_head"], tensors["teacher_hidden"], tensors["teacher_head"],
        tensors["labels"], **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"divergence": "fkl"}, "Did you mean 'forward_kl'?"),
        ({"divergence": "reverse_kld"}, "Did you mean 'reverse_kl'?"),
        ({"divergence": "bogus"}, "valid ones: forward_kl, reverse_kl, jsd"),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"kd_ratio": 1.5}, "kd_ratio must be in [0, 1]"),
        ({"kd_ratio": -0.1}, "kd_ratio must be in [0, 1]"),
        ({"jsd_beta": 1.0}, "jsd_beta must be in the open interval (0, 1), got 1.0"),
        ({"jsd_beta": 0.0}, "jsd_beta must be in the open interval (0, 1), got 0.0"),
        ({"skew_lambda": 1.2}, "skew_lambda must be in [0, 1], got 1.2"),
        ({"adaptive_alpha": -1.0}, "adaptive_alpha must be in [0, 1]"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1, got 0"),
        ({"normalizer": 0.0}, "normalizer must be > 0"),
        (
            {"vocab_size": 1200, "teacher_head": torch.zeros(1000, 24), "student_head": torch.zeros(1300, 16)},
            "teacher head has 1000 rows but vocab_size is 1200: ",
        ),
        ({"vocab_size": 60}, "student head has 56 rows but vocab_size is 60: "),
        ({"student_head": torch.zeros(56, 15)}, "student_hidden has hidden size 16 but student_head is (56, 15)"),
        ({"teacher_hidden": torch.zeros(37, 23)}, "teacher_hidden has hidden size 23 but teacher_head is (64, 24)"),
        ({"teacher_hidden": torch.zeros(36, 24)}, "student_hidden has 37 rows but teacher_hidden has 36"),
        ({"labels": torch.full((37,), 50)}, "labels contain token id 50 outside [0, vocab_size=50)"),
        ({"labels": torch.full((37,), -100)}, "labels contain token id -100 outside [0, vocab_size=50)"),
        ({"labels": torch.zeros(36, dtype=torch.long)}, "labels has shape (36,) but there are 37 prediction rows"),
    ],
)
def test_user_errors_name_the_argument_and_the_fix(overrides, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        _call(_problem(37), **overrides)


def test_naive_rejects_narrow_logits():
    with pytest.raises(ValueError, match=re.escape("teacher logits have 40 columns but vocab_size is 50")):
        naive_distill_loss(torch.zeros(3, 56), torch.zeros(3, 40), torch.zeros(3, dtype=torch.long), vocab_size=50)
