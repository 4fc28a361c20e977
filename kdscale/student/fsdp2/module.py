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


class DistillationModule(nn.Module):
    """Wraps a HF causal LM (``self.model``) and computes the distillation loss of one micro-batch in forward."""

    def __init__(self, model: nn.Module, *, vocab_size: int, loss_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.loss_kwargs = dict(loss_kwargs)

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
