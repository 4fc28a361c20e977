"""StudentBackend protocol and StepMetrics: what every student training backend (FSDP2, Megatron) provides.

A backend runs inside one process per rank, where ``torch.distributed`` is already initialized by the caller.
It owns its parallelism, optimizer, schedule and checkpoints; the controller only hands it, per step, the
micro-batches of the rank's data-parallel shard and the matching teacher hidden states, and reads back metrics
that are identical on every rank.

Normalization: every loss is a per-token mean over the GLOBAL batch (all data-parallel shards of the step), so
the same global batch gives the same loss and gradients whatever the data-parallel split. The caller passes the
global number of loss tokens; the backend checks it against the micro-batches.

Optional capabilities (the controller uses them only where the config allows them):
- ``hf_state_dict()``: the full weights by Hugging Face name on global rank 0, None elsewhere (collective), for
  on-policy weight sync (both backends).
- ``global_num_kd_tokens=`` on ``train_step``/``evaluate`` with a ``cross_tokenizer`` constructor argument: the
  KD term over the aligned predictions of ``MicroBatch.kd_mask`` (cross-tokenizer distillation; FSDP2 only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch

from kdscale.data.batch import MicroBatch


@dataclass
class StepMetrics:
    """Metrics of one optimizer step, identical on every rank.

    ``loss``, ``kd`` and ``ce`` are per-token means over the global batch: ``loss = kd_ratio * kd +
    (1 - kd_ratio) * ce``, the value whose gradient was applied.
    """

    loss: float  # the configured distillation loss, per loss token (global)
    kd: float  # the divergence term, per loss token (global; per aligned prediction under cross-tokenizer KD)
    ce: float  # cross-entropy against the data labels, per loss token (global)
    grad_norm: float  # total L2 norm of the gradient before clipping
    lr: float  # learning rate used by this step
    num_loss_tokens: int  # loss tokens of the global batch
    num_tokens: int  # real (non-padding) tokens of the global batch
    seconds: float  # wall time of the step on this rank

    def as_dict(self) -> dict[str, float | int]:
        """The metrics as a plain dict (for JSONL logging)."""
        return asdict(self)


@runtime_checkable
class StudentBackend(Protocol):
    """A student training backend. Implementations: ``fsdp2`` (later: ``megatron``).

    Every method is collective: all ranks of the job call it, in the same order.
    """

    def setup(self) -> None:
        """Build the model, parallelism, optimizer and schedule (collective; call once before anything else)."""

    def layout(self) -> dict[int, list[int]]:
        """Which global ranks consume each data-parallel shard: ``{dp_rank: [global ranks]}``.

        The controller sends the teacher hidden states of shard ``dp_rank`` to exactly these ranks.
        """

    @property
    def dp_rank(self) -> int:
        """Data-parallel rank of this process (the shard of the global batch it trains on)."""

    @property
    def dp_size(self) -> int:
        """Number of data-parallel shards."""

    @property
    def step(self) -> int:
        """Number of optimizer steps taken so far (restored by :meth:`load`)."""

    def train_step(
        self,
        micro_batches: list[MicroBatch],
        teacher_hidden: list[torch.Tensor],
        *,
        global_num_loss_tokens: int,
    ) -> StepMetrics:
        """One optimizer step over this rank's micro-batches (gradient accumulation), then the update.

        ``teacher_hidden[i]`` holds the teacher's final-norm hidden states at the prediction positions of
        ``micro_batches[i]`` (``[num_loss_tokens, H_teacher]``, read-only). ``global_num_loss_tokens`` is the sum
        of ``num_loss_tokens`` over all micro-batches of all data-parallel shards of the step.
        """

    def evaluate(
        self,
        micro_batches: list[MicroBatch],
        teacher_hidden: list[torch.Tensor],
        *,
        global_num_loss_tokens: int,
    ) -> dict[str, float]:
        """Evaluation metrics over the global eval batch (no gradients; the optimizer is untouched).

        Returns at least ``kl`` (forward KL(teacher || student) at temperature 1, per token), ``loss``, ``kd``,
        ``ce`` (the configured loss and its terms, per token) and ``num_loss_tokens``; identical on all ranks.
        """

    def save(self, path: str) -> None:
        """Write a resumable checkpoint (model, optimizer, schedule, step, RNG) into the existing directory ``path``."""

    def load(self, path: str) -> None:
        """Restore a checkpoint written by :meth:`save` (possibly with another data-parallel size)."""

    def export_hf(self, path: str) -> None:
        """Write the student as a Hugging Face model directory (weights, config, tokenizer) at ``path``."""
