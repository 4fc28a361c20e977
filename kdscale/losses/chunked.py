"""Chunked "linear + divergence" distillation loss on hidden states: never materializes [N, V] logits.

Design:
    The teacher ships its final-norm hidden states; the student holds the teacher's output head. For N loss tokens
    the loss needs student logits ``h_s @ W_s.T`` and teacher logits ``h_t @ W_t.T``, each [N, V] (for Qwen3,
    V = 151,936: 4096 tokens of fp32 logits are 2.5 GB, per tensor, before softmax temporaries and autograd saves).
    :class:`_ChunkedDistillFunction` walks the tokens in chunks of ``chunk_size`` rows:

    - forward, per chunk (no autograd graph): both logits, the per-token divergence and cross-entropy, summed
      into two scalars. Only the inputs (references, no copies) and the scalars are kept.
    - backward, per chunk: RECOMPUTE both logits and differentiate the chunk's loss w.r.t. its student logits:
      autograd gives the divergence's gradient w.r.t. the student log-probabilities (each divergence is defined
      once, in :mod:`kdscale.losses.divergences`, shared with the full-logit reference), and the log-softmax
      Jacobian and the cross-entropy gradient are applied by hand, in place. Then the linear layer's gradient:
      ``grad_h[c] = d_logits @ W_s`` and ``grad_W_s[:V] += d_logits.T @ h_s[c]``.

    Peak extra memory is O(chunk_size x V): the chunk's logits, softmax temporaries and local autograd graph,
    about 5 [chunk_size, V] tensors in compute_dtype for forward_kl and about 9 for jsd (measured with
    benchmarks/bench_chunked_loss_memory.py); both logits of a chunk become log-probabilities in place. Plus
    O(V x H): the ``compute_dtype`` copies of the heads (made only when a head is in another dtype; created in
    forward and again in backward, never kept in between) and the ``compute_dtype`` accumulator of the student
    head's gradient. Pick ``chunk_size`` so that ~10 x chunk_size x V x 4 bytes fits next to the model.
    The price is compute: 6 matmuls of [chunk, H] x [H, V] per chunk instead of 4 (the logits are recomputed).

Assumptions:
    - Rows are the prediction rows of one micro-batch, in the same order for student and teacher
      (:func:`kdscale.data.batch.gather_prediction_rows`); labels from :func:`kdscale.data.batch.gather_labels`.
    - Head rows >= ``vocab_size`` are padding (Qwen heads have 151,936 or 152,064 rows for a smaller tokenizer):
      both heads are sliced to ``[:vocab_size]``; the padding rows of the student head get a zero gradient.
    - The teacher inputs are constants. ``teacher_hidden`` may be a read-only bf16 view of shared memory and may
      live on the CPU: each chunk is copied (cast) to the student's device; it is never written to.
    - The loss is an ordinary autograd op on the tensors it is given. Under FSDP2 call it inside the root
      module's forward with the unsharded head parameter; nothing distributed happens here.
    - No T^2 factor on the KD term (see :func:`kdscale.losses.reference.naive_distill_loss`).

Usage:
    >>> out = chunked_distill_loss(
    ...     student_hidden, model.lm_head.weight, teacher_hidden, teacher_head, labels,
    ...     vocab_size=len(tokenizer), divergence="forward_kl", temperature=1.0, kd_ratio=0.9,
    ...     normalizer=layout.global_num_loss_tokens)
    >>> out.loss.backward()  # then log out.kd_sum / out.ce_sum summed over micro-batches and ranks
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from kdscale.losses.common import (
    DistillLossOutput,
    check_divergence_args,
    check_vocab_and_labels,
    resolve_normalizer,
)
from kdscale.losses.divergences import constant_log_probs, divergence_from_log_probs, kd_and_ce_per_token


@dataclass(frozen=True)
class _LossConfig:
    """The non-tensor arguments of the chunked loss, already validated."""

    vocab_size: int
    divergence: str
    temperature: float
    kd_ratio: float
    jsd_beta: float
    skew_lambda: float
    adaptive_alpha: float
    chunk_size: int
    normalizer: float
    compute_dtype: torch.dtype


def _grad_wrt_student_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, cfg: _LossConfig
) -> torch.Tensor:
    """d(kd_ratio * KD_sum + (1 - kd_ratio) * CE_sum) / d student_logits for one chunk; overwrites both logits.

    The divergence's gradient w.r.t. the student log-probabilities comes from autograd on
    :func:`divergence_from_log_probs` (the one definition); the log-softmax Jacobian and the cross-entropy
    gradient (softmax - onehot) are applied by hand, in place, so that no autograd graph runs through the
    softmax and the student logits' storage is reused for the log-probabilities.
    """
    ce_weight, temperature = 1.0 - cfg.kd_ratio, cfg.temperature
    rows = torch.arange(student_logits.shape[0], device=student_logits.device)
    log_q = constant_log_probs(student_logits, temperature, inplace=True)  # log_softmax(z / T), in z's storage
    grad = None
    if teacher_logits is not None:
        log_p = constant_log_probs(teacher_logits, temperature, inplace=True)
        leaf = log_q.detach().requires_grad_()
        with torch.enable_grad():
            kd_sum = divergence_from_log_probs(
                leaf, log_p, divergence=cfg.divergence, jsd_beta=cfg.jsd_beta, skew_lambda=cfg.skew_lambda,
                adaptive_alpha=cfg.adaptive_alpha,
            ).sum()  # fmt: skip
            if kd_sum.requires_grad:  # not when the divergence ignores the student (skew_lambda=1)
                (grad,) = torch.autograd.grad(kd_sum, leaf, allow_unused=True)
        del kd_sum, leaf, log_p
    grad = torch.zeros_like(log_q) if grad is None else grad.contiguous().mul_(cfg.kd_ratio)
    grad_ce = None
    if ce_weight > 0 and temperature == 1.0:  # CE = -log_q[label]: its gradient w.r.t. log_q is -onehot
        grad[rows, labels] -= ce_weight
    elif ce_weight > 0:  # CE sees the unscaled logits: softmax(z) - onehot, with softmax(z) = softmax(T * log_q)
        grad_ce = constant_log_probs(log_q * temperature, inplace=True).exp_()
        grad_ce[rows, labels] -= 1.0
    # Back through log_softmax(z / T): dz = (g - softmax(z / T) * sum(g)) / T.
    probs = log_q.exp_()
    grad.sub_(probs.mul_(grad.sum(dim=-1, keepdim=True)))
    del probs, log_q
    if temperature != 1.0:
        grad.div_(temperature)
    if grad_ce is not None:
        grad.add_(grad_ce, alpha=ce_weight)
    return grad


def _head_in_compute_dtype(head: torch.Tensor, cfg: _LossConfig, device: torch.device) -> torch.Tensor:
    """The real-vocabulary rows of a head, detached, in compute_dtype (no copy when they already match)."""
    return head.detach()[: cfg.vocab_size].to(device=device, dtype=cfg.compute_dtype)


def _teacher_logits(teacher_hidden: torch.Tensor, teacher_head: torch.Tensor, cfg: _LossConfig) -> torch.Tensor:
    """[c, V] teacher logits of a chunk; the rows are copied to the head's device (they may be a CPU view)."""
    return teacher_hidden.to(device=teacher_head.device, dtype=cfg.compute_dtype) @ teacher_head.T


