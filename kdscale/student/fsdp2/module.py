"""DistillationModule: the FSDP2 root, a Hugging Face causal LM whose forward returns the distillation loss.

Design: the loss runs INSIDE the root module's forward, so the student's output head is the root FSDP unit's
unsharded parameter there (the root keeps its parameters unsharded until the end of backward, where the head's
gradient is reduce-scattered with the embedding's and the final norm's). Only the decoder runs
(``get_decoder()``), never the HF ``lm_head`` forward: no ``[B, L, V]`` logits exist; the chunked loss
multiplies the prediction rows by the head chunk by chunk.

Rows follow :mod:`kdscale.data.batch`: ``gather_prediction_rows`` / ``gather_labels``, the same rows the teacher
shipped. The forward returns plain tensors (FSDP2 registers its backward hooks on tensors in the output).

Packed micro-batches (``position_ids`` given) run with ``attention_mask=None``: transformers (>= 4.54,
``masking_utils.find_packed_sequence_indices``) then derives the samples from the restarts of ``position_ids``
and builds a block-diagonal causal mask for eager and sdpa attention (flash-attention takes the position ids
directly). That detection is skipped when a KV cache exists, hence ``use_cache=False``. The pad tail of a packed
row restarts its position ids too, so it is a segment of its own that no real token attends to.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdscale.data.batch import gather_labels, gather_prediction_rows, require_packed_sequence_support
from kdscale.losses import chunked_distill_loss
from kdscale.losses.cross_tokenizer import DSKDProjector, dskd_loss, shared_vocab_kd_loss

CROSS_TOKENIZER_METHODS = ("shared_vocab", "dskd")


class DistillationModule(nn.Module):
    """Wraps a HF causal LM (``self.model``) and computes the distillation loss of one micro-batch in forward.

    Cross-tokenizer distillation (``cross_tokenizer`` set: ``method``, ``student_ids``/``teacher_ids`` of the shared
    vocabulary, ``projector_ce_weight``, ``teacher_hidden_size``): the KD term covers the aligned predictions only
    (``kd_mask``) and is normalized by their global count; the CE term covers every target (``loss_mask``). For
    ``dskd`` the projector is a parameter of this (root) module: FSDP2 shards it with the root, sums its gradient
    across the data-parallel ranks like any other, the optimizer trains it and the checkpoint holds it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        vocab_size: int,
        loss_kwargs: dict[str, Any],
        cross_tokenizer: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.loss_kwargs = dict(loss_kwargs)
        self.cross = dict(cross_tokenizer) if cross_tokenizer else None
        if self.cross is not None:
            if self.cross["method"] not in CROSS_TOKENIZER_METHODS:
                raise ValueError(
                    f"cross_tokenizer method must be one of {CROSS_TOKENIZER_METHODS}, got {self.cross['method']!r}"
                )
            self.shared_student_ids = torch.as_tensor(self.cross["student_ids"], dtype=torch.long)
            self.shared_teacher_ids = torch.as_tensor(self.cross["teacher_ids"], dtype=torch.long)
            if self.cross["method"] == "dskd":
                student_hidden = model.get_output_embeddings().weight.shape[1]
                self.projector = DSKDProjector(int(self.cross["teacher_hidden_size"]), int(student_hidden))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_head: torch.Tensor,
        normalizer: float,
        with_forward_kl: bool = False,
        position_ids: torch.Tensor | None = None,
        kd_mask: torch.Tensor | None = None,
        kd_normalizer: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of one micro-batch and its detached statistics.

        ``teacher_hidden`` ([num_loss_tokens, H_teacher]) may be a read-only CPU view: the loss copies it to the
        device chunk by chunk and never writes to it. ``teacher_head`` is on the student's device.
        ``position_ids`` is set for a packed micro-batch only (see the module docstring); ``attention_mask`` is
        then not passed to the model.

        Returns ``(loss, stats)``: ``loss`` = ``(kd_ratio * kd_sum + (1 - kd_ratio) * ce_sum) / normalizer``
        (differentiable), ``stats`` = float64 ``[kd_sum, ce_sum]``, plus the forward KL(teacher || student) sum at
        temperature 1 when ``with_forward_kl`` (for evaluation).
        """
        if position_ids is None:
            outputs = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:
            require_packed_sequence_support()
            outputs = self.model.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        if self.cross is not None:
            return self._cross_tokenizer_loss(
                outputs.last_hidden_state, input_ids, loss_mask, kd_mask, teacher_hidden, teacher_head, normalizer,
                kd_normalizer, with_forward_kl,
            )  # fmt: skip
        hidden_rows = gather_prediction_rows(outputs.last_hidden_state, loss_mask)
        labels = gather_labels(input_ids, loss_mask)
        num_rows = hidden_rows.shape[0]
        if teacher_hidden.shape[0] != num_rows:
            raise RuntimeError(
                f"teacher hidden states have {teacher_hidden.shape[0]} rows but the micro-batch has {num_rows} "
                "prediction positions (loss_mask[:, 1:].sum()): the teacher output does not belong to this "
                "micro-batch, or teacher and student disagree on the row convention of kdscale.data.batch."
            )
        student_head = self.model.get_output_embeddings().weight
        num_stats = 3 if with_forward_kl else 2
        if num_rows == 0:
            # Keep the head and every layer in the graph (zero gradients) so that all ranks reduce the same grads.
            loss = (hidden_rows.sum() + student_head.sum()) * 0.0
            return loss, torch.zeros(num_stats, dtype=torch.float64)
        out = chunked_distill_loss(
            hidden_rows,
            student_head,
            teacher_hidden,
            teacher_head,
            labels,
            vocab_size=self.vocab_size,
            normalizer=normalizer,
            **self.loss_kwargs,
        )
        stats = [out.kd_sum, out.ce_sum]
        if with_forward_kl:
            kl = chunked_distill_loss(
                hidden_rows,
                student_head,
                teacher_hidden,
                teacher_head,
                labels,
                vocab_size=self.vocab_size,
                divergence="forward_kl",
                temperature=1.0,
                kd_ratio=1.0,
                chunk_size=self.loss_kwargs.get("chunk_size", 1024),
                compute_dtype=self.loss_kwargs.get("compute_dtype", torch.float32),
            )
            stats.append(kl.kd_sum)
        return out.loss, torch.tensor(stats, dtype=torch.float64)

    def _cross_tokenizer_loss(
        self,
        last_hidden: torch.Tensor,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        kd_mask: torch.Tensor | None,
        teacher_hidden: torch.Tensor,
        teacher_head: torch.Tensor,
        normalizer: float,
        kd_normalizer: float | None,
        with_forward_kl: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``kd_ratio * KD(aligned rows) / kd_normalizer + (1 - kd_ratio) * CE(all targets) / normalizer``.

        Stats: ``[kd_sum, ce_sum]`` (+ the forward KL(teacher || student) sum at T=1 on the SHARED vocabulary over
        the aligned rows, for evaluation: the one divergence both methods can be compared on)."""
        if kd_mask is None or kd_normalizer is None:
            raise ValueError("cross-tokenizer distillation needs each micro-batch's kd_mask and the step's "
                             "global_num_kd_tokens (lay the step out with teacher_samples)")
        kd_rows = gather_prediction_rows(last_hidden, kd_mask)
        if teacher_hidden.shape[0] != kd_rows.shape[0]:
            raise RuntimeError(
                f"teacher hidden states have {teacher_hidden.shape[0]} rows but the micro-batch has "
                f"{kd_rows.shape[0]} aligned predictions (kd_mask[:, 1:].sum()): the teacher output does not belong "
                "to this micro-batch"
            )
        student_head = self.model.get_output_embeddings().weight
        kd_ratio = float(self.loss_kwargs.get("kd_ratio", 1.0))
        common = {k: v for k, v in self.loss_kwargs.items() if k != "kd_ratio"}
        # Zero terms keep the head, every layer and the projector in the graph, so that every rank reduces the same
        # gradients even when it has no aligned row (FSDP2 collectives must match across ranks).
        loss = (kd_rows.sum() + student_head.sum()) * 0.0
        if self.cross["method"] == "dskd":
            loss = loss + self.projector.weight.sum() * 0.0
        kd_sum = 0.0
        if kd_rows.shape[0] and kd_ratio > 0:
            if self.cross["method"] == "shared_vocab":
                out = shared_vocab_kd_loss(
                    kd_rows, student_head, teacher_hidden, teacher_head, student_ids=self.shared_student_ids,
                    teacher_ids=self.shared_teacher_ids, normalizer=kd_normalizer, **common,
                )  # fmt: skip
            else:
                out = dskd_loss(
                    self.projector, kd_rows, student_head, teacher_hidden, labels=gather_labels(input_ids, kd_mask),
                    vocab_size=self.vocab_size, projector_ce_weight=float(self.cross["projector_ce_weight"]),
                    normalizer=kd_normalizer, **common,
                )  # fmt: skip
            loss = loss + kd_ratio * out.loss
            kd_sum = out.kd_sum
        ce_sum = 0.0
        rows = gather_prediction_rows(last_hidden, loss_mask)
        if rows.shape[0]:
            # kd_ratio=0: only the CE term; the "teacher" arguments are placeholders weighted 0.
            with torch.set_grad_enabled(torch.is_grad_enabled() and kd_ratio < 1):
                ce = chunked_distill_loss(
                    rows, student_head, rows.detach(), student_head.detach(), gather_labels(input_ids, loss_mask),
                    vocab_size=self.vocab_size, normalizer=normalizer, kd_ratio=0.0,
                    chunk_size=common.get("chunk_size", 1024), compute_dtype=common.get("compute_dtype", torch.float32),
                )  # fmt: skip
            if kd_ratio < 1:
                loss = loss + (1.0 - kd_ratio) * ce.loss
            ce_sum = ce.ce_sum
        stats = [kd_sum, ce_sum]
        if with_forward_kl:
            kl_sum = 0.0
            if kd_rows.shape[0]:
                kl_sum = shared_vocab_kd_loss(
                    kd_rows, student_head, teacher_hidden, teacher_head, student_ids=self.shared_student_ids,
                    teacher_ids=self.shared_teacher_ids, divergence="forward_kl", temperature=1.0,
                    chunk_size=common.get("chunk_size", 1024), compute_dtype=common.get("compute_dtype", torch.float32),
                ).kd_sum  # fmt: skip
            stats.append(kl_sum)
        return loss, torch.tensor(stats, dtype=torch.float64)
