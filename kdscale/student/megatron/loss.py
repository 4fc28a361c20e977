"""The distillation loss on a Megatron last pipeline stage: the student head is sharded by vocabulary over TP.

- ``GPTModel`` is made to return its final-norm hidden states instead of logits (:func:`return_hidden_states`):
  the output layer's forward becomes the identity, its weight stays a parameter (saved, loaded, optimized) and
  is handed to the loss, which never materializes ``[tokens, vocab]``.
- At TP=1 the loss is :func:`kdscale.losses.chunked_distill_loss`. At TP>1 it is the vocab-parallel
  ``kdscale.losses.vocab_parallel.vocab_parallel_chunked_distill_loss`` when that module exists; otherwise the
  student head shards are all-gathered (Megatron's autograd gather: its backward keeps this rank's rows of the
  gradient) and every TP rank computes the same full-vocabulary loss. Either way the gradient of the hidden
  states is complete on every TP rank, so nothing is all-reduced after the (identity) output layer.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from kdscale.losses import DistillLossOutput, chunked_distill_loss


def _hidden_states_passthrough(input_: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None, **_: Any):
    return input_, None


def return_hidden_states(model: torch.nn.Module) -> None:
    """Make a post-process ``GPTModel`` chunk return ``[b, s, H]`` final-norm hidden states instead of logits."""
    if getattr(model, "post_process", False):
        model.output_layer.forward = _hidden_states_passthrough


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The student head (this TP rank's ``[V_pad/TP, H]`` rows) of a post-process ``GPTModel`` chunk."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def vocab_parallel_loss_available() -> bool:
    """Whether ``kdscale.losses.vocab_parallel`` (the all-gather-free TP loss) is importable."""
    return importlib.util.find_spec("kdscale.losses.vocab_parallel") is not None


class StageLoss:
    """Computes the configured loss from this TP rank's head shards (see the module docstring)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        loss_kwargs: dict[str, Any],
        teacher_head: torch.Tensor,
        tp_rank: int,
        tp_size: int,
        tp_group: Any,
        use_vocab_parallel: bool | None = None,
    ) -> None:
        """``teacher_head`` is the FULL teacher head padded to the student's padded vocabulary ``[V_pad, Ht]``."""
        self.vocab_size = vocab_size
        self.loss_kwargs = dict(loss_kwargs)
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        if use_vocab_parallel is None:
            use_vocab_parallel = tp_size > 1 and vocab_parallel_loss_available()
        self.use_vocab_parallel = use_vocab_parallel and tp_size > 1
        rows = teacher_head.shape[0] // tp_size
        self.vocab_start_index = tp_rank * rows
        # Vocab-parallel: keep only this rank's rows; gather fallback / TP=1: keep all rows.
        self.teacher_head = (
            teacher_head[self.vocab_start_index : self.vocab_start_index + rows].contiguous()
            if self.use_vocab_parallel
            else teacher_head
        )

    def __call__(
        self,
        student_hidden: torch.Tensor,
        student_head_shard: torch.Tensor,
        teacher_hidden: torch.Tensor,
        labels: torch.Tensor,
        *,
        normalizer: float,
        **overrides: Any,
    ) -> DistillLossOutput:
        """Loss over the rows ``student_hidden`` [N, Hs] (replicated over TP); identical on all TP ranks."""
        kwargs = {**self.loss_kwargs, **overrides}
        if self.use_vocab_parallel:
            from kdscale.losses.vocab_parallel import vocab_parallel_chunked_distill_loss

            return vocab_parallel_chunked_distill_loss(
                student_hidden,
                student_head_shard,
                teacher_hidden,
                self.teacher_head,
                labels,
                vocab_size=self.vocab_size,
                vocab_start_index=self.vocab_start_index,
                tp_group=self.tp_group,
                normalizer=normalizer,
                **kwargs,
            )
        student_head = student_head_shard
        if self.tp_size > 1:
            from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

            # [Hs, V/TP] gathered along the last dim -> [Hs, V]; backward keeps this rank's gradient rows.
            student_head = gather_from_tensor_model_parallel_region(student_head_shard.t().contiguous()).t()
        return chunked_distill_loss(
            student_hidden,
            student_head,
            teacher_hidden,
            self.teacher_head,
            labels,
            vocab_size=self.vocab_size,
            normalizer=normalizer,
            **kwargs,
        )
