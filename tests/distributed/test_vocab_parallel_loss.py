"""Vocab-parallel chunked loss at TP=2 on gloo equals the single-device loss on the gathered heads.

ONE spawned 2-rank group (Megatron's TP group; imports cost ~10 s) runs every case and returns its values and
gradients; the parent compares them with :func:`chunked_distill_loss` and :func:`naive_distill_loss` on the full
padded heads. Checked: every divergence mixed with CE (kd_ratio 0.7, T = 2 and T = 1), padded vocabularies (the
last shard partly padding; padding spanning both shards, the second one all padding), chunk sizes that do not
divide N, the adaptive-KL threshold over the shards, pure KD / pure CE, empty and one-token batches, fp64;
``student_hidden``'s gradient is the FULL (TP-all-reduced) gradient on every rank and each head shard gets its
rows of the full head gradient; gradcheck at TP=2; Megatron's own vocab_parallel_cross_entropy behind
copy_to_tensor_model_parallel_region gives the same CE and the same hidden gradient; size-1 groups and
``tp_group=None`` are exactly the chunked loss; a read-only bf16 teacher view works; bad arguments raise a
ValueError on EVERY rank (no hang) and leave the group usable.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from kdscale.losses import (  # noqa: E402
    DIVERGENCES,
    chunked_distill_loss,
    naive_distill_loss,
    vocab_parallel_chunked_distill_loss,
)
from tests.distributed.megatron_utils import run_spawned  # noqa: E402

pytestmark = pytest.mark.distributed

TP = 2
PARAMS = {"jsd_beta": 0.3, "skew_lambda": 0.2, "adaptive_alpha": 0.5}


def _case(name: str, **spec) -> dict:
    base = {
        "seed": 0,
        "num_tokens": 37,
        "padded_vocab": 64,
        "head_scale": 0.4,
        "dtype": torch.float32,
        "kwargs": {},
    }
    return {"name": name, **base, **spec}


CASES = [
    *(
        _case(f"{div}-v50-T2", kwargs=dict(vocab_size=50, divergence=div, temperature=2.0, kd_ratio=0.7, chunk_size=8))
        for div in DIVERGENCES
    ),
    *(  # vocab 30 of 64: shard 0 has 2 padding rows, shard 1 is all padding
        _case(
            f"{div}-v30-T1",
            seed=1,
            num_tokens=23,
            kwargs=dict(vocab_size=30, divergence=div, temperature=1.0, kd_ratio=0.7, chunk_size=5, normalizer=100.0),
        )
        for div in DIVERGENCES
    ),
    *(  # the AKL head/tail split at other alphas, on sharper distributions
        _case(
            f"adaptive_kl-alpha{alpha}",
            seed=2,
            head_scale=1.0,
            kwargs=dict(
                vocab_size=50,
                divergence="adaptive_kl",
                temperature=1.0,
                kd_ratio=0.9,
                chunk_size=16,
                adaptive_alpha=alpha,
            ),
        )  # fmt: skip
        for alpha in (0.0, 0.1, 0.9)
    ),
    _case(
        "adaptive_kl-fp64",
        seed=3,
        dtype=torch.float64,
        kwargs=dict(
            vocab_size=50,
            divergence="adaptive_kl",
            temperature=1.5,
            kd_ratio=0.7,
            chunk_size=6,
            compute_dtype=torch.float64,
        ),
    ),  # fmt: skip
    *(
        _case(
            f"jsd-kd{kd_ratio}",
            seed=4,
            num_tokens=20,
            kwargs=dict(
                vocab_size=50, divergence="jsd", temperature=0.5, kd_ratio=kd_ratio, normalizer=123.0, chunk_size=6
            ),
        )  # fmt: skip
        for kd_ratio in (0.0, 1.0)
    ),
    _case(
        "skew_forward_kl-lambda1",
        num_tokens=9,
        kwargs=dict(vocab_size=50, divergence="skew_forward_kl", skew_lambda=1.0, temperature=1.3, chunk_size=4),
    ),
    _case("empty", num_tokens=0, kwargs=dict(vocab_size=50, divergence="reverse_kl", kd_ratio=0.5)),
    _case("one-token", num_tokens=1, kwargs=dict(vocab_size=50, divergence="tvd", kd_ratio=0.5, chunk_size=4)),
]
CASES_BY_NAME = {case["name"]: case for case in CASES}
GRADCHECK = [("forward_kl", 1.5), ("jsd", 1.0), ("skew_reverse_kl", 1.0), ("tvd", 2.0), ("reverse_kl", 0.7)]


def _problem(case: dict) -> dict[str, torch.Tensor]:
    """Full padded heads (random values in the padding rows too: they must be ignored) and replicated rows."""
    gen = torch.Generator().manual_seed(case["seed"])
    num_tokens, padded, scale, dtype = case["num_tokens"], case["padded_vocab"], case["head_scale"], case["dtype"]
    vocab_size = case["kwargs"]["vocab_size"]
    return {
        "student_hidden": torch.randn(num_tokens, 16, generator=gen, dtype=dtype),
        "student_head": scale * torch.randn(padded, 16, generator=gen, dtype=dtype),
        "teacher_hidden": torch.randn(num_tokens, 24, generator=gen, dtype=dtype),
        "teacher_head": scale * torch.randn(padded, 24, generator=gen, dtype=dtype),
        "labels": torch.randint(0, vocab_size, (num_tokens,), generator=gen),
    }


def _rows(tensor: torch.Tensor, tp_rank: int, tp_size: int = TP) -> torch.Tensor:
    rows = tensor.shape[0] // tp_size
    return tensor[tp_rank * rows : (tp_rank + 1) * rows]


def _read_only_bf16(tensor: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """What the Ray transport hands over: a non-writable int16 numpy array viewed as bf16 without a copy."""
    bits = tensor.to(torch.bfloat16).view(torch.int16).numpy().copy()
    bits.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable": intended
        return torch.from_numpy(bits).view(torch.bfloat16), bits


# ----------------------------------------------------------------------------------------- the spawned TP=2 group


def _sharded_call(problem, tp_rank, group, **kwargs):
    """The vocab-parallel loss on this rank's shards; returns (output, grad of hidden, grad of the head shard)."""
    hidden = problem["student_hidden"].clone().requires_grad_()
    head_shard = torch.nn.Parameter(_rows(problem["student_head"], tp_rank).clone())
    out = vocab_parallel_chunked_distill_loss(
        hidden, head_shard, problem["teacher_hidden"], _rows(problem["teacher_head"], tp_rank), problem["labels"],
        vocab_start_index=tp_rank * head_shard.shape[0], tp_group=group, **kwargs,
    )  # fmt: skip
    out.loss.backward()
    return out, hidden.grad, head_shard.grad