class _ChunkedDistillFunction(torch.autograd.Function):
    """loss, kd_sum, ce_sum = f(student_hidden, student_head, teacher_hidden, teacher_head, labels).

    Only ``loss`` is differentiable; gradients flow to ``student_hidden`` and ``student_head``.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,
        student_head: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_head: torch.Tensor,
        labels: torch.Tensor,
        cfg: _LossConfig,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(student_head.device.type, enabled=False):  # the math runs in compute_dtype, always
            loss, kd_total, ce_total = _ChunkedDistillFunction._forward(
                student_hidden, student_head, teacher_hidden, teacher_head, labels, cfg
            )
        ctx.save_for_backward(student_hidden, student_head, teacher_hidden, teacher_head, labels)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(kd_total, ce_total)
        return loss, kd_total, ce_total

    @staticmethod
    def _forward(
        student_hidden: torch.Tensor,
        student_head: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_head: torch.Tensor,
        labels: torch.Tensor,
        cfg: _LossConfig,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = student_head.device
        w_s = _head_in_compute_dtype(student_head, cfg, device)
        w_t = _head_in_compute_dtype(teacher_head, cfg, device)
        kd_total = torch.zeros((), dtype=torch.float64, device=device)
        ce_total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, student_hidden.shape[0], cfg.chunk_size):
            end = start + cfg.chunk_size
            student_logits = student_hidden[start:end].to(cfg.compute_dtype) @ w_s.T
            teacher_logits = _teacher_logits(teacher_hidden[start:end], w_t, cfg)
            kd, ce = kd_and_ce_per_token(
                student_logits, teacher_logits, labels[start:end].to(device), temperature=cfg.temperature,
                divergence=cfg.divergence, jsd_beta=cfg.jsd_beta, skew_lambda=cfg.skew_lambda,
                adaptive_alpha=cfg.adaptive_alpha, logits_writable=True,
            )  # fmt: skip
            del student_logits, teacher_logits
            kd_total += kd.sum()
            ce_total += ce.sum()
        loss = ((cfg.kd_ratio * kd_total + (1.0 - cfg.kd_ratio) * ce_total) / cfg.normalizer).to(cfg.compute_dtype)
        return loss, kd_total, ce_total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, _grad_kd: torch.Tensor, _grad_ce: torch.Tensor):
        student_hidden, student_head, teacher_hidden, teacher_head, labels = ctx.saved_tensors
        need_grad_hidden, need_grad_head = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_grad_hidden or need_grad_head):
            return None, None, None, None, None, None
        with torch.autocast(student_head.device.type, enabled=False):
            grad_hidden, grad_head = _ChunkedDistillFunction._backward(
                grad_loss, student_hidden, student_head, teacher_hidden, teacher_head, labels, ctx.cfg,
                need_grad_hidden=need_grad_hidden, need_grad_head=need_grad_head,
            )  # fmt: skip
        return grad_hidden, grad_head, None, None, None, None

    @staticmethod
    def _backward(
        grad_loss: torch.Tensor,
        student_hidden: torch.Tensor,
        student_head: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_head: torch.Tensor,
        labels: torch.Tensor,
        cfg: _LossConfig,
        *,
        need_grad_hidden: bool,
        need_grad_head: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        device = student_head.device
        w_s = _head_in_compute_dtype(student_head, cfg, device)
        w_t = _head_in_compute_dtype(teacher_head, cfg, device) if cfg.kd_ratio > 0 else None
        grad_hidden = torch.empty_like(student_hidden) if need_grad_hidden else None
        # The head gradient accumulates over chunks in compute_dtype; padding rows stay 0.
        grad_head = torch.zeros(student_head.shape, dtype=cfg.compute_dtype, device=device) if need_grad_head else None
        grad_scale = grad_loss.to(cfg.compute_dtype) / cfg.normalizer

        for start in range(0, student_hidden.shape[0], cfg.chunk_size):
            end = start + cfg.chunk_size
            hidden = student_hidden[start:end].to(cfg.compute_dtype)
            student_logits = hidden @ w_s.T
            teacher_logits = _teacher_logits(teacher_hidden[start:end], w_t, cfg) if w_t is not None else None
            grad_logits = _grad_wrt_student_logits(student_logits, teacher_logits, labels[start:end].to(device), cfg)
            del student_logits, teacher_logits
            grad_logits.mul_(grad_scale)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ w_s
            if grad_head is not None:
                grad_head[: cfg.vocab_size].addmm_(grad_logits.T, hidden)
            del grad_logits

        if grad_head is not None:
            grad_head = grad_head.to(student_head.dtype)
        return grad_hidden, grad_head


def _check_shapes(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    vocab_size: int,
    chunk_size: int,
) -> None:
    for name, tensor in (
        ("student_hidden", student_hidden),
        ("student_head", student_head),
        ("teacher_hidden", teacher_hidden),
        ("teacher_head", teacher_head),
    ):
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}: pass [N, H] rows / [V, H] heads.")
    for who, hidden, head in (("student", student_hidden, student_head), ("teacher", teacher_hidden, teacher_head)):
        if head.shape[0] < vocab_size:
            raise ValueError(
                f"{who} head has {head.shape[0]} rows but vocab_size is {vocab_size}: vocab_size must be the "
                f"tokenizer's vocabulary size (len(tokenizer)), and the {who} head must cover it; rows past "
                "vocab_size are treated as padding."
            )
        if hidden.shape[1] != head.shape[1]:
            raise ValueError(
                f"{who}_hidden has hidden size {hidden.shape[1]} but {who}_head is {tuple(head.shape)} "
                f"(hidden size {head.shape[1]}): pass the {who}'s final-norm hidden states with the {who}'s own "
                "output head."
            )
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student_hidden has {student_hidden.shape[0]} rows but teacher_hidden has {teacher_hidden.shape[0]}: "
            "both must be the prediction rows of the same micro-batch (kdscale.data.batch.gather_prediction_rows)."
        )
    if student_hidden.device != student_head.device or teacher_head.device != student_head.device:
        raise ValueError(
            f"student_hidden ({student_hidden.device}), student_head ({student_head.device}) and teacher_head "
            f"({teacher_head.device}) must be on one device: move the teacher head to the student's device "
            "(teacher_hidden may stay on the CPU)."
        )
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}: e.g. 1024 tokens per chunk.")


def chunked_distill_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int,
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
    """Distillation loss from hidden states, chunked over tokens; equal to :func:`naive_distill_loss` on the logits.

    ``loss = (kd_ratio * kd_sum + (1 - kd_ratio) * ce_sum) / normalizer`` where ``kd_sum`` sums the per-token
    divergence between ``softmax(h_t @ W_t[:V].T / T)`` and ``softmax(h_s @ W_s[:V].T / T)`` and ``ce_sum`` the
    cross-entropy of the unscaled student logits on ``labels``. See the module docstring for design and memory.

    Args:
        student_hidden: [N, Hs] student final-norm hidden states at the prediction rows (any float dtype).
        student_head: [Vs, Hs] student output head weight, Vs >= vocab_size; receives a gradient.
        teacher_hidden: [N, Ht] teacher hidden states; a constant, possibly a read-only bf16 view on the CPU.
        teacher_head: [Vt, Ht] teacher output head, Vt >= vocab_size, on the student's device; a constant.
        labels: [N] int64 token ids in [0, vocab_size).
        vocab_size: the tokenizer's vocabulary size; head rows past it are padding.
        divergence, jsd_beta, skew_lambda, adaptive_alpha: see :mod:`kdscale.losses.divergences`.
        temperature: divides both logits in the KD term (not in the CE term); no T^2 factor.
        kd_ratio: weight of the KD sum in [0, 1]; ``1 - kd_ratio`` weights the CE sum.
        chunk_size: tokens per chunk; peak extra memory grows as chunk_size x vocab_size.
        normalizer: divisor of both sums, e.g. the global number of loss tokens of the step; default N.
        compute_dtype: dtype of the logits and softmax math; the head gradient accumulates in it too.

    Returns:
        :class:`DistillLossOutput` (``kd_sum``/``ce_sum`` cost one host sync).

    Raises:
        ValueError: on any out-of-range argument or inconsistent shapes, naming the value and the fix.
    """
    check_divergence_args(
        divergence=divergence,
        temperature=temperature,
        kd_ratio=kd_ratio,
        jsd_beta=jsd_beta,
        skew_lambda=skew_lambda,
        adaptive_alpha=adaptive_alpha,
        normalizer=normalizer,
        compute_dtype=compute_dtype,
    )
    _check_shapes(student_hidden, student_head, teacher_hidden, teacher_head, vocab_size, chunk_size)
    num_tokens = student_hidden.shape[0]
    check_vocab_and_labels(labels, num_tokens, vocab_size)
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
    loss, kd_sum, ce_sum = _ChunkedDistillFunction.apply(
        student_hidden, student_head, teacher_hidden.detach(), teacher_head.detach(), labels, cfg
    )
    return DistillLossOutput(loss=loss, kd_sum=float(kd_sum), ce_sum=float(ce_sum), num_tokens=num_tokens)
