"""Full-logit distillation loss: the reference that the chunked hidden-state loss must reproduce.

It materializes [N, V] logits, so it is for tests, benchmarks and small runs only. Its semantics are the
definition of kdscale's loss: slice both vocabularies to ``[:vocab_size]``, then take the per-token divergence of
the temperature-scaled logits and the cross-entropy of the unscaled student logits on the labels
(:func:`kdscale.losses.divergences.kd_and_ce_per_token`), mix them with ``kd_ratio`` and normalize. There is no
T^2 factor on the KD term (see :func:`naive_distill_loss`).
"""

from __future__ import annotations

import torch

from kdscale.losses.common import (
    DistillLossOutput,
    check_divergence_args,
    check_vocab_and_labels,
    resolve_normalizer,
)
from kdscale.losses.divergences import kd_and_ce_per_token


def naive_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    kd_ratio: float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    adaptive_alpha: float = 0.5,
    normalizer: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> DistillLossOutput:
    """Distillation loss on full logits: ``(kd_ratio * kd_sum + (1 - kd_ratio) * ce_sum) / normalizer``.

    Args:
        student_logits: [N, Vs] student logits (Vs >= vocab_size; columns >= vocab_size are padding and ignored).
        teacher_logits: [N, Vt] teacher logits (Vt >= vocab_size), a constant.
        labels: [N] int64 target token ids in [0, vocab_size) for the cross-entropy term.
        vocab_size: the tokenizer's vocabulary size.
        divergence, jsd_beta, skew_lambda, adaptive_alpha: see :mod:`kdscale.losses.divergences`.
        temperature: both logits are divided by it for the KD term only. The KD term is NOT multiplied by T^2
            (Hinton et al. do, to keep gradient scale across temperatures); scale ``kd_ratio`` or the learning
            rate instead if you need that.
        kd_ratio: weight of the KD sum; ``1 - kd_ratio`` weights the cross-entropy sum.
        normalizer: divisor of both sums (the global number of loss tokens); default N.
        compute_dtype: dtype of the softmax math.

    Returns:
        :class:`DistillLossOutput`; ``loss`` is differentiable w.r.t. ``student_logits``.
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
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(
            f"logits must be [N, V], got student {tuple(student_logits.shape)} and teacher "
            f"{tuple(teacher_logits.shape)}."
        )
    for name, logits in (("student", student_logits), ("teacher", teacher_logits)):
        if logits.shape[1] < vocab_size:
            raise ValueError(
                f"{name} logits have {logits.shape[1]} columns but vocab_size is {vocab_size}: vocab_size must be "
                f"the tokenizer's vocabulary size, which the {name} head must cover."
            )
    num_tokens = student_logits.shape[0]
    if teacher_logits.shape[0] != num_tokens:
        raise ValueError(
            f"student logits have {num_tokens} rows but teacher logits have {teacher_logits.shape[0]}: both must be "
            "the prediction rows of the same micro-batch."
        )
    check_vocab_and_labels(labels, num_tokens, vocab_size)

    student = student_logits[:, :vocab_size].to(compute_dtype)
    teacher = teacher_logits.detach()[:, :vocab_size].to(compute_dtype)
    kd_per_token, ce_per_token = kd_and_ce_per_token(
        student, teacher, labels.to(student.device), temperature=temperature, divergence=divergence,
        jsd_beta=jsd_beta, skew_lambda=skew_lambda, adaptive_alpha=adaptive_alpha,
    )  # fmt: skip
    kd_sum, ce_sum = kd_per_token.sum(), ce_per_token.sum()
    loss = (kd_ratio * kd_sum + (1.0 - kd_ratio) * ce_sum) / resolve_normalizer(normalizer, num_tokens)
    return DistillLossOutput(
        loss=loss, kd_sum=float(kd_sum.detach()), ce_sum=float(ce_sum.detach()), num_tokens=num_tokens
    )
