"""Micro-batch and per-step layout types shared by the controller, the teacher engines and the student backends.

Conventions (the whole system relies on them):
- ``loss_mask[b, t]`` is True where token ``t`` is a *target*: a response token or the closing EOS.
- The model predicts token ``t`` from position ``t - 1``. The *prediction positions* of a batch are therefore
  ``loss_mask[:, 1:]`` applied to positions ``[:, :-1]``; ``hidden[:, :-1][loss_mask[:, 1:]]`` gives the
  ``[num_loss_tokens, H]`` rows in row-major (sample, position) order, and ``input_ids[:, 1:][loss_mask[:, 1:]]``
  the matching labels. Teacher and student both use :func:`gather_prediction_rows`, so their rows line up.

Two layouts of a micro-batch:
- *Padded* (``position_ids is None``): one sample per row, right-padded (``attention_mask`` 1 on the sample's
  tokens, 0 on the padding). Position ids are the default ``0 .. L - 1``.
- *Packed* (``position_ids`` set, :attr:`MicroBatch.is_packed`): samples end to end in one row (``B == 1`` as
  :func:`~kdscale.data.layout.build_step_layout` makes them), no padding between them. ``position_ids`` restart
  at 0 at the first token of every sample and attention must stay within each sample: a model derives the
  samples from the restarts of ``position_ids`` (:func:`sample_spans`). ``attention_mask`` is 1 on the samples'
  tokens; a pad tail (e.g. for ``pad_to_multiple_of``) has ``attention_mask`` 0 and position ids that restart at 0
  too, so it is one more segment that no real token attends to. ``loss_mask`` is False at the FIRST token of every
  sample: the padded layout never predicts a sample's first token either (there is no position before it), and in
  a packed row the position before it belongs to the previous sample.
  With that rule :func:`gather_prediction_rows` and :func:`gather_labels` return, for a packed micro-batch, exactly
  the rows and labels of the same samples laid out padded in the same order, and ``num_loss_tokens`` is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MicroBatch:
    """Token ids of a few samples (right-padded rows, or packed end to end), with the mask of target tokens."""

    input_ids: torch.Tensor  # [B, L] int64, right-padded with pad_token_id
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens
    loss_mask: torch.Tensor  # [B, L] bool, True on target tokens (response + EOS)
    sample_ids: list[int] = field(default_factory=list)  # dataset row ids, for accounting and resume checks
    position_ids: torch.Tensor | None = None  # [B, L] int64, restarting at 0 per sample; set only when packed
    # Cross-tokenizer distillation only: [B, L] bool, the targets whose prediction has an aligned teacher
    # prediction (a subset of loss_mask). The teacher ships rows for these predictions only; CE uses loss_mask.
    kd_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("position_ids", "kd_mask"):
            value = getattr(self, name)
            if value is not None and value.shape != self.input_ids.shape:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)} but input_ids {tuple(self.input_ids.shape)}: it needs "
                    "one entry per token"
                )

    @property
    def is_packed(self) -> bool:
        """Whether samples are packed end to end (attention must stay within each sample: see the module doc)."""
        return self.position_ids is not None

    @property
    def num_loss_tokens(self) -> int:
        """Number of prediction positions (= target tokens that have a preceding position)."""
        return int(self.loss_mask[:, 1:].sum())

    @property
    def num_kd_tokens(self) -> int:
        """Prediction positions the KD term covers: those of ``kd_mask`` if set, else all of ``loss_mask``'s."""
        return self.num_loss_tokens if self.kd_mask is None else int(self.kd_mask[:, 1:].sum())

    @property
    def kd_loss_mask(self) -> torch.Tensor:
        """The mask whose prediction rows the teacher ships: ``kd_mask`` if set, else ``loss_mask``."""
        return self.loss_mask if self.kd_mask is None else self.kd_mask

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


