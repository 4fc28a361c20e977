"""Vocab-parallel chunked distillation loss: student and teacher heads sharded by vocabulary across TP ranks.

Design:
    Under Megatron tensor parallelism each TP rank holds rows ``[vocab_start_index, vocab_start_index + Vp/TP)`` of
    the PADDED student output head, and the teacher head is sharded the same way. The hidden states (student and
    teacher) are replicated across the TP group. :class:`_VocabParallelDistillFunction` walks the tokens in chunks
    (as :mod:`kdscale.losses.chunked` does) and per chunk only ever holds ``[chunk, Vp/TP]`` logits:

    - Normalizers: the global log-sum-exp of each softmax comes from a detached global max (one all-reduce MAX of
      ``[chunk, 2]``) and the sum of exponentials (one all-reduce SUM of ``[chunk, 2 or 3]``: student and teacher at
      temperature T, plus the unscaled student for the CE term when T != 1). With the global normalizers each rank
      has its slice of the exact global log-probabilities.
    - Divergences: every divergence except ``adaptive_kl`` is a sum over the vocabulary of per-entry terms of the
      two log-probabilities (mixtures are entry-wise), so :func:`~kdscale.losses.divergences.divergence_from_log_probs`
      on the local slice gives this rank's partial sum: the ONE definition of each divergence is reused unchanged.
      ``adaptive_kl`` needs each token's head/tail split of the teacher's globally sorted cumulative probability.
      It is found by a DISTRIBUTED EXACT BISECTION, never by gathering probabilities: the head is
      ``{v : p_v >= tau}`` where ``tau`` is the smallest value with ``sum_{u: p_u >= tau} p_u <= alpha`` (capped at
      the top-1 probability, which is always in the head). Each rank sorts its slice once; the global mass above a
      candidate ``tau`` is a ``searchsorted`` per rank plus one all-reduce SUM of ``[chunk]``. Bisecting on the
      bit pattern of the float (non-negative floats order like their bits) gives ``tau`` exactly after as many
      steps as the dtype has bits (32 all-reduces of ``[chunk]`` float64 per chunk for fp32). The gap sums of
      the head and the tail take one more all-reduce, and the stop-gradient weights are the same on every rank.
    - Cross-entropy: like Megatron's ``vocab_parallel_cross_entropy``: ``lse - z[label]`` is counted on the rank
      whose shard holds the label; the other ranks add 0.
    - The per-token sums accumulate locally over all chunks; ONE all-reduce SUM of ``[kd_sum, ce_sum]`` (float64)
      at the end makes ``loss`` identical on every TP rank.
    - Backward RECOMPUTES the local logits per chunk and applies ANALYTIC gradients (no autograd through
      collectives): the global normalizers and the adaptive-KL weights are saved from forward (``[N, 4]``, O(N));
      the divergence's gradient ``g`` w.r.t. the local log-probabilities comes from autograd on the local partial
      sum; the log-softmax Jacobian ``dz = (g - q * sum_V g) / T`` needs the GLOBAL ``sum_V g``: one all-reduce
      SUM of ``[chunk]`` per chunk. (This is the analytic form of "all-reduce the sum-exp with an all-reducing
      backward"; the final per-token sum has an identity backward: every rank seeds the same ``grad_loss``.)
      Then ``grad_head_shard[:n_real] += dz.T @ h`` and ``grad_hidden += dz @ W_shard``; after the last chunk
      ``grad_hidden`` is all-reduced (SUM) over the TP group.
    - Collectives run in the same order on every rank (they depend only on N, chunk_size and the settings, which
      are checked to agree across the group by one small all-gather before anything else).

    Memory: O(chunk_size x Vp/TP) per rank (about the same number of ``[chunk, Vp/TP]`` temporaries as the
    single-device loss, plus a sorted copy and a float64 suffix-sum for ``adaptive_kl``), plus ``[N, Hs]`` for the
    gradient of the hidden states and ``[N, 4]`` saved statistics. Nothing of size ``[N, V]`` or ``[chunk, V]``.

Assumptions:
    - ``student_hidden``, ``teacher_hidden`` and ``labels`` are identical on every rank of ``tp_group`` (the
      replicated input of a column-parallel output layer). A fingerprint (labels, and a strided sample of at most
      64K entries of each hidden tensor) is compared across ranks; a mismatch raises.
    - Shards are contiguous and equal: rank r of ``tp_group`` holds global rows ``[r * R, (r + 1) * R)`` of the
      padded vocabulary Vp = TP * R >= vocab_size (Megatron's ``VocabUtility`` layout). Rows >= ``vocab_size`` are
      padding: they are EXCLUDED explicitly from every softmax and every sum by slicing each shard to its real rows
      (a shard may be all padding); their student-head gradient is exactly 0.
    - GRADIENT CONVENTION for ``student_hidden``: the function returns the FULL gradient (the sum of every vocab
      shard's contribution, already all-reduced across ``tp_group``), identical on every TP rank. It includes the
      semantics of Megatron's ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward), so
      treat ``student_hidden`` like any replicated activation: do NOT wrap it in
      ``copy_to_tensor_model_parallel_region`` (the gradient would be all-reduced twice: TP times too large). With
      sequence parallelism, gather the sequence first with
      ``gather_from_sequence_parallel_region(..., tensor_parallel_output_grad=False)`` (its backward splits the
      full gradient; the default ``True`` reduce-scatters, which expects partial gradients).
    - ``student_head_shard`` receives the gradient of ITS rows only (not reduced across TP: no other rank holds them).
    - Every rank calls backward with the same ``grad_loss`` (as Megatron's schedule does) and with the same inputs
      requiring grad; otherwise collectives would not match.
    - ``adaptive_kl`` ties: tokens whose teacher probabilities tie exactly at the head/tail boundary all go to the
      same side here, where the single-device reference splits ties by sort order (measure zero for real logits).
    - ``tp_group`` None or of size 1: exactly :func:`~kdscale.losses.chunked.chunked_distill_loss` on the shard
      (then the whole padded head; ``vocab_start_index`` must be 0).

Usage:
    >>> from megatron.core import parallel_state
    >>> out = vocab_parallel_chunked_distill_loss(
    ...     hidden, model.output_layer.weight, teacher_hidden, teacher_head_shard, labels,
    ...     vocab_size=len(tokenizer), vocab_start_index=tp_rank * model.output_layer.weight.shape[0],
    ...     tp_group=parallel_state.get_tensor_model_parallel_group(), divergence="jsd", kd_ratio=0.9,
    ...     normalizer=layout.global_num_loss_tokens)
    >>> out.loss.backward()  # hidden.grad is the full (TP-reduced) gradient; the head shard gets its rows' gradient
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from kdscale.losses.chunked import _LossConfig, _teacher_logits, chunked_distill_loss
from kdscale.losses.common import (
    DistillLossOutput,
    check_divergence_args,
    check_vocab_and_labels,
    resolve_normalizer,
)
from kdscale.losses.divergences import DIVERGENCES, divergence_from_log_probs, kl_from_log_probs

# Divergences that are a plain sum over the vocabulary of per-entry terms of (log q, log p): the local slice of
# divergence_from_log_probs is this rank's partial sum. adaptive_kl has its own branch; a new divergence must be
# added to one of the two explicitly (see _local_divergence).
_ENTRYWISE_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
_SUPPORTED_DIVERGENCES = (*_ENTRYWISE_DIVERGENCES, "adaptive_kl")
_FINGERPRINT_SAMPLES = 65536
_DTYPE_CODES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}
# Saved per-token statistics, columns of stats[N, 4].
_LSE_STUDENT, _LSE_TEACHER, _LSE_CE, _W_FKL = range(4)


@dataclass(frozen=True)
class _Shard:
    """This rank's place in the vocabulary: ``num_real_rows`` rows starting at ``vocab_start_index`` are real."""

    group: dist.ProcessGroup
    vocab_start_index: int
    num_real_rows: int


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup) -> torch.Tensor:
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _local_rows(head: torch.Tensor, cfg: _LossConfig, shard: _Shard, device: torch.device) -> torch.Tensor:
    """The real (non-padding) rows of a head shard, detached, in compute_dtype (no copy when they already match)."""
    return head.detach()[: shard.num_real_rows].to(device=device, dtype=cfg.compute_dtype)


