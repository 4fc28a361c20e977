"""Cross-tokenizer distillation objectives: KD on the shared vocabulary, and DSKD's teacher-to-student projection.

When the teacher and the student have different tokenizers, their logits live in different vocabularies and
their rows sit at different positions. :mod:`kdscale.algorithms.token_alignment` pairs the prediction rows that
predict the same text from the same prefix (:func:`~kdscale.algorithms.token_alignment.prediction_pairs`) and the
vocabulary entries with the same bytes (:func:`~kdscale.algorithms.token_alignment.shared_vocab`). This module
turns those into two losses, as pure torch functions; gathering the rows and scheduling the terms is the trainer's.

Design:
    - :func:`shared_vocab_kd_loss` restricts both heads to the shared entries (``W_s[student_ids]``,
      ``W_t[teacher_ids]``: class k is the same string on both sides), so both softmaxes renormalize over the
      shared vocabulary, and then IS the chunked same-tokenizer loss (:func:`kdscale.losses.chunked
      .chunked_distill_loss` with ``kd_ratio=1``) on the restricted heads: same divergences, chunking and
      recomputation in backward, never more than [chunk_size, |shared|] logits at once. The gather of the student
      head is an ordinary autograd op, so its gradient scatters back into the rows ``student_ids`` of the head.
    - :func:`dskd_loss` follows the student-space half of DSKD (Zhang et al. 2024, "Dual-Space Knowledge
      Distillation for Large Language Models", arXiv:2406.17328): a trained linear :class:`DSKDProjector` maps the
      teacher's hidden rows into the student's hidden space, and the STUDENT's head turns them into teacher logits
      over the student vocabulary. Two terms, each a chunked-loss call:

      * KD: ``divergence(softmax(P h_t @ W_s.T / T), softmax(h_s @ W_s.T / T))``; trains the student (hidden rows
        and head). The projected teacher logits are a constant here, as in the authors' code (``t2s_logits
        .detach()``): if the KD gradient reached the projector, the projector could lower the loss by imitating
        the student instead of carrying the teacher's knowledge.
      * projector CE (weight ``projector_ce_weight``, default 1): cross-entropy of ``P h_t @ W_s.T`` (student head
        detached) on ``labels``, the student ids of the aligned next tokens. At an aligned prediction pair the
        next token is the same text on both sides, so these are the teacher's own next tokens, spelled in the
        student vocabulary. This is the only term that trains the projector (DSKD's ``t2s_ce_loss``).

      The teacher-space half of DSKD (student rows projected through the teacher head) and its cross-model
      attention alignment are not here: rows are already aligned by ``prediction_pairs``.

Assumptions:
    - Rows are ALREADY gathered at aligned predictions: ``student_hidden[k]`` and ``teacher_hidden[k]`` predict
      the same text (index the loss rows with ``PredictionPairs.student_rows`` / ``teacher_rows``).
    - The teacher side is a constant (hidden rows and head); ``teacher_hidden`` may be a read-only bf16 CPU view.
    - ``normalizer`` is the global number of aligned rows of the step, as for the same-tokenizer loss; default N.
    - The projector is a small replicated module, not sharded with the student: the trainer must call
      :func:`all_reduce_projector_grads` after backward and before the optimizer step under data parallelism,
      and checkpoint ``projector.state_dict()`` (one tensor, ``"weight"``) with the student.

Usage:
    >>> vocab = shared_vocab(teacher_tokenizer, student_tokenizer)
    >>> out = shared_vocab_kd_loss(s_rows, model.lm_head.weight, t_rows, teacher_head,
    ...                            student_ids=vocab.student_ids, teacher_ids=vocab.teacher_ids, normalizer=n)
    >>> projector = DSKDProjector(teacher_hidden_size=4096, student_hidden_size=1024)
    >>> out = dskd_loss(projector, s_rows, model.lm_head.weight, t_rows, labels=s_labels, normalizer=n)
    >>> out.loss.backward(); all_reduce_projector_grads(projector); optimizer.step()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kdscale.losses.chunked import chunked_distill_loss
from kdscale.losses.common import DistillLossOutput, check_divergence_args, check_vocab_and_labels

__all__ = [
    "DSKDLossOutput",
    "DSKDProjector",
    "all_reduce_projector_grads",
    "dskd_loss",
    "shared_vocab_kd_loss",
]


# ------------------------------------------------------------------------------------------------ argument checks


def _check_2d(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}: pass [N, H] rows / [V, H] heads.")


def _check_rows(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> None:
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student_hidden has {student_hidden.shape[0]} rows but teacher_hidden has {teacher_hidden.shape[0]}: "
            "gather both at the aligned predictions (PredictionPairs.student_rows / teacher_rows), one row per pair."
        )


def _check_hidden_size(who: str, hidden: torch.Tensor, head: torch.Tensor) -> None:
    if hidden.shape[1] != head.shape[1]:
        raise ValueError(
            f"{who}_hidden has hidden size {hidden.shape[1]} but {who}_head is {tuple(head.shape)}: pass the {who}'s "
            f"final-norm hidden states with the {who}'s own output head."
        )


def _as_ids(ids: np.ndarray | torch.Tensor, name: str, head: torch.Tensor, who: str) -> torch.Tensor:
    """``ids`` as a 1-D int64 tensor on the head's device, checked to index rows of ``head``."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(
            f"{name} must be a 1-D integer array of token ids, got shape {tuple(ids.shape)} and dtype {ids.dtype}: "
            "pass SharedVocab.student_ids / teacher_ids."
        )
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty: the tokenizers share no vocabulary entry, so there is nothing to distill.")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= head.shape[0]:
        raise ValueError(
            f"{name} contains id {low if low < 0 else high} outside the {who} head's {head.shape[0]} rows: "
            f"{name} must come from shared_vocab() of the {who}'s own tokenizer."
        )
    return ids.to(device=head.device, dtype=torch.long)