def _summary(out, grad_hidden, grad_head) -> dict:
    return {
        "loss": out.loss.detach(),
        "kd_sum": out.kd_sum,
        "ce_sum": out.ce_sum,
        "num_tokens": out.num_tokens,
        "grad_hidden": grad_hidden,
        "grad_head": grad_head,
    }


def _errors(problem, tp_rank, group) -> dict[str, str]:
    """Bad arguments on one or both ranks: each must raise ValueError on EVERY rank (a hang would time out)."""
    good = dict(vocab_size=50, divergence="forward_kl", chunk_size=8)
    student_shard, teacher_shard = _rows(problem["student_head"], tp_rank), _rows(problem["teacher_head"], tp_rank)
    other_labels = (problem["labels"] + 1) % 50 if tp_rank == 1 else problem["labels"]
    calls = {
        "wrong_start": dict(vocab_start_index=0),
        "rows_differ_on_rank1": dict(teacher_head=teacher_shard[:-1] if tp_rank == 1 else teacher_shard),
        "labels_differ": dict(labels=other_labels),
        "hidden_differs": dict(student_hidden=problem["student_hidden"] + tp_rank),
        "chunk_size_differs": dict(chunk_size=8 + tp_rank),
        "temperature_differs": dict(temperature=1.0 + tp_rank),
        "vocab_not_covered": dict(vocab_size=70),
        "bad_divergence": dict(divergence="fkl"),
        "hidden_size": dict(student_head=student_shard[:, :15]),
        "label_out_of_range": dict(labels=torch.full_like(problem["labels"], 50)),
    }
    messages = {}
    for name, overrides in calls.items():
        args = {
            "student_hidden": problem["student_hidden"],
            "student_head": student_shard,
            "teacher_hidden": problem["teacher_hidden"],
            "teacher_head": teacher_shard,
            "labels": problem["labels"],
            **good,
            "vocab_start_index": tp_rank * student_shard.shape[0],
            **overrides,
        }
        try:
            vocab_parallel_chunked_distill_loss(
                args.pop("student_hidden"), args.pop("student_head"), args.pop("teacher_hidden"),
                args.pop("teacher_head"), args.pop("labels"), tp_group=group, **args,
            )  # fmt: skip
            messages[name] = "no error"
        except ValueError as exc:
            messages[name] = str(exc)
    return messages


