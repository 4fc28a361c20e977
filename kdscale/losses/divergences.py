"""Per-token divergences between a teacher and a student next-token distribution: the ONE definition of each.

Both the chunked hidden-state loss (:mod:`kdscale.losses.chunked`) and the full-logit reference
(:mod:`kdscale.losses.reference`) compute their terms with :func:`kd_and_ce_per_token`, which (like the public
:func:`per_token_divergence`) calls :func:`divergence_from_log_probs`: the two paths cannot drift apart.

Notation, per token: ``p = softmax(teacher_logits)`` (the teacher), ``q = softmax(student_logits)`` (the
student), both over the real vocabulary; the caller has already divided the logits by the temperature and sliced
them to ``[:, :vocab_size]``. All math is in log space: log-probabilities come from ``log_softmax`` and mixtures
from ``logaddexp``, so nothing underflows to ``log(0)``. Teacher log-probabilities are clamped to the dtype's most
negative finite value, so a teacher probability of exactly 0 (a -inf logit, e.g. a masked token) contributes 0
to ``p * log(p / x)`` instead of NaN. Student logits are assumed finite (they come from a matmul).

Divergences (each returns a non-negative [n] tensor, 0 when p == q):

- ``forward_kl``:       KL(p || q) = sum_v p (log p - log q). Mode-covering; the classic KD loss.
- ``reverse_kl``:       KL(q || p). Mode-seeking (MiniLLM).
- ``jsd``:              beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q, beta in (0, 1):
                        the generalized JSD of GKD (Agarwal et al. 2024) as TRL's ``generalized_jsd_loss`` writes it
                        (beta weights the teacher, both in the mixture and in the sum); beta = 0.5 is the usual JSD.
                        TRL maps beta = 0 / 1 to forward / reverse KL; here those are the divergences of those names.
- ``skew_forward_kl``:  KL(p || lambda * p + (1 - lambda) * q) (DistiLLM, Ko et al. 2024; lambda = 0 is forward KL).
- ``skew_reverse_kl``:  KL(q || lambda * q + (1 - lambda) * p) (DistiLLM; lambda = 0 is reverse KL).
                        DistiLLM's code drops the entropy term of the skew FKL (a cross-entropy against the mixture);
                        here both are true KLs, so they are 0 at p == q. The gradient w.r.t. the student is the same.
- ``tvd``:              0.5 * sum_v |p - q| (total variation distance).
- ``adaptive_kl``:      AKL (Wu et al. 2024, "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for
                        Large Language Models", arXiv:2404.02657), following the authors' code:
                        sort the vocabulary by teacher probability, descending; the HEAD is the sorted prefix whose
                        teacher cumulative probability is <= alpha, plus always the top-1 token; the TAIL is the rest.
                        g_head = sum_{v in head} |p_v - q_v|, g_tail = sum_{v in tail} |p_v - q_v|, and
                        AKL = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p).
                        The two weights are stop-gradient (computed under ``no_grad``, as the authors detach the
                        student probabilities); when p == q (both gaps 0) the weights are 0.5 / 0.5.
"""

from __future__ import annotations

import math

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "adaptive_kl")