# ------------------------------------------------------------------------------------------------ shared vocabulary


def shared_vocab_kd_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    *,
    student_ids: np.ndarray | torch.Tensor,
    teacher_ids: np.ndarray | torch.Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    normalizer: float | None = None,
    chunk_size: int = 1024,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    adaptive_alpha: float = 0.5,
    compute_dtype: torch.dtype = torch.float32,
) -> DistillLossOutput:
    """KD restricted to the shared vocabulary: ``sum_k D(p_k, q_k) / normalizer`` over N aligned rows.

    ``p_k = softmax(h_t[k] @ W_t[teacher_ids].T / T)`` and ``q_k = softmax(h_s[k] @ W_s[student_ids].T / T)``,
    both renormalized over the |shared| entries; D is any of :data:`kdscale.losses.DIVERGENCES`. Chunked over rows
    (the chunked loss on the restricted heads, see the module docstring); no T^2 factor.

    Args:
        student_hidden: [N, Hs] student rows at the aligned predictions; receives a gradient.
        student_head: [Vs, Hs] student output head; receives a gradient in the rows ``student_ids`` only.
        teacher_hidden: [N, Ht] teacher rows at the same predictions; a constant, may be a bf16 CPU view.
        teacher_head: [Vt, Ht] teacher output head on the student's device; a constant.
        student_ids, teacher_ids: [|shared|] ids with ``student_ids[k]`` and ``teacher_ids[k]`` the same string
            (:class:`~kdscale.algorithms.token_alignment.SharedVocab`).
        divergence, temperature, jsd_beta, skew_lambda, adaptive_alpha: as in :func:`chunked_distill_loss`.
        normalizer: divisor of the summed divergence, e.g. the global number of aligned rows; default N.
        chunk_size: rows per chunk; peak extra memory grows as chunk_size x |shared|.
        compute_dtype: dtype of the logits and softmax math.

    Returns:
        :class:`DistillLossOutput` with ``ce_sum = 0.0`` (one host sync, for ``kd_sum``).

    Raises:
        ValueError: row counts differ, id arrays of different lengths or out of range, or any bad argument.
    """
    _check_2d(student_hidden=student_hidden, student_head=student_head, teacher_hidden=teacher_hidden,
              teacher_head=teacher_head)  # fmt: skip
    _check_rows(student_hidden, teacher_hidden)
    _check_hidden_size("student", student_hidden, student_head)
    _check_hidden_size("teacher", teacher_hidden, teacher_head)
    student_index = _as_ids(student_ids, "student_ids", student_head, "student")
    teacher_index = _as_ids(teacher_ids, "teacher_ids", teacher_head, "teacher")
    if student_index.numel() != teacher_index.numel():
        raise ValueError(
            f"student_ids has {student_index.numel()} entries but teacher_ids has {teacher_index.numel()}: they are "
            "the two columns of one SharedVocab (student_ids[k] and teacher_ids[k] spell the same string)."
        )
    num_shared = int(student_index.numel())
    with torch.no_grad():
        teacher_shared_head = teacher_head.detach().index_select(0, teacher_index)
    student_shared_head = student_head.index_select(0, student_index)  # autograd scatters back into the head
    # The chunked loss needs labels even at kd_ratio=1 (its CE term then has weight 0): any valid id will do.
    dummy_labels = torch.zeros(student_hidden.shape[0], dtype=torch.long, device=student_head.device)
    out = chunked_distill_loss(
        student_hidden, student_shared_head, teacher_hidden, teacher_shared_head, dummy_labels,
        vocab_size=num_shared, divergence=divergence, temperature=temperature, kd_ratio=1.0, jsd_beta=jsd_beta,
        skew_lambda=skew_lambda, adaptive_alpha=adaptive_alpha, chunk_size=chunk_size, normalizer=normalizer,
        compute_dtype=compute_dtype,
    )  # fmt: skip
    return DistillLossOutput(loss=out.loss, kd_sum=out.kd_sum, ce_sum=0.0, num_tokens=out.num_tokens)


