"""Micro-batch and per-step layout types shared by the controller, the teacher engines and the student backends.

Conventions (the whole system relies on them):
- ``loss_mask[b, t]`` is True where token ``t`` is a *target*: a response token or the closing EOS.
- The model predicts token ``t`` from position ``t - 1``. The *prediction positions* of a batch are therefore
  ``loss_mask[:, 1:]`` applied to positions ``[:, :-1]``; ``hidden[:, :-1][loss_mask[:, 1:]]`` gives the
  ``[num_loss_tokens, H]`` rows in row-major (sample, position) order, and ``input_ids[:, 1:][loss_mask[:, 1:]]``
  the matching labels. Teacher and student both use :func:`gather_prediction_rows`, so their rows line up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MicroBatch:
    """Right-padded token ids of a few samples, with the mask of target tokens."""

    input_ids: torch.Tensor  # [B, L] int64, right-padded with pad_token_id
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens
    loss_mask: torch.Tensor  # [B, L] bool, True on target tokens (response + EOS)
    sample_ids: list[int] = field(default_factory=list)  # dataset row ids, for accounting and resume checks

    @property
    def num_loss_tokens(self) -> int:
        """Number of prediction positions (= target tokens that have a preceding position)."""
        return int(self.loss_mask[:, 1:].sum())

    @property
    def num_tokens(self) -> int:
        """Number of real (non-padding) tokens."""
        return int(self.attention_mask.sum())


def prediction_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask over positions ``[:, :-1]`` that predict a target token."""
    return loss_mask[:, 1:]


def gather_prediction_rows(hidden: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Rows of ``hidden`` [B, L, H] at the prediction positions: [num_loss_tokens, H]."""
    return hidden[:, :-1][prediction_mask(loss_mask)]


def gather_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Target token ids aligned with :func:`gather_prediction_rows`: [num_loss_tokens]."""
    return input_ids[:, 1:][prediction_mask(loss_mask)]


@dataclass
class StepLayout:
    """One optimizer step's data, laid out per student data-parallel rank.

    ``shards[dp_rank]`` is the list of micro-batches that rank runs (gradient accumulation over them).
    ``global_num_loss_tokens`` normalizes the loss so it is a per-token mean over the whole global batch,
    whatever the data-parallel split.
    """

    shards: list[list[MicroBatch]]
    global_num_loss_tokens: int
    epoch: int = 0
    step: int = 0

    @property
    def dp_size(self) -> int:
        return len(self.shards)
