"""Lay one optimizer step's samples out per student data-parallel rank, and choose each step's samples.

Design:
- Ranks are balanced by tokens: samples go longest first onto the least-loaded rank (ties: fewer samples, then
  lowest rank), so the token counts of any two ranks differ by at most the longest sample. Every rank gets at least one sample.
- Within a rank, samples sorted longest first are grouped into right-padded micro-batches whose padded size
  ``B * L`` stays within ``max_tokens_per_micro_batch`` (a sample longer than that is alone in its micro-batch).
- With ``packing=True`` a micro-batch is instead one row of samples end to end (:mod:`kdscale.data.batch` describes
  the packed layout): its budget is the SUM of its samples' tokens (rounded up to ``pad_to_multiple_of``), and
  samples, taken longest first, go into the first micro-batch with room (first-fit decreasing). Inside a
  micro-batch samples stay in that order (longest first, ties by sample id), in both layouts.
- Every rank runs the SAME number of micro-batches (FSDP and Megatron need all data-parallel ranks to run the
  same number of forward/backward passes). A rank with fewer splits its micro-batch with the most samples in two
  (repeatedly); if it has no micro-batch left to split, it gets filler micro-batches: one pad token, attended
  (so no attention row is fully masked), with an all-False loss mask and no sample ids. They add no loss.
- Everything is deterministic: the same samples give the same layout.

:class:`StepSampler` shuffles the sample indices once per epoch from ``(seed, epoch)`` and hands out fixed-size
global batches, dropping the incomplete last batch of an epoch; its ``state_dict`` resumes exactly.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kdscale.data.batch import MicroBatch, StepLayout
from kdscale.data.tokenization import TokenizedSample


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_micro_batch(
    samples: Sequence[TokenizedSample], *, pad_token_id: int, pad_to_multiple_of: int = 1
) -> MicroBatch:
    """Right-pad samples to their longest length (rounded up to ``pad_to_multiple_of``) into one MicroBatch."""
    length = _round_up(max(len(s) for s in samples), pad_to_multiple_of)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.int64)
    loss_mask = torch.zeros((len(samples), length), dtype=torch.bool)
    kd_mask = _kd_mask(samples, (len(samples), length))
    for b, sample in enumerate(samples):
        n = len(sample)
        input_ids[b, :n] = torch.from_numpy(sample.input_ids.astype(np.int64))
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = torch.from_numpy(sample.loss_mask)
        if kd_mask is not None:
            kd_mask[b, :n] = torch.from_numpy(sample.kd_mask)
    return MicroBatch(
        input_ids, attention_mask, loss_mask, sample_ids=[s.sample_id for s in samples], kd_mask=kd_mask
    )


def _kd_mask(samples: Sequence[TokenizedSample], shape: tuple[int, int]) -> torch.Tensor | None:
    """An all-False [B, L] kd mask if the samples carry kd masks (cross-tokenizer), else None; all or none must."""
    with_mask = sum(s.kd_mask is not None for s in samples)
    if with_mask not in (0, len(samples)):
        raise ValueError("either every sample of a micro-batch has a kd_mask (cross-tokenizer) or none has")
    return torch.zeros(shape, dtype=torch.bool) if with_mask else None


def make_packed_micro_batch(
    samples: Sequence[TokenizedSample], *, pad_token_id: int, pad_to_multiple_of: int = 1
) -> MicroBatch:
    """Samples end to end in one row, position ids restarting per sample, the first token of each not a target.

    The row is right-padded to a multiple of ``pad_to_multiple_of``; the pad tail is not attended and its position
    ids restart at 0 (see :mod:`kdscale.data.batch`).
    """
    num_tokens = sum(len(s) for s in samples)
    length = _round_up(num_tokens, pad_to_multiple_of)
    input_ids = torch.full((1, length), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((1, length), dtype=torch.int64)
    loss_mask = torch.zeros((1, length), dtype=torch.bool)
    position_ids = torch.zeros((1, length), dtype=torch.int64)
    kd_mask = _kd_mask(samples, (1, length))
    start = 0
    for sample in samples:
        stop = start + len(sample)
        input_ids[0, start:stop] = torch.from_numpy(sample.input_ids.astype(np.int64))
        attention_mask[0, start:stop] = 1
        loss_mask[0, start + 1 : stop] = torch.from_numpy(sample.loss_mask[1:])
        if kd_mask is not None:
            kd_mask[0, start + 1 : stop] = torch.from_numpy(sample.kd_mask[1:])
        position_ids[0, start:stop] = torch.arange(len(sample))
        start = stop
    position_ids[0, start:] = torch.arange(length - start)
    return MicroBatch(
        input_ids, attention_mask, loss_mask, sample_ids=[s.sample_id for s in samples], position_ids=position_ids,
        kd_mask=kd_mask,
    )


def make_filler_micro_batch(*, pad_token_id: int, pad_to_multiple_of: int = 1) -> MicroBatch:
    """A micro-batch without samples or targets ([1, pad_to_multiple_of] attended pad tokens, no loss)."""
    length = pad_to_multiple_of
    return MicroBatch(
        input_ids=torch.full((1, length), pad_token_id, dtype=torch.int64),
        attention_mask=torch.ones((1, length), dtype=torch.int64),
        loss_mask=torch.zeros((1, length), dtype=torch.bool),
        sample_ids=[],
    )


def balance_ranks(samples: Sequence[TokenizedSample], dp_size: int) -> list[list[TokenizedSample]]:
    """Assign samples to ``dp_size`` ranks, longest first onto the least-loaded rank.

    Ties go to the rank with fewer samples, then the lowest rank; deterministic for a given set of samples.
    """
    loads = [(0, 0, dp_rank) for dp_rank in range(dp_size)]  # a heap of (num_tokens, num_samples, dp_rank)
    shards: list[list[TokenizedSample]] = [[] for _ in range(dp_size)]
    for sample in sorted(samples, key=lambda s: (-len(s), s.sample_id)):
        num_tokens, num_samples, dp_rank = heapq.heappop(loads)
        shards[dp_rank].append(sample)
        heapq.heappush(loads, (num_tokens + len(sample), num_samples + 1, dp_rank))
    return shards


def _group_padded(samples: list[TokenizedSample], max_tokens: int, multiple: int) -> list[list[TokenizedSample]]:
    """Greedy grouping of samples (already sorted longest first) into groups with padded B * L <= max_tokens."""
    groups: list[list[TokenizedSample]] = []
    for sample in samples:
        if groups:
            group = groups[-1]
            length = _round_up(len(group[0]), multiple)  # the longest: samples come longest first
            if (len(group) + 1) * length <= max_tokens:
                group.append(sample)
                continue
        groups.append([sample])
    return groups


def _group_packed(samples: list[TokenizedSample], max_tokens: int, multiple: int) -> list[list[TokenizedSample]]:
    """First-fit decreasing (samples already sorted longest first) into groups of at most ``max_tokens`` tokens."""
    groups: list[list[TokenizedSample]] = []
    sizes: list[int] = []
    for sample in samples:
        for index, size in enumerate(sizes):
            if _round_up(size + len(sample), multiple) <= max_tokens:
                groups[index].append(sample)
                sizes[index] += len(sample)
                break
        else:
            groups.append([sample])
            sizes.append(len(sample))
    return groups


def _split_largest(groups: list[list[TokenizedSample]]) -> bool:
    """Split the group with the most samples (ties: earliest) in two halves in place; False if none has two."""
    index = max(range(len(groups)), key=lambda i: (len(groups[i]), -i))
    group = groups[index]
    if len(group) < 2:
        return False
    half = (len(group) + 1) // 2
    groups[index : index + 1] = [group[:half], group[half:]]
    return True


def build_step_layout(
    samples: Sequence[TokenizedSample],
    *,
    dp_size: int,
    max_tokens_per_micro_batch: int,
    pad_token_id: int,
    step: int = 0,
    epoch: int = 0,
    pad_to_multiple_of: int = 1,
    packing: bool = False,
    teacher_samples: Mapping[int, TokenizedSample] | None = None,
    teacher_pad_token_id: int | None = None,
) -> StepLayout:
    """Lay a global batch out per data-parallel rank (see the module docstring for the scheme).

    Args:
        samples: the step's samples (at least ``dp_size``).
        dp_size: number of student data-parallel ranks.
        max_tokens_per_micro_batch: bound on the padded size ``B * L`` of a micro-batch, or with ``packing`` on
            the sum of its samples' tokens (rounded up to ``pad_to_multiple_of``); a single sample longer than it
            is alone in its micro-batch.
        pad_token_id: the id that right-pads input_ids (any id works: padding is masked out).
        step, epoch: recorded in the layout.
        pad_to_multiple_of: round each micro-batch's L up to a multiple of this (e.g. the TP size under sequence
            parallelism); counted in ``B * L``.
        packing: lay each micro-batch out packed (one row, samples end to end) instead of right-padded.
        teacher_samples: cross-tokenizer only: the teacher's tokenization of every sample, by sample id (its
            loss_mask marks the aligned predictions). The layout then also holds ``teacher_shards``: per student
            micro-batch, one teacher micro-batch of the same samples in the same order (grouped by the student's
            token counts, so a teacher micro-batch may exceed the token budget by the tokenizers' difference).
        teacher_pad_token_id: the id that pads the teacher's micro-batches (default ``pad_token_id``).
    """
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if max_tokens_per_micro_batch < 1:
        raise ValueError(f"max_tokens_per_micro_batch must be >= 1, got {max_tokens_per_micro_batch}")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if len(samples) < dp_size:
        raise ValueError(
            f"the global batch has {len(samples)} samples, fewer than the {dp_size} data-parallel ranks: "
            f"raise the global batch size to at least {dp_size}"
        )
    shards = balance_ranks(samples, dp_size)
    assert all(shards), "with at least dp_size samples, every rank gets one"
    group = _group_packed if packing else _group_padded
    make = make_packed_micro_batch if packing else make_micro_batch
    groups = [group(shard, max_tokens_per_micro_batch, pad_to_multiple_of) for shard in shards]
    num_micro_batches = max(len(g) for g in groups)
    for rank_groups in groups:
        while len(rank_groups) < num_micro_batches and _split_largest(rank_groups):
            pass

    def lay_out(rank_groups: list[list[TokenizedSample]], pad_id: int) -> list[MicroBatch]:
        micro_batches = [make(g, pad_token_id=pad_id, pad_to_multiple_of=pad_to_multiple_of) for g in rank_groups]
        while len(micro_batches) < num_micro_batches:
            micro_batches.append(make_filler_micro_batch(pad_token_id=pad_id, pad_to_multiple_of=pad_to_multiple_of))
        return micro_batches

    layout = [lay_out(rank_groups, pad_token_id) for rank_groups in groups]
    global_num_loss_tokens = sum(mb.num_loss_tokens for shard in layout for mb in shard)
    if teacher_samples is None:
        return StepLayout(shards=layout, global_num_loss_tokens=global_num_loss_tokens, epoch=epoch, step=step)
    missing = sorted({s.sample_id for s in samples} - set(teacher_samples))
    if missing:
        raise ValueError(f"teacher_samples has no teacher tokenization of sample(s) {missing[:5]}")
    teacher_pad = pad_token_id if teacher_pad_token_id is None else teacher_pad_token_id
    teacher_layout = [
        lay_out([[teacher_samples[s.sample_id] for s in group] for group in rank_groups], teacher_pad)
        for rank_groups in groups
    ]
    for shard, teacher_shard in zip(layout, teacher_layout):
        for micro_batch, teacher_batch in zip(shard, teacher_shard):
            if micro_batch.num_kd_tokens != teacher_batch.num_loss_tokens:
                raise ValueError(
                    f"samples {micro_batch.sample_ids}: the student has {micro_batch.num_kd_tokens} aligned "
                    f"predictions but the teacher {teacher_batch.num_loss_tokens}: pair the samples with "
                    "kdscale.algorithms.cross_tokenizer.pair_samples"
                )
    return StepLayout(
        shards=layout, global_num_loss_tokens=global_num_loss_tokens, epoch=epoch, step=step,
        teacher_shards=teacher_layout,
        global_num_kd_tokens=sum(mb.num_loss_tokens for shard in teacher_layout for mb in shard),
    )  # fmt: skip


class StepSampler:
    """Which samples each optimizer step trains on: fixed-size global batches of sample indices.

    The order is a permutation of ``range(num_samples)`` drawn from ``(seed, epoch)`` (identity if not
    ``shuffle``); the last incomplete batch of an epoch is dropped. ``next_step()`` returns ``(epoch, indices)``
    and moves on, epoch after epoch; the caller decides when to stop. ``state_dict()`` is the position of the NEXT
    step (``epoch``, ``step_in_epoch``): save it together with the model state of the last trained step, and
    ``load_state_dict`` continues exactly there (a sampler that ran ahead, e.g. for prefetching, must save the
    position after the last TRAINED step instead: see :meth:`position_after`).
    """

    def __init__(self, num_samples: int, *, global_batch_size: int, seed: int, shuffle: bool = True) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch ({global_batch_size}): "
                f"lower data.global_batch_size or add data"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_samples // global_batch_size
        self.epoch = 0
        self.step_in_epoch = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the samples in ``epoch``: a function of (seed, epoch, shuffle) only."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples)
            self._order = (epoch, order)
        return self._order[1]

    def position_after(self, epoch: int, step_in_epoch: int) -> dict[str, int]:
        """The sampler position that follows step ``step_in_epoch`` of ``epoch``."""
        step_in_epoch += 1
        if step_in_epoch == self.steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        return {"epoch": epoch, "step_in_epoch": step_in_epoch}

    def next_step(self) -> tuple[int, list[int]]:
        """``(epoch, sample indices)`` of the next step (``global_batch_size`` indices); advances the position."""
        epoch, start = self.epoch, self.step_in_epoch * self.global_batch_size
        indices = self.permutation(epoch)[start : start + self.global_batch_size].tolist()
        position = self.position_after(self.epoch, self.step_in_epoch)
        self.epoch, self.step_in_epoch = position["epoch"], position["step_in_epoch"]
        return epoch, indices

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict[str, Any]:
        """Position of the next step, plus what must match on resume."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state["epoch"], state["step_in_epoch"]``; seed, shuffle, dataset and batch size must match.

        Keys other than the position are checked only if present (a :meth:`position_after` dict is accepted).
        """
        mine = self.state_dict()
        for key in ("seed", "shuffle", "num_samples", "global_batch_size"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume the data order: the checkpoint's sampler has {key}={state[key]!r}, this run has "
                    f"{mine[key]!r}; resume with the same dataset, max_seq_len/truncation (they change which rows "
                    f"are kept), seed, shuffle and global batch size, or start a new run"
                )
        epoch, step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step_in_epoch < self.steps_per_epoch:
            raise ValueError(
                f"invalid sampler state: epoch={epoch}, step_in_epoch={step_in_epoch} "
                f"(steps_per_epoch={self.steps_per_epoch})"
            )
        self.epoch, self.step_in_epoch = epoch, step_in_epoch