def _megatron_cross_entropy(problem, tp_rank, group) -> dict:
    """Megatron's own vocab-parallel CE behind copy_to_tensor_model_parallel_region (no padding: vocab = Vp)."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, vocab_parallel_cross_entropy

    vocab = problem["student_head"].shape[0]
    head_shard = _rows(problem["student_head"], tp_rank)
    hidden = problem["student_hidden"].clone().requires_grad_()
    logits = copy_to_tensor_model_parallel_region(hidden) @ head_shard.T
    megatron_loss = vocab_parallel_cross_entropy(logits.unsqueeze(1), problem["labels"].unsqueeze(1)).mean()
    megatron_loss.backward()
    ours, grad_hidden, _ = _sharded_call(
        problem, tp_rank, group, vocab_size=vocab, divergence="forward_kl", kd_ratio=0.0, chunk_size=7
    )
    return {
        "megatron_loss": megatron_loss.detach(),
        "megatron_grad_hidden": hidden.grad,
        "loss": ours.loss.detach(),
        "grad_hidden": grad_hidden,
    }


class _ShardOfReplicated(torch.autograd.Function):
    """This rank's rows of a tensor replicated on every rank; backward sums every rank's row gradients.

    gradcheck perturbs the same entry of the replicated tensor on every rank at once, so its numerical Jacobian is
    that of the GLOBAL loss w.r.t. the full head: the analytic one must gather every shard's gradient to match.
    """

    @staticmethod
    def forward(ctx, full, tp_rank, group):
        ctx.tp_rank, ctx.group, ctx.shape = tp_rank, group, full.shape
        return _rows(full, tp_rank).clone()

    @staticmethod
    def backward(ctx, grad_shard):
        import torch.distributed as dist

        grad_full = grad_shard.new_zeros(ctx.shape)
        _rows(grad_full, ctx.tp_rank).copy_(grad_shard)
        dist.all_reduce(grad_full, group=ctx.group)
        return grad_full, None, None


def _gradcheck(tp_rank, group) -> dict[str, bool]:
    """torch.autograd.gradcheck in float64 through the collectives, w.r.t. the replicated hidden states (whose
    gradient must be the full one) and the full student head (each rank uses its rows); every rank perturbs the
    same entries at the same time."""
    case = _case("gradcheck", num_tokens=5, padded_vocab=8, dtype=torch.float64, kwargs={"vocab_size": 6})
    problem = _problem(case)
    teacher_shard = _rows(problem["teacher_head"], tp_rank)
    results = {}
    for divergence, temperature in GRADCHECK:

        def loss(hidden, full_head, divergence=divergence, temperature=temperature):
            return vocab_parallel_chunked_distill_loss(
                hidden, _ShardOfReplicated.apply(full_head, tp_rank, group), problem["teacher_hidden"],
                teacher_shard, problem["labels"], vocab_size=6, vocab_start_index=tp_rank * 4, tp_group=group,
                divergence=divergence, temperature=temperature, kd_ratio=0.6, chunk_size=2,
                compute_dtype=torch.float64,
            ).loss  # fmt: skip

        inputs = (problem["student_hidden"].clone().requires_grad_(), problem["student_head"].clone().requires_grad_())
        results[divergence] = torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6, raise_exception=False)
    return results


def _peak_allocation(tp_rank, group) -> int:
    """Largest single CPU allocation of a forward + backward with N >> chunk (adaptive_kl: the most temporaries)."""
    case = _case("memory", num_tokens=256, padded_vocab=2000, kwargs={"vocab_size": 1990})
    problem = _problem(case)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        _sharded_call(problem, tp_rank, group, vocab_size=1990, divergence="adaptive_kl", kd_ratio=0.5, chunk_size=16)
    return max(event.cpu_memory_usage for event in prof.events())


def _tp2_worker(rank: int, cases: list[dict]) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    assert dist.get_world_size(group) == TP
    results = {"tp_rank": tp_rank}

    for case in cases:
        problem = _problem(case)
        snapshot = {name: tensor.clone() for name, tensor in problem.items()}
        results[case["name"]] = _summary(*_sharded_call(problem, tp_rank, group, **{**PARAMS, **case["kwargs"]}))
        assert all(torch.equal(problem[name], snapshot[name]) for name in problem), "an input was modified"

    # bf16 teacher rows as a read-only numpy view (what the Ray transport delivers).
    problem = _problem(CASES_BY_NAME["forward_kl-v50-T2"])
    problem["teacher_hidden"], bits = _read_only_bf16(problem["teacher_hidden"])
    snapshot = bits.copy()
    kwargs = dict(PARAMS, vocab_size=50, divergence="jsd", temperature=2.0, kd_ratio=0.7, chunk_size=8)
    results["bf16_teacher"] = _summary(*_sharded_call(problem, tp_rank, group, **kwargs))
    results["bf16_teacher"]["unchanged"] = bool(np.array_equal(bits, snapshot))
    problem = _problem(_case("bf16", dtype=torch.bfloat16, kwargs={"vocab_size": 50}))  # a bf16 student too
    problem["teacher_hidden"], _ = _read_only_bf16(problem["teacher_hidden"])
    results["bf16_student"] = _summary(*_sharded_call(problem, tp_rank, group, **kwargs))

    # Groups of size 1 (every rank its own): exactly the single-device loss on the whole padded head.
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    problem = _problem(CASES_BY_NAME["adaptive_kl-v50-T2"])
    hidden, head = problem["student_hidden"].clone().requires_grad_(), torch.nn.Parameter(problem["student_head"])
    kwargs = dict(vocab_size=50, divergence="adaptive_kl", temperature=2.0, kd_ratio=0.7, chunk_size=8)
    out = vocab_parallel_chunked_distill_loss(
        hidden, head, problem["teacher_hidden"], problem["teacher_head"], problem["labels"], vocab_start_index=0,
        tp_group=singles[rank], **kwargs,
    )  # fmt: skip
    out.loss.backward()
    results["tp1"] = _summary(out, hidden.grad, head.grad)
    hidden, head = problem["student_hidden"].clone().requires_grad_(), torch.nn.Parameter(problem["student_head"])
    out = chunked_distill_loss(
        hidden, head, problem["teacher_hidden"], problem["teacher_head"], problem["labels"], **kwargs
    )
    out.loss.backward()
    results["tp1_reference"] = _summary(out, hidden.grad, head.grad)

    results["megatron_ce"] = _megatron_cross_entropy(_problem(_case("ce", kwargs={"vocab_size": 64})), tp_rank, group)
    results["gradcheck"] = _gradcheck(tp_rank, group)
    results["peak_allocation"] = _peak_allocation(tp_rank, group)
    problem = _problem(CASES_BY_NAME["forward_kl-v50-T2"])
    results["errors"] = _errors(problem, tp_rank, group)
    # The group is still in step after all those errors: a good call works and agrees with the first one.
    results["after_errors"] = _summary(*_sharded_call(problem, tp_rank, group, **{**PARAMS, **CASES[0]["kwargs"]}))
    return results


@pytest.fixture(scope="module")
def tp2_results() -> list[dict]:
    return run_spawned(_tp2_worker, TP, tp=TP, args=(CASES,))


# -------------------------------------------------------------------------------------------- the parent's checks


def _reference(problem, **kwargs):
    """naive (autograd on full logits) and chunked losses and gradients on the full padded heads."""
    hidden = problem["student_hidden"].clone().requires_grad_()
    head = problem["student_head"].clone().requires_grad_()
    kwargs = {**PARAMS, **kwargs}
    chunked = chunked_distill_loss(
        hidden, head, problem["teacher_hidden"], problem["teacher_head"], problem["labels"], **kwargs
    )
    chunked_grads = torch.autograd.grad(chunked.loss, [hidden, head])
    kwargs.pop("chunk_size", None)
    teacher_logits = problem["teacher_hidden"].to(head.dtype) @ problem["teacher_head"].to(head.dtype).T
    naive = naive_distill_loss(hidden @ head.T, teacher_logits, problem["labels"], **kwargs)
    naive_grads = torch.autograd.grad(naive.loss, [hidden, head])
    return (chunked, *chunked_grads), (naive, *naive_grads)


def _assert_matches(results: list[dict], reference, *, rtol=1e-5, atol=1e-6) -> None:
    ref, ref_grad_hidden, ref_grad_head = reference
    for tp_rank, got in enumerate(results):
        torch.testing.assert_close(got["loss"], ref.loss.detach(), rtol=rtol, atol=atol)
        assert got["kd_sum"] == pytest.approx(ref.kd_sum, rel=rtol, abs=atol)
        assert got["ce_sum"] == pytest.approx(ref.ce_sum, rel=rtol, abs=atol)
        assert got["num_tokens"] == ref.num_tokens
        # The FULL gradient of the hidden states, on every TP rank; each head shard its rows of the full gradient.
        torch.testing.assert_close(got["grad_hidden"], ref_grad_hidden, rtol=rtol, atol=atol)
        torch.testing.assert_close(got["grad_head"], _rows(ref_grad_head, tp_rank), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(CASES_BY_NAME))
def test_matches_single_device_loss_on_gathered_heads(tp2_results, name):
    case = CASES_BY_NAME[name]
    results = [by_rank[name] for by_rank in tp2_results]
    assert [by_rank["tp_rank"] for by_rank in tp2_results] == list(range(TP))
    assert torch.equal(results[0]["loss"], results[1]["loss"])  # bit-identical on every TP rank
    assert results[0]["kd_sum"] == results[1]["kd_sum"] and results[0]["ce_sum"] == results[1]["ce_sum"]
    torch.testing.assert_close(results[0]["grad_hidden"], results[1]["grad_hidden"], rtol=0, atol=0)
    chunked, naive = _reference(_problem(case), **case["kwargs"])
    _assert_matches(results, chunked)
    _assert_matches(results, naive)
    vocab_size = case["kwargs"]["vocab_size"]
    full_head_grad = torch.cat([r["grad_head"] for r in results])
    assert full_head_grad[vocab_size:].abs().max() == 0  # padding rows get exactly no gradient
    if name == "skew_forward_kl-lambda1":
        assert abs(results[0]["kd_sum"]) < 1e-6 and results[0]["grad_hidden"].abs().max() == 0


def test_adaptive_kl_head_spans_both_shards():
    """The AKL cases are not trivial: at alpha 0.9 the teacher's head holds tokens of both shards."""
    problem = _problem(CASES_BY_NAME["adaptive_kl-alpha0.9"])
    probs = (problem["teacher_hidden"] @ problem["teacher_head"][:50].T).softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    in_head = (sorted_probs.cumsum(-1) <= 0.9) | (torch.arange(50) == 0)
    head_ids = [set(row[mask].tolist()) for row, mask in zip(order, in_head)]
    assert any(min(ids) < 32 <= max(ids) for ids in head_ids)


