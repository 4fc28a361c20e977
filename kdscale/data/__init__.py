"""Datasets, tokenization with loss masks, and per-rank micro-batch layout for the student.

Flow (in the controller): :func:`load_jsonl_dataset` (read + validate + tokenize once) -> :class:`StepSampler`
(which samples each step trains on) -> :func:`build_step_layout` (token-balanced micro-batches per DP rank,
right-padded or packed).
"""

from kdscale.data.batch import (
    MicroBatch,
    StepLayout,
    block_causal_mask,
    gather_labels,
    gather_prediction_rows,
    prediction_mask,
    sample_spans,
)
from kdscale.data.jsonl import DataError, DatasetStats, RejectedRow, Row, read_jsonl, rows_from_records
from kdscale.data.layout import (
    StepSampler,
    balance_ranks,
    build_step_layout,
    make_filler_micro_batch,
    make_micro_batch,
    make_packed_micro_batch,
)
from kdscale.data.tokenization import TokenizedSample, load_jsonl_dataset, tokenize_rows

__all__ = [
    "DataError",
    "DatasetStats",
    "MicroBatch",
    "RejectedRow",
    "Row",
    "StepLayout",
    "StepSampler",
    "TokenizedSample",
    "balance_ranks",
    "block_causal_mask",
    "build_step_layout",
    "gather_labels",
    "gather_prediction_rows",
    "load_jsonl_dataset",
    "make_filler_micro_batch",
    "make_micro_batch",
    "make_packed_micro_batch",
    "prediction_mask",
    "read_jsonl",
    "rows_from_records",
    "sample_spans",
    "tokenize_rows",
]