def sample_spans(micro_batch: MicroBatch) -> list[tuple[int, int, int]]:
    """``(row, start, stop)`` of every sample (real tokens only), in the order of the prediction rows.

    Padded: one span per row with real tokens, ``(b, 0, attention_mask[b].sum())``. Packed: a sample starts where
    ``position_ids`` is 0 on a real token and ends where the next starts or the real tokens end. The prediction
    rows of the span ``(b, start, stop)`` are those of ``loss_mask[b, start + 1 : stop]``, contiguous and in order.
    """
    lengths = micro_batch.attention_mask.sum(dim=1).tolist()
    if not micro_batch.is_packed:
        return [(row, 0, int(length)) for row, length in enumerate(lengths) if length > 0]
    spans = []
    for row, length in enumerate(lengths):
        starts = (micro_batch.position_ids[row, : int(length)] == 0).nonzero().flatten().tolist()
        spans += [(row, start, stop) for start, stop in zip(starts, [*starts[1:], int(length)])]
    return spans


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention within the segments that ``position_ids`` [B, L] delimit by restarting at 0.

    Returns a [B, L, L] bool tensor, True where query ``q`` may attend key ``k`` (same segment and ``k <= q``).
    """
    segment = (position_ids == 0).cumsum(dim=1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return (segment[:, :, None] == segment[:, None, :]) & causal


@dataclass
class StepLayout:
    """One optimizer step's data, laid out per student data-parallel rank.

    ``shards[dp_rank]`` is the list of micro-batches that rank runs (gradient accumulation over them).
    ``global_num_loss_tokens`` normalizes the loss so it is a per-token mean over the whole global batch,
    whatever the data-parallel split. ``teacher_shards`` (cross-tokenizer only) is what the teacher runs instead of
    ``shards``; :attr:`teacher_work` gives whichever applies.
    """

    @property
    def teacher_work(self) -> list[list[MicroBatch]]:
        """The micro-batches the teacher scores, per shard: ``teacher_shards`` if set, else ``shards``."""
        return self.shards if self.teacher_shards is None else self.teacher_shards

    shards: list[list[MicroBatch]]
    global_num_loss_tokens: int
    epoch: int = 0
    step: int = 0
    # Cross-tokenizer distillation only: the teacher's micro-batches, one per student micro-batch (the same
    # samples in the same order, tokenized with the teacher's tokenizer; loss_mask = the aligned predictions), and
    # the global number of aligned predictions (the KD term's normalizer).
    teacher_shards: list[list[MicroBatch]] | None = None
    global_num_kd_tokens: int | None = None

    @property
    def dp_size(self) -> int:
        return len(self.shards)


def kd_token_kwargs(global_num_kd_tokens: int | None) -> dict[str, int]:
    """The cross-tokenizer keyword of a student step call (``global_num_kd_tokens``), only when set: callers and
    backends without cross-tokenizer support never see it."""
    return {} if global_num_kd_tokens is None else {"global_num_kd_tokens": global_num_kd_tokens}


def require_packed_sequence_support() -> None:
    """Raise unless this transformers builds block-diagonal masks from restarting position ids (both the hf teacher
    and the FSDP2 student rely on it for packed micro-batches)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        import transformers

        raise ValueError(
            f"packed micro-batches need transformers >= 4.54 (attention within each packed sample); this is "
            f"transformers {transformers.__version__}: upgrade it or set data.packing: false"
        ) from None


def sample_digest(input_ids, loss_mask) -> int:
    """CRC32 of one sample's token ids and target positions (the first token is never a target and is left out):
    lets a test check that a sample was trained exactly as it was made (e.g. a rollout as generated)."""
    import zlib

    import numpy as np

    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(loss_mask, dtype=np.uint8)[1:]
    return zlib.crc32(ids.tobytes() + mask.tobytes())


def sample_digests(micro_batch: MicroBatch) -> list[int]:
    """:func:`sample_digest` of every sample of ``micro_batch``, in the order of its ``sample_ids``."""
    ids, mask = micro_batch.input_ids.cpu().numpy(), micro_batch.loss_mask.cpu().numpy()
    return [sample_digest(ids[row, start:stop], mask[row, start:stop]) for row, start, stop in sample_spans(micro_batch)]