def test_bf16_read_only_teacher_view(tp2_results):
    results = [by_rank["bf16_teacher"] for by_rank in tp2_results]
    assert all(r["unchanged"] for r in results)  # the read-only shared memory was never written
    problem = _problem(CASES_BY_NAME["forward_kl-v50-T2"])
    problem["teacher_hidden"] = problem["teacher_hidden"].to(torch.bfloat16)
    chunked, _ = _reference(problem, vocab_size=50, divergence="jsd", temperature=2.0, kd_ratio=0.7, chunk_size=8)
    _assert_matches(results, chunked)


def test_bf16_student_hidden_and_head_shard(tp2_results):
    """fp32 math on the same bf16 values as the single-device loss; gradients come back in bf16."""
    problem = _problem(_case("bf16", dtype=torch.bfloat16, kwargs={"vocab_size": 50}))
    (ref, ref_grad_hidden, ref_grad_head), _ = _reference(
        problem, vocab_size=50, divergence="jsd", temperature=2.0, kd_ratio=0.7, chunk_size=8
    )
    for tp_rank, by_rank in enumerate(tp2_results):
        got = by_rank["bf16_student"]
        assert got["grad_hidden"].dtype == got["grad_head"].dtype == torch.bfloat16
        torch.testing.assert_close(got["loss"], ref.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["grad_hidden"].float(), ref_grad_hidden.float(), rtol=1e-2, atol=1e-4)
        torch.testing.assert_close(
            got["grad_head"].float(), _rows(ref_grad_head, tp_rank).float(), rtol=1e-2, atol=1e-4
        )