def _global_log_normalizers(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: _LossConfig, group: dist.ProcessGroup
) -> torch.Tensor:
    """[c, 3]: global logsumexp of student / T, teacher / T and of the unscaled student (the CE normalizer).

    Two collectives: all-reduce MAX of the local maxima (detached, for stability only), then all-reduce SUM of
    the local sums of exponentials. A shard without real rows contributes -inf to the max and 0 to the sums.
    """
    temperature, num_rows = cfg.temperature, student_logits.shape[0]
    if student_logits.shape[1] > 0:
        maxima = torch.stack([student_logits.amax(dim=-1), teacher_logits.amax(dim=-1)], dim=-1)
    else:
        maxima = student_logits.new_full((num_rows, 2), -math.inf)
    student_max, teacher_max = _all_reduce(maxima, dist.ReduceOp.MAX, group).unbind(-1)

    def sum_exp(logits: torch.Tensor, shift: torch.Tensor, scale: float) -> torch.Tensor:
        shifted = logits - shift.unsqueeze(-1)
        return (shifted.div_(scale) if scale != 1.0 else shifted).exp_().sum(dim=-1)

    sums = [sum_exp(student_logits, student_max, temperature), sum_exp(teacher_logits, teacher_max, temperature)]
    if temperature != 1.0:
        sums.append(sum_exp(student_logits, student_max, 1.0))
    sums = _all_reduce(torch.stack(sums, dim=-1), dist.ReduceOp.SUM, group).log_()
    lse_student = student_max / temperature + sums[:, 0]
    lse_teacher = teacher_max / temperature + sums[:, 1]
    lse_ce = student_max + sums[:, 2] if temperature != 1.0 else lse_student
    return torch.stack([lse_student, lse_teacher, lse_ce], dim=-1)