# ------------------------------------------------------------------------------------------------ DSKD


class DSKDProjector(nn.Module):
    """DSKD's teacher-to-student projection: a bias-free linear map ``teacher_hidden_size -> student_hidden_size``.

    Its state_dict is one tensor, ``"weight"`` of shape [student_hidden_size, teacher_hidden_size] (as
    ``nn.Linear``), so it checkpoints and all-reduces as is. Initialized like ``nn.Linear``. Input rows are cast
    to the weight's device and dtype (teacher rows may be a bf16 CPU view) and detached: the teacher gets no
    gradient.
    """

    def __init__(
        self,
        teacher_hidden_size: int,
        student_hidden_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, size in (("teacher_hidden_size", teacher_hidden_size), ("student_hidden_size", student_hidden_size)):
            if not (isinstance(size, int) and size >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {size!r}: pass the model config's hidden_size.")
        self.teacher_hidden_size = teacher_hidden_size
        self.student_hidden_size = student_hidden_size
        self.weight = nn.Parameter(torch.empty(student_hidden_size, teacher_hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialization (Kaiming-uniform with a = sqrt(5))."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, teacher_hidden: torch.Tensor) -> torch.Tensor:
        """[N, teacher_hidden_size] teacher rows -> [N, student_hidden_size] rows in the student's space."""
        if teacher_hidden.shape[-1] != self.teacher_hidden_size:
            raise ValueError(
                f"teacher_hidden has hidden size {teacher_hidden.shape[-1]} but the projector expects "
                f"{self.teacher_hidden_size}: build DSKDProjector with the teacher's hidden_size."
            )
        rows = teacher_hidden.detach().to(device=self.weight.device, dtype=self.weight.dtype)
        return F.linear(rows, self.weight)

    def extra_repr(self) -> str:
        return f"teacher_hidden_size={self.teacher_hidden_size}, student_hidden_size={self.student_hidden_size}"


@dataclass
class DSKDLossOutput:
    """Result of :func:`dskd_loss` on N aligned rows.

    ``loss = kd_sum / normalizer + projector_ce_weight * projector_ce_sum / normalizer`` (differentiable; the KD
    term trains the student, the CE term the projector). The sums are detached floats for logging.
    """

    loss: torch.Tensor
    kd_sum: float
    projector_ce_sum: float
    num_tokens: int


def dskd_loss(
    projector: DSKDProjector,
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    vocab_size: int | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    projector_ce_weight: float = 1.0,
    normalizer: float | None = None,
    chunk_size: int = 1024,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    adaptive_alpha: float = 0.5,
    compute_dtype: torch.dtype = torch.float32,
) -> DSKDLossOutput:
    """DSKD in the student's space: KD from the projected teacher through the student head, plus the projector CE.

    With ``z_t = projector(h_t) @ W_s[:V].T`` and ``z_s = h_s @ W_s[:V].T``:
    ``loss = (sum_k D(softmax(z_t / T).detach(), softmax(z_s / T)) + w * sum_k CE(z_t with W_s detached,
    labels_k)) / normalizer`` with ``w = projector_ce_weight``. The KD term trains ``student_hidden`` and
    ``student_head``; the CE term trains the projector only (see the module docstring for why the KD gradient
    does not reach the projector). Both terms are chunked over rows.

    Args:
        projector: the trained :class:`DSKDProjector` (teacher hidden size -> student hidden size).
        student_hidden: [N, Hs] student rows at the aligned predictions; receives a gradient.
        student_head: [Vs, Hs] student output head, Vs >= vocab_size; receives a gradient (KD term only).
        teacher_hidden: [N, Ht] teacher rows at the same predictions; a constant.
        labels: [N] student ids of the aligned next tokens (the same text as the teacher's next tokens); required
            when ``projector_ce_weight > 0``.
        vocab_size: the student tokenizer's vocabulary size; head rows past it are padding. Default Vs.
        divergence, temperature, jsd_beta, skew_lambda, adaptive_alpha: as in :func:`chunked_distill_loss`.
        projector_ce_weight: weight of the projector's CE term, >= 0; 0 leaves the projector untrained.
        normalizer: divisor of both sums, e.g. the global number of aligned rows; default N.
        chunk_size: rows per chunk; peak extra memory grows as chunk_size x vocab_size.
        compute_dtype: dtype of the logits and softmax math.

    Raises:
        ValueError: row counts or hidden sizes that do not match, missing or out-of-range labels, bad arguments.
    """
    _check_2d(student_hidden=student_hidden, student_head=student_head, teacher_hidden=teacher_hidden)
    _check_rows(student_hidden, teacher_hidden)
    _check_hidden_size("student", student_hidden, student_head)
    if not isinstance(projector, DSKDProjector):
        raise ValueError(f"projector must be a DSKDProjector, got {type(projector).__name__}.")
    if projector.student_hidden_size != student_head.shape[1]:
        raise ValueError(
            f"the projector maps to hidden size {projector.student_hidden_size} but student_head is "
            f"{tuple(student_head.shape)}: build DSKDProjector with the student's hidden_size."
        )
    vocab_size = student_head.shape[0] if vocab_size is None else vocab_size
    if not projector_ce_weight >= 0:
        raise ValueError(
            f"projector_ce_weight must be >= 0, got {projector_ce_weight!r}: DSKD uses 1.0; 0 trains no projector."
        )
    check_divergence_args(
        divergence=divergence, temperature=temperature, kd_ratio=1.0, jsd_beta=jsd_beta, skew_lambda=skew_lambda,
        adaptive_alpha=adaptive_alpha, normalizer=normalizer, compute_dtype=compute_dtype,
    )  # fmt: skip
    num_rows = student_hidden.shape[0]
    if labels is None:
        if projector_ce_weight > 0:
            raise ValueError(
                "labels are required when projector_ce_weight > 0: pass the student ids of the aligned next tokens "
                "(they train the projector), or set projector_ce_weight=0."
            )
        labels = torch.zeros(num_rows, dtype=torch.long, device=student_head.device)  # CE weight 0: unused
    else:
        check_vocab_and_labels(labels, num_rows, vocab_size)
        labels = labels.to(student_head.device)

    projected = projector(teacher_hidden)
    frozen_head = student_head.detach()
    common = dict(
        vocab_size=vocab_size, temperature=temperature, jsd_beta=jsd_beta, skew_lambda=skew_lambda,
        adaptive_alpha=adaptive_alpha, chunk_size=chunk_size, normalizer=normalizer, compute_dtype=compute_dtype,
    )  # fmt: skip
    kd = chunked_distill_loss(
        student_hidden, student_head, projected.detach(), frozen_head, labels, divergence=divergence, kd_ratio=1.0,
        **common,
    )  # fmt: skip
    loss, ce_sum = kd.loss, 0.0
    if projector_ce_weight > 0:
        # kd_ratio=0: the CE of the projected rows ("student" side) through the frozen head; the teacher arguments
        # are placeholders (their logits are computed in forward but weighted 0 and skipped in backward).
        ce = chunked_distill_loss(
            projected, frozen_head, projected.detach(), frozen_head, labels, divergence=divergence, kd_ratio=0.0,
            **common,
        )  # fmt: skip
        loss = loss + projector_ce_weight * ce.loss.to(loss.dtype)
        ce_sum = ce.ce_sum
    return DSKDLossOutput(loss=loss, kd_sum=kd.kd_sum, projector_ce_sum=ce_sum, num_tokens=num_rows)


def all_reduce_projector_grads(projector: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Average the projector's ``.grad`` over a data-parallel group; a no-op when torch.distributed is not initialized.

    The projector is replicated, not sharded with the student (FSDP2 / Megatron do not see it), so the TRAINER
    MUST CALL THIS after backward and before the optimizer step on every rank, or the replicas drift apart. A
    parameter without a gradient takes part with zeros (every rank then runs the same collectives).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world_size = dist.get_world_size(group)
    for param in projector.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)  # gloo has no ReduceOp.AVG
        param.grad.div_(world_size)