def test_size_one_group_is_exactly_the_chunked_loss(tp2_results):
    for by_rank in tp2_results:
        got, ref = by_rank["tp1"], by_rank["tp1_reference"]
        assert torch.equal(got["loss"], ref["loss"]) and got["kd_sum"] == ref["kd_sum"]
        assert torch.equal(got["grad_hidden"], ref["grad_hidden"]) and torch.equal(got["grad_head"], ref["grad_head"])


def test_tp_group_none_is_exactly_the_chunked_loss():
    problem = _problem(CASES_BY_NAME["jsd-v30-T1"])
    kwargs = {**PARAMS, **CASES_BY_NAME["jsd-v30-T1"]["kwargs"]}
    (ref, ref_grad_hidden, ref_grad_head), _ = _reference(problem, **kwargs)
    hidden = problem["student_hidden"].clone().requires_grad_()
    head = problem["student_head"].clone().requires_grad_()
    out = vocab_parallel_chunked_distill_loss(
        hidden, head, problem["teacher_hidden"], problem["teacher_head"], problem["labels"], vocab_start_index=0,
        tp_group=None, **kwargs,
    )  # fmt: skip
    grad_hidden, grad_head = torch.autograd.grad(out.loss, [hidden, head])
    assert torch.equal(out.loss, ref.loss) and out.kd_sum == ref.kd_sum and out.ce_sum == ref.ce_sum
    assert torch.equal(grad_hidden, ref_grad_hidden) and torch.equal(grad_head, ref_grad_head)
    with pytest.raises(ValueError, match=re.escape("vocab_start_index=32 but there is no tensor parallelism")):
        vocab_parallel_chunked_distill_loss(
            hidden, head, problem["teacher_hidden"], problem["teacher_head"], problem["labels"],
            vocab_start_index=32, tp_group=None, **kwargs,
        )  # fmt: skip