def _log_probs_(logits: torch.Tensor, lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """In place: ``logits / T - lse`` (this shard's slice of the global log-softmax), clamped to be finite."""
    if temperature != 1.0:
        logits.div_(temperature)
    return logits.sub_(lse.unsqueeze(-1)).clamp_min_(torch.finfo(logits.dtype).min)


def _head_threshold(
    teacher_probs: torch.Tensor, top_prob: torch.Tensor, alpha: float, group: dist.ProcessGroup
) -> torch.Tensor:
    """[c]: per token, the smallest tau with global ``sum_{p_u >= tau} p_u <= alpha``, capped at the top-1 prob.

    Exact distributed bisection on the bit patterns of non-negative floats (ordered like their values): one
    all-reduce SUM of ``[c]`` float64 masses per step, a fixed number of steps (the dtype's bit width) so that
    every rank runs the same collectives. The AKL head of a token is then ``{v : p_v >= tau}``.
    """
    num_rows, num_cols = teacher_probs.shape
    int_dtype = _INT_VIEW[teacher_probs.element_size()]
    sorted_probs = teacher_probs.sort(dim=-1).values  # ascending
    suffix_mass = torch.zeros(num_rows, num_cols + 1, dtype=torch.float64, device=teacher_probs.device)
    suffix_mass[:, :num_cols] = sorted_probs.double().flip(-1).cumsum(-1).flip(-1)
    low = torch.full((num_rows,), -1, dtype=torch.int64, device=teacher_probs.device)  # predicate false (tau < 0)
    high = top_prob.contiguous().view(int_dtype).to(torch.int64)  # predicate true by the top-1 rule
    for _ in range(8 * teacher_probs.element_size()):
        active = high - low > 1
        mid = torch.where(active, (low + high) // 2, high)
        candidate = mid.to(int_dtype).view(teacher_probs.dtype)
        first_above = torch.searchsorted(sorted_probs, candidate.unsqueeze(-1), side="left")
        mass = _all_reduce(suffix_mass.gather(-1, first_above).squeeze(-1), dist.ReduceOp.SUM, group)
        in_head = mass <= alpha
        high = torch.where(active & in_head, mid, high)
        low = torch.where(active & ~in_head, mid, low)
    return high.to(int_dtype).view(teacher_probs.dtype)


def _adaptive_kl_weights(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, alpha: float, group: dist.ProcessGroup
) -> torch.Tensor:
    """[c] stop-gradient w_fkl of AKL (w_rkl = 1 - w_fkl): the head share of the global gap sum |p - q|."""
    with torch.no_grad():
        probs = teacher_log_probs.exp()
        local_top = probs.amax(dim=-1) if probs.shape[1] > 0 else probs.new_zeros(probs.shape[0])
        top_prob = _all_reduce(local_top, dist.ReduceOp.MAX, group)
        in_head = probs >= _head_threshold(probs, top_prob, alpha, group).unsqueeze(-1)
        gap = probs.sub_(student_log_probs.exp()).abs_()
        gap_sums = torch.stack([gap.sum(dim=-1), gap.masked_fill_(~in_head, 0.0).sum(dim=-1)], dim=-1)
        gap_total, gap_head = _all_reduce(gap_sums, dist.ReduceOp.SUM, group).unbind(-1)
        return torch.where(gap_total > 0, gap_head / gap_total.clamp_min(torch.finfo(gap_total.dtype).tiny), 0.5)


def _local_divergence(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, w_fkl: torch.Tensor, cfg: _LossConfig
) -> torch.Tensor:
    """[c]: this shard's partial sum of the per-token divergence (global log-probabilities, local columns)."""
    if cfg.divergence == "adaptive_kl":  # the composition of divergences.py's AKL with the global weights
        return w_fkl * kl_from_log_probs(teacher_log_probs, student_log_probs) + (1.0 - w_fkl) * kl_from_log_probs(
            student_log_probs, teacher_log_probs
        )
    return divergence_from_log_probs(
        student_log_probs, teacher_log_probs, divergence=cfg.divergence, jsd_beta=cfg.jsd_beta,
        skew_lambda=cfg.skew_lambda, adaptive_alpha=cfg.adaptive_alpha,
    )  # fmt: skip


def _local_labels(labels: torch.Tensor, shard: _Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """(owned [c] bool, column [c, 1] int64): whether this shard holds each label, and its local column (clamped)."""
    local = labels - shard.vocab_start_index
    owned = (local >= 0) & (local < shard.num_real_rows)
    return owned, local.clamp(0, max(shard.num_real_rows - 1, 0)).unsqueeze(-1)


class _VocabParallelDistillFunction(torch.autograd.Function):
    """loss, kd_sum, ce_sum = f(student_hidden, student_head_shard, teacher_hidden, teacher_head_shard, labels).

    Only ``loss`` is differentiable. ``student_hidden`` gets the TP-all-reduced gradient; the head shard its own.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_head, teacher_hidden, teacher_head, labels, cfg, shard):
        with torch.autocast(student_head.device.type, enabled=False):  # the math runs in compute_dtype, always
            loss, kd_total, ce_total, stats = _VocabParallelDistillFunction._forward(
                student_hidden, student_head, teacher_hidden, teacher_head, labels, cfg, shard
            )
        ctx.save_for_backward(student_hidden, student_head, teacher_hidden, teacher_head, labels, stats)
        ctx.cfg, ctx.shard = cfg, shard
        ctx.mark_non_differentiable(kd_total, ce_total)
        return loss, kd_total, ce_total

    @staticmethod
    def _forward(student_hidden, student_head, teacher_hidden, teacher_head, labels, cfg, shard):
        device, group, temperature = student_head.device, shard.group, cfg.temperature
        w_s = _local_rows(student_head, cfg, shard, device)
        w_t = _local_rows(teacher_head, cfg, shard, device)
        stats = torch.empty(student_hidden.shape[0], 4, dtype=cfg.compute_dtype, device=device)
        kd_total = torch.zeros((), dtype=torch.float64, device=device)
        ce_total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, student_hidden.shape[0], cfg.chunk_size):
            end = start + cfg.chunk_size
            student_logits = student_hidden[start:end].to(cfg.compute_dtype) @ w_s.T
            teacher_logits = _teacher_logits(teacher_hidden[start:end], w_t, cfg)
            lse = _global_log_normalizers(student_logits, teacher_logits, cfg, group)
            if shard.num_real_rows > 0:  # CE from the unscaled logits, on the rank that holds the label
                owned, column = _local_labels(labels[start:end].to(device), shard)
                label_logit = student_logits.gather(-1, column).squeeze(-1)
                ce_total += torch.where(owned, lse[:, _LSE_CE] - label_logit, 0.0).sum(dtype=torch.float64)
            log_q = _log_probs_(student_logits, lse[:, _LSE_STUDENT], temperature)
            log_p = _log_probs_(teacher_logits, lse[:, _LSE_TEACHER], temperature)
            if cfg.divergence == "adaptive_kl":
                w_fkl = _adaptive_kl_weights(log_q, log_p, cfg.adaptive_alpha, group)
            else:
                w_fkl = torch.full_like(lse[:, 0], 0.5)  # unused
            kd_total += _local_divergence(log_q, log_p, w_fkl, cfg).sum(dtype=torch.float64)
            del student_logits, teacher_logits, log_q, log_p
            stats[start:end, :3] = lse
            stats[start:end, _W_FKL] = w_fkl
        totals = _all_reduce(torch.stack([kd_total, ce_total]), dist.ReduceOp.SUM, group)
        kd_total, ce_total = totals[0], totals[1]
        loss = ((cfg.kd_ratio * kd_total + (1.0 - cfg.kd_ratio) * ce_total) / cfg.normalizer).to(cfg.compute_dtype)
        return loss, kd_total, ce_total, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        student_hidden, student_head, teacher_hidden, teacher_head, labels, stats = ctx.saved_tensors
        need_grad_hidden, need_grad_head = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_grad_hidden or need_grad_head):
            return None, None, None, None, None, None, None
        with torch.autocast(student_head.device.type, enabled=False):
            grad_hidden, grad_head = _VocabParallelDistillFunction._backward(
                grad_loss, student_hidden, student_head, teacher_hidden, teacher_head, labels, stats, ctx.cfg,
                ctx.shard, need_grad_hidden=need_grad_hidden, need_grad_head=need_grad_head,
            )  # fmt: skip
        return grad_hidden, grad_head, None, None, None, None, None

    @staticmethod
    def _backward(
        grad_loss, student_hidden, student_head, teacher_hidden, teacher_head, labels, stats, cfg, shard,
        *, need_grad_hidden: bool, need_grad_head: bool,
    ):  # fmt: skip
        device, group, temperature = student_head.device, shard.group, cfg.temperature
        ce_weight = 1.0 - cfg.kd_ratio
        w_s = _local_rows(student_head, cfg, shard, device)
        w_t = _local_rows(teacher_head, cfg, shard, device) if cfg.kd_ratio > 0 else None
        # Local contributions accumulate in compute_dtype; grad_hidden is all-reduced once at the end.
        grad_hidden = (
            torch.zeros(student_hidden.shape, dtype=cfg.compute_dtype, device=device) if need_grad_hidden else None
        )
        grad_head = torch.zeros(student_head.shape, dtype=cfg.compute_dtype, device=device) if need_grad_head else None
        grad_scale = grad_loss.to(cfg.compute_dtype) / cfg.normalizer
        has_rows = shard.num_real_rows > 0

        for start in range(0, student_hidden.shape[0], cfg.chunk_size):
            end = start + cfg.chunk_size
            hidden = student_hidden[start:end].to(cfg.compute_dtype)
            student_logits = hidden @ w_s.T
            chunk_stats = stats[start:end]
            owned, column = _local_labels(labels[start:end].to(device), shard)
            minus_onehot = -owned.to(cfg.compute_dtype).unsqueeze(-1)  # -1 at the label's column, if held here
            grad_ce = None
            if ce_weight > 0 and temperature != 1.0:  # CE sees the unscaled logits: softmax(z) - onehot
                grad_ce = (student_logits - chunk_stats[:, _LSE_CE].unsqueeze(-1)).exp_()
                if has_rows:
                    grad_ce.scatter_add_(-1, column, minus_onehot)
            log_q = _log_probs_(student_logits, chunk_stats[:, _LSE_STUDENT], temperature)
            grad = None
            if w_t is not None:
                teacher_logits = _teacher_logits(teacher_hidden[start:end], w_t, cfg)
                log_p = _log_probs_(teacher_logits, chunk_stats[:, _LSE_TEACHER], temperature)
                leaf = log_q.detach().requires_grad_()
                with torch.enable_grad():
                    kd_sum = _local_divergence(leaf, log_p, chunk_stats[:, _W_FKL], cfg).sum()
                    if kd_sum.requires_grad:  # not when the divergence ignores the student (skew_lambda=1)
                        (grad,) = torch.autograd.grad(kd_sum, leaf, allow_unused=True)
                del kd_sum, leaf, log_p, teacher_logits
            grad = torch.zeros_like(log_q) if grad is None else grad.contiguous().mul_(cfg.kd_ratio)
            if ce_weight > 0 and temperature == 1.0 and has_rows:  # CE = -log_q[label]: d/d log_q = -onehot
                grad.scatter_add_(-1, column, minus_onehot * ce_weight)
            # Back through the GLOBAL log_softmax(z / T): dz = (g - q * sum_V g) / T; sum_V g spans every shard.
            grad_sum = _all_reduce(grad.sum(dim=-1), dist.ReduceOp.SUM, group)
            grad.sub_(log_q.exp_().mul_(grad_sum.unsqueeze(-1)))
            del log_q
            if temperature != 1.0:
                grad.div_(temperature)
            if grad_ce is not None:
                grad.add_(grad_ce, alpha=ce_weight)
            grad.mul_(grad_scale)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ w_s
            if grad_head is not None:
                grad_head[: shard.num_real_rows].addmm_(grad.T, hidden)
            del grad, grad_ce

        if grad_hidden is not None:  # the copy-to-TP-region backward: every shard's contribution, on every rank
            grad_hidden = _all_reduce(grad_hidden, dist.ReduceOp.SUM, group).to(student_hidden.dtype)
        if grad_head is not None:
            grad_head = grad_head.to(student_head.dtype)
        return grad_hidden, grad_head


def _check_local_args(
    student_hidden: torch.Tensor,
    student_head_shard: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_shard: torch.Tensor,
    *,
    vocab_start_index: int,
    chunk_size: int,
) -> None:
    """Shapes, devices and settings that one rank can check alone; raises ``ValueError`` naming the fix."""
    for name, tensor in (
        ("student_hidden", student_hidden),
        ("student_head_shard", student_head_shard),
        ("teacher_hidden", teacher_hidden),
        ("teacher_head_shard", teacher_head_shard),
    ):
        if tensor.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D, got shape {tuple(tensor.shape)}: pass [N, H] rows / [Vp/TP, H] shards."
            )
    if student_head_shard.shape[0] != teacher_head_shard.shape[0]:
        raise ValueError(
            f"student_head_shard has {student_head_shard.shape[0]} rows but teacher_head_shard has "
            f"{teacher_head_shard.shape[0]}: both must be this rank's rows [vocab_start_index, vocab_start_index + "
            "Vp/TP) of the same padded vocabulary (pad the teacher head to the student's padded size Vp first)."
        )
    for who, hidden, head in (
        ("student", student_hidden, student_head_shard),
        ("teacher", teacher_hidden, teacher_head_shard),
    ):
        if hidden.shape[1] != head.shape[1]:
            raise ValueError(
                f"{who}_hidden has hidden size {hidden.shape[1]} but {who}_head_shard is {tuple(head.shape)} "
                f"(hidden size {head.shape[1]}): pass the {who}'s final-norm hidden states with the {who}'s own "
                "output-head shard."
            )
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student_hidden has {student_hidden.shape[0]} rows but teacher_hidden has {teacher_hidden.shape[0]}: "
            "both must be the prediction rows of the same micro-batch (kdscale.data.batch.gather_prediction_rows)."
        )
    if student_hidden.device != student_head_shard.device or teacher_head_shard.device != student_head_shard.device:
        raise ValueError(
            f"student_hidden ({student_hidden.device}), student_head_shard ({student_head_shard.device}) and "
            f"teacher_head_shard ({teacher_head_shard.device}) must be on one device: move the teacher head shard "
            "to the student's device (teacher_hidden may stay on the CPU)."
        )
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}: e.g. 1024 tokens per chunk.")
    if not (isinstance(vocab_start_index, int) and vocab_start_index >= 0):
        raise ValueError(
            f"vocab_start_index must be an integer >= 0, got {vocab_start_index!r}: pass the first global row of "
            "this rank's shard (tp_rank * rows per shard)."
        )


def _fingerprint(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float64 sum over a strided sample of at most 64K entries: cheap, identical for identical tensors."""
    flat = tensor.detach().reshape(-1)
    step = max(1, -(-flat.numel() // _FINGERPRINT_SAMPLES))
    return flat[::step].to(device=device, dtype=torch.float64).sum()


# Columns of the metadata every rank contributes; all but the first three must agree across the group.
_META = (
    "error", "tp_rank", "vocab_start_index", "shard_rows", "num_tokens", "vocab_size", "chunk_size", "divergence",
    "temperature", "kd_ratio", "jsd_beta", "skew_lambda", "adaptive_alpha", "normalizer", "compute_dtype",
    "student_hidden_size", "teacher_hidden_size", "labels_fingerprint", "student_hidden_fingerprint",
    "teacher_hidden_fingerprint",
)  # fmt: skip
_FINGERPRINTS = ("labels_fingerprint", "student_hidden_fingerprint", "teacher_hidden_fingerprint")


def _exchange_and_check(
    tensors: tuple[torch.Tensor, ...],
    settings: dict[str, float],
    *,
    local_error: ValueError | None,
    group: dist.ProcessGroup,
    device: torch.device,
) -> None:
    """One all-gather of every rank's shard layout and settings; raise the SAME ``ValueError`` on every rank.

    Runs even when this rank already failed its local checks, so that no rank is left waiting in a collective.
    """
    student_hidden, student_head_shard, teacher_hidden, labels = tensors
    tp_rank, tp_size = dist.get_rank(group), dist.get_world_size(group)
    values = dict(settings, error=float(local_error is not None), tp_rank=float(tp_rank))
    values["shard_rows"] = float(student_head_shard.shape[0]) if student_head_shard.dim() else -1.0
    values["num_tokens"] = float(student_hidden.shape[0]) if student_hidden.dim() else -1.0
    values["student_hidden_size"] = float(student_hidden.shape[-1]) if student_hidden.dim() else -1.0
    values["teacher_hidden_size"] = float(teacher_hidden.shape[-1]) if teacher_hidden.dim() else -1.0
    local = torch.tensor([values.get(name, 0.0) for name in _META], dtype=torch.float64, device=device)
    if local_error is None:
        fingerprints = [_fingerprint(t, device) for t in (labels, student_hidden, teacher_hidden)]
        local[_META.index(_FINGERPRINTS[0]) :] = torch.stack(fingerprints)
    gathered = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(gathered, local, group=group)
    if local_error is not None:
        raise local_error
    table = [dict(zip(_META, row.tolist())) for row in gathered]
    for row in table:
        if row["error"]:
            raise ValueError(
                f"TP rank {int(row['tp_rank'])} of tp_group rejected its arguments (its own ValueError says why); "
                "every rank raises so that none is left waiting in a collective."
            )
    mine = table[tp_rank]
    for name in _META[3:]:
        for row in table:
            same = (
                math.isclose(row[name], mine[name], rel_tol=1e-6, abs_tol=1e-9)
                if name in _FINGERPRINTS
                else row[name] == mine[name]
            )
            if not same:
                what = "the contents" if name in _FINGERPRINTS else f"{name}={row[name]:g} vs {mine[name]:g}"
                raise ValueError(
                    f"TP ranks {int(row['tp_rank'])} and {tp_rank} of tp_group disagree on {name} ({what}): every TP "
                    "rank must pass the same rows (student/teacher hidden states and labels of the same micro-batch), "
                    "equal shard sizes and the same loss settings."
                )
    rows = int(mine["shard_rows"])
    for row in table:
        if int(row["vocab_start_index"]) != int(row["tp_rank"]) * rows:
            raise ValueError(
                f"vocab_start_index={int(row['vocab_start_index'])} on TP rank {int(row['tp_rank'])}, but shards of "
                f"{rows} rows start at tp_rank * {rows} = {int(row['tp_rank']) * rows}: pass the first global row of "
                "the rank's shard (Megatron: tp_rank * output_layer.weight.shape[0])."
            )
    if tp_size * rows < mine["vocab_size"]:
        raise ValueError(
            f"the {tp_size} head shards of {rows} rows cover {tp_size * rows} rows but vocab_size is "
            f"{int(mine['vocab_size'])}: vocab_size must be the tokenizer's vocabulary size, and the padded heads "
            "must cover it."
        )


def vocab_parallel_chunked_distill_loss(
    student_hidden: torch.Tensor,
    student_head_shard: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    vocab_start_index: int,
    tp_group: dist.ProcessGroup | None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    kd_ratio: float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    adaptive_alpha: float = 0.5,
    chunk_size: int = 1024,
    normalizer: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> DistillLossOutput:
    """:func:`~kdscale.losses.chunked.chunked_distill_loss` with both heads sharded by vocabulary over ``tp_group``.

    Same loss, same settings, same result (to floating-point tolerance) as the single-device loss on the gathered
    heads; never gathers [N, V] or [chunk, V]. See the module docstring for the design, the collectives and the
    gradient convention.

    Args:
        student_hidden: [N, Hs] student final-norm hidden states, identical on every TP rank. Its gradient is the
            FULL gradient, already all-reduced across ``tp_group`` (do not also wrap it in
            ``copy_to_tensor_model_parallel_region``).
        student_head_shard: [Vp/TP, Hs] this rank's rows of the padded student head; gets its rows' gradient
            (padding rows: exactly 0).
        teacher_hidden: [N, Ht] teacher hidden states (a constant; may be a read-only bf16 view on the CPU).
        teacher_head_shard: [Vp/TP, Ht] this rank's rows of the padded teacher head, same rows as the student's.
        labels: [N] int64 token ids in [0, vocab_size), identical on every TP rank.
        vocab_size: the tokenizer's vocabulary size; global rows >= vocab_size are padding and excluded.
        vocab_start_index: the first global row of this rank's shards (tp_rank * Vp/TP).
        tp_group: the tensor-parallel process group; None or a group of size 1 runs the single-device loss.
        divergence, temperature, kd_ratio, jsd_beta, skew_lambda, adaptive_alpha, chunk_size, normalizer,
            compute_dtype: as in :func:`~kdscale.losses.chunked.chunked_distill_loss`.

    Returns:
        :class:`DistillLossOutput`: ``loss`` identical on every TP rank; ``kd_sum``/``ce_sum`` global over the
        vocabulary (sums over this micro-batch's N tokens).

    Raises:
        ValueError: on any out-of-range argument, inconsistent shapes, or shards, settings or inputs that differ
            across the TP group, on EVERY rank of the group (no rank is left waiting in a collective).
    """
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        if vocab_start_index != 0:
            raise ValueError(
                f"vocab_start_index={vocab_start_index!r} but there is no tensor parallelism (tp_group is None or "
                "of size 1): the head shard is the whole padded head, which starts at row 0."
            )
        return chunked_distill_loss(
            student_hidden, student_head_shard, teacher_hidden, teacher_head_shard, labels, vocab_size=vocab_size,
            divergence=divergence, temperature=temperature, kd_ratio=kd_ratio, jsd_beta=jsd_beta,
            skew_lambda=skew_lambda, adaptive_alpha=adaptive_alpha, chunk_size=chunk_size, normalizer=normalizer,
            compute_dtype=compute_dtype,
        )  # fmt: skip

    local_error = None
    try:
        check_divergence_args(
            divergence=divergence, temperature=temperature, kd_ratio=kd_ratio, jsd_beta=jsd_beta,
            skew_lambda=skew_lambda, adaptive_alpha=adaptive_alpha, normalizer=normalizer, compute_dtype=compute_dtype,
        )  # fmt: skip
        if divergence not in _SUPPORTED_DIVERGENCES:  # a divergence added to DIVERGENCES but not here
            raise ValueError(
                f"divergence={divergence!r} has no vocab-parallel form yet (supported: "
                f"{', '.join(_SUPPORTED_DIVERGENCES)}): add it to kdscale.losses.vocab_parallel."
            )
        _check_local_args(
            student_hidden, student_head_shard, teacher_hidden, teacher_head_shard,
            vocab_start_index=vocab_start_index, chunk_size=chunk_size,
        )  # fmt: skip
        check_vocab_and_labels(labels, student_hidden.shape[0], vocab_size)
        if compute_dtype not in _DTYPE_CODES:
            raise ValueError(f"compute_dtype must be one of {_DTYPE_CODES}, got {compute_dtype!r}: use torch.float32.")
    except ValueError as exc:
        local_error = exc
    settings = {
        "vocab_start_index": vocab_start_index if isinstance(vocab_start_index, int) else -1,
        "vocab_size": vocab_size,
        "chunk_size": chunk_size if isinstance(chunk_size, int) else -1,
        "divergence": DIVERGENCES.index(divergence) if divergence in DIVERGENCES else -1,
        "temperature": temperature,
        "kd_ratio": kd_ratio,
        "jsd_beta": jsd_beta,
        "skew_lambda": skew_lambda,
        "adaptive_alpha": adaptive_alpha,
        "normalizer": -1.0 if normalizer is None else normalizer,
        "compute_dtype": _DTYPE_CODES.index(compute_dtype) if compute_dtype in _DTYPE_CODES else -1,
    }
    _exchange_and_check(
        (student_hidden, student_head_shard, teacher_hidden, labels),
        {name: float(value) for name, value in settings.items()},
        local_error=local_error,
        group=tp_group,
        device=student_head_shard.device,
    )

    num_tokens = student_hidden.shape[0]
    cfg = _LossConfig(
        vocab_size=vocab_size,
        divergence=divergence,
        temperature=float(temperature),
        kd_ratio=float(kd_ratio),
        jsd_beta=float(jsd_beta),
        skew_lambda=float(skew_lambda),
        adaptive_alpha=float(adaptive_alpha),
        chunk_size=chunk_size,
        normalizer=resolve_normalizer(normalizer, num_tokens),
        compute_dtype=compute_dtype,
    )
    shard = _Shard(
        group=tp_group,
        vocab_start_index=vocab_start_index,
        num_real_rows=max(0, min(student_head_shard.shape[0], vocab_size - vocab_start_index)),
    )
    loss, kd_sum, ce_sum = _VocabParallelDistillFunction.apply(
        student_hidden, student_head_shard, teacher_hidden.detach(), teacher_head_shard.detach(), labels, cfg, shard
    )
    return DistillLossOutput(loss=loss, kd_sum=float(kd_sum), ce_sum=float(ce_sum), num_tokens=num_tokens)