def kl_from_log_probs(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities [n, V] -> [n].

    ``log_a`` must be finite (clamp a -inf with :func:`constant_log_probs`); a == 0 then contributes 0.
    """
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b) from log-probabilities, exact at weight_a = 0 or 1."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def constant_log_probs(logits: torch.Tensor, temperature: float = 1.0, *, inplace: bool = False) -> torch.Tensor:
    """``log_softmax(logits / T)`` without autograd, clamped to be finite; in place on ``logits`` if ``inplace``.

    Used for the teacher (a constant) and, in the chunked loss, for scratch student logits whose gradient is
    applied by hand. A probability of exactly 0 (a -inf logit) becomes the dtype's most negative finite
    log-probability, so that its terms ``0 * log(0 / x)`` evaluate to 0 instead of NaN.
    """
    with torch.no_grad():
        out = logits if inplace else logits.clone()
        if temperature != 1.0:
            out.div_(temperature)
        out.sub_(out.logsumexp(dim=-1, keepdim=True))
        return out.clamp_min_(torch.finfo(out.dtype).min)


def _adaptive_weights(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stop-gradient AKL weights (w_fkl, w_rkl), each [n]: the head and tail shares of the gap |p - q|."""
    with torch.no_grad():
        p = log_p.exp()
        sorted_p, order = p.sort(dim=-1, descending=True)
        sorted_gap = p.sub_(log_q.exp()).abs_().gather(-1, order)
        del p, order
        in_tail = sorted_p.cumsum_(dim=-1) > alpha
        in_tail[..., 0] = False  # the top-1 token is always in the head
        gap_total = sorted_gap.sum(dim=-1)
        gap_head = sorted_gap.masked_fill_(in_tail, 0.0).sum(dim=-1)
        w_fkl = torch.where(gap_total > 0, gap_head / gap_total.clamp_min(torch.finfo(gap_total.dtype).tiny), 0.5)
        return w_fkl, 1.0 - w_fkl


def divergence_from_log_probs(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    *,
    divergence: str,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    adaptive_alpha: float = 0.5,
) -> torch.Tensor:
    """The definition of each divergence, on [n, V] log-probabilities (teacher ones finite) -> [n].

    Differentiable w.r.t. ``student_log_probs``; the teacher side is a constant.
    """
    log_q, log_p = student_log_probs, teacher_log_probs.detach()
    if divergence == "forward_kl":
        return kl_from_log_probs(log_p, log_q)
    if divergence == "reverse_kl":
        return kl_from_log_probs(log_q, log_p)
    if divergence == "jsd":
        log_m = log_mixture(log_p, log_q, jsd_beta)
        return jsd_beta * kl_from_log_probs(log_p, log_m) + (1.0 - jsd_beta) * kl_from_log_probs(log_q, log_m)
    if divergence == "skew_forward_kl":
        return kl_from_log_probs(log_p, log_mixture(log_p, log_q, skew_lambda))
    if divergence == "skew_reverse_kl":
        return kl_from_log_probs(log_q, log_mixture(log_q, log_p, skew_lambda))
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    if divergence == "adaptive_kl":
        w_fkl, w_rkl = _adaptive_weights(log_p, log_q, adaptive_alpha)
        return w_fkl * kl_from_log_probs(log_p, log_q) + w_rkl * kl_from_log_probs(log_q, log_p)
    raise ValueError(f"divergence={divergence!r} is not a known divergence; valid ones: {', '.join(DIVERGENCES)}.")


def per_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    adaptive_alpha: float = 0.5,
) -> torch.Tensor:
    """Divergence between teacher and student per token (see the module docstring for the formulas).

    Args:
        student_logits: [n, V] student logits, already divided by the temperature and sliced to the real vocab.
        teacher_logits: [n, V] teacher logits, same scaling and vocabulary; treated as a constant, not modified.
        divergence: one of :data:`DIVERGENCES`.
        jsd_beta, skew_lambda, adaptive_alpha: the parameters of ``jsd``, the skew KLs, and ``adaptive_kl``.

    Returns:
        [n] tensor in the logits' dtype, differentiable w.r.t. ``student_logits``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "slice both to [:, :vocab_size] first."
        )
    return divergence_from_log_probs(
        torch.log_softmax(student_logits, dim=-1),
        constant_log_probs(teacher_logits),
        divergence=divergence,
        jsd_beta=jsd_beta,
        skew_lambda=skew_lambda,
        adaptive_alpha=adaptive_alpha,
    )


def kd_and_ce_per_token(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    divergence: str,
    jsd_beta: float,
    skew_lambda: float,
    adaptive_alpha: float,
    with_ce: bool = True,
    logits_writable: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The per-token KD and CE terms of kdscale's loss, as both the chunked and the full-logit path compute them.

    KD: ``divergence(softmax(teacher / T), softmax(student / T))``; skipped (None) when ``teacher_logits`` is None.
    CE: cross-entropy of the UNSCALED student logits on ``labels``; skipped (None) when ``with_ce`` is False.
    Logits are [n, V], already sliced to the real vocabulary and in the compute dtype. ``logits_writable``
    (no autograd: the chunked loss's forward) lets both logits be overwritten by their log-probabilities.
    """
    index = labels.unsqueeze(-1)
    ce = None
    if with_ce and temperature != 1.0:  # from the unscaled logits; logsumexp keeps no [n, V] tensor for backward
        ce = student_logits.logsumexp(dim=-1) - student_logits.gather(-1, index).squeeze(-1)
    if logits_writable:
        log_q = constant_log_probs(student_logits, temperature, inplace=True)
    else:
        log_q = torch.log_softmax(student_logits / temperature if temperature != 1.0 else student_logits, dim=-1)
    if with_ce and temperature == 1.0:  # log_softmax of the unscaled logits is already at hand
        ce = -log_q.gather(-1, index).squeeze(-1)
    kd = None
    if teacher_logits is not None:
        log_p = constant_log_probs(teacher_logits, temperature, inplace=logits_writable)
        kd = divergence_from_log_probs(
            log_q, log_p, divergence=divergence, jsd_beta=jsd_beta, skew_lambda=skew_lambda,
            adaptive_alpha=adaptive_alpha,
        )  # fmt: skip
    return kd, ce