def test_cross_entropy_and_hidden_gradient_match_megatron(tp2_results):
    """Megatron convention: the input of a column-parallel layer gets the all-reduced gradient; ours already is."""
    for by_rank in tp2_results:
        got = by_rank["megatron_ce"]
        torch.testing.assert_close(got["loss"], got["megatron_loss"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["grad_hidden"], got["megatron_grad_hidden"], rtol=1e-5, atol=1e-7)


def test_never_allocates_logits_of_all_tokens(tp2_results):
    """N=256 tokens, chunks of 16, 1000 vocab rows per shard: any [N, V/TP] (let alone [N, V]) would dominate."""
    local_logits_of_all_tokens = 256 * 1000 * 4
    for by_rank in tp2_results:
        assert 0 < by_rank["peak_allocation"] < local_logits_of_all_tokens / 4, by_rank["peak_allocation"]


@pytest.mark.parametrize("divergence", [div for div, _ in GRADCHECK])
def test_gradcheck_through_the_collectives(tp2_results, divergence):
    assert all(by_rank["gradcheck"][divergence] for by_rank in tp2_results)


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("wrong_start", ["vocab_start_index=0 on TP rank 1, but shards of 32 rows start at tp_rank * 32 = 32"]),
        (
            "rows_differ_on_rank1",
            [
                "TP rank 1 of tp_group rejected its arguments",
                "student_head_shard has 32 rows but teacher_head_shard has 31",
            ],
        ),
        ("labels_differ", ["disagree on labels_fingerprint"]),
        ("hidden_differs", ["disagree on student_hidden_fingerprint"]),
        ("chunk_size_differs", ["disagree on chunk_size (chunk_size="]),
        ("temperature_differs", ["disagree on temperature"]),
        ("vocab_not_covered", ["cover 64 rows but vocab_size is 70"]),
        ("bad_divergence", ["Did you mean 'forward_kl'?"]),
        ("hidden_size", ["student_hidden has hidden size 16 but student_head_shard is (32, 15)"]),
        ("label_out_of_range", ["labels contain token id 50 outside [0, vocab_size=50)"]),
    ],
)
def test_bad_arguments_raise_on_every_rank(tp2_results, name, fragments):
    messages = [by_rank["errors"][name] for by_rank in tp2_results]
    for message in messages:
        assert any(fragment in message for fragment in fragments), messages


def test_group_still_in_step_after_errors(tp2_results):
    for by_rank in tp2_results:
        assert torch.equal(by_rank["after_errors"]["loss"], by_rank[CASES[0]["name"]]["loss"])
