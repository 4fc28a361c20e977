"""Tokenize rows once (in the controller) into token ids and a loss mask over the response tokens.

Design:
- With a chat template (the tokenizer's, or ``chat_template=``), the prompt messages are rendered with
  ``add_generation_prompt=True`` and the whole conversation without it. The prompt's token ids must be a prefix
  of the conversation's (rows where they are not are dropped and reported); the tokens after that prefix are
  the assistant turn. The mask is True from the first response token up to and including the end-of-turn token
  (``eos_token_id``, default ``tokenizer.eos_token_id``; for ChatML templates ``<|im_end|>``), and whatever the
  template renders after it (e.g. ``"\\n"``) is cut off: it is no target and nothing after it is trained.
  BOS and other special tokens appear exactly where the template writes them (text is tokenized with
  ``add_special_tokens=False``, as ``apply_chat_template`` does).
- Without a chat template (prompt/response rows only): ``ids = [BOS] + prompt + separator + response + [EOS]``,
  each part tokenized on its own so the prompt/response boundary is exact. BOS is added only if the tokenizer
  adds it to plain text; the EOS (a target) only if ``add_eos``.
- Prompt tokens are never in the mask; the mask convention is that of :mod:`kdscale.data.batch`.

Truncation policy (``max_seq_len`` counts all tokens of a sample):
- ``"right"``: a longer sample is cut at the end (its EOS, and possibly part of the response, is lost). A sample
  left with no target token to predict is dropped and reported as "too long".
- ``"drop"``: any sample longer than ``max_seq_len`` is dropped and reported as "too long".
Dropped samples are reported in :class:`DatasetStats` (``dropped``) and logged; they do not count toward
``max_bad_fraction``, which is about malformed rows only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kdscale.data.jsonl import DataError, DatasetStats, RejectedRow, Row, read_jsonl

logger = logging.getLogger(__name__)

Truncation = Literal["right", "drop"]
TRUNCATIONS = ("right", "drop")
_BATCH = 1024  # rows rendered and tokenized per tokenizer call


@dataclass(eq=False)
class TokenizedSample:
    """One tokenized row: ``input_ids`` (int32) and ``loss_mask`` (bool, True on response + EOS), same length."""

    sample_id: int
    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        """Target tokens that have a preceding position (what the loss counts; see ``MicroBatch``)."""
        return int(self.loss_mask[1:].sum())


def tokenize_rows(
    rows: Sequence[Row],
    tokenizer: Any,
    *,
    max_seq_len: int,
    truncation: Truncation = "right",
    add_eos: bool = True,
    chat_template: str | None = None,
    eos_token_id: int | None = None,
    separator: str = "\n",
    stats: DatasetStats | None = None,
) -> tuple[list[TokenizedSample], DatasetStats]:
    """Tokenize rows into samples (``sample_id`` = the row's) and return them with updated stats.

    Args:
        rows: validated rows (see :func:`kdscale.data.jsonl.read_jsonl`).
        tokenizer: a Hugging Face tokenizer.
        max_seq_len: longest sample in tokens; see the truncation policy in the module docstring.
        truncation: ``"right"`` (cut the end) or ``"drop"`` (drop the sample).
        add_eos: without a chat template, append ``eos_token_id`` after the response as a target.
            With a chat template the template's own end-of-turn token is the closing target.
        chat_template: a Jinja chat template overriding the tokenizer's (``None``: the tokenizer's, if any).
        eos_token_id: the end-of-turn token (default ``tokenizer.eos_token_id``).
        separator: without a chat template, text appended to a non-empty prompt (part of the prompt).
        stats: stats from reading the rows, to be continued (a copy is returned; the argument is not modified).

    Raises:
        DataError: no sample is left, or a "messages" row needs a chat template the tokenizer does not have.
        ValueError: bad arguments, or the chat template does not end the assistant turn with ``eos_token_id``.
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"data.truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if max_seq_len < 2:
        raise ValueError(f"data.max_seq_len must be at least 2 (a prompt token and a target), got {max_seq_len}")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if eos is None and (template or add_eos):
        raise ValueError("the tokenizer has no eos_token: pass eos_token_id (the end-of-turn token id)")
    if stats is None:
        stats = DatasetStats(source="<rows>", num_rows=len(rows))
    else:
        stats = replace(stats, rejected=list(stats.rejected), dropped=list(stats.dropped))

    samples: list[TokenizedSample] = []
    for start in range(0, len(rows), _BATCH):
        chunk = rows[start : start + _BATCH]
        if template:
            encoded = _encode_chat(chunk, tokenizer, template, eos)
        else:
            encoded = _encode_plain(chunk, tokenizer, eos if add_eos else None, separator)
        for row, item in zip(chunk, encoded):
            if isinstance(item, str):
                stats.dropped.append(RejectedRow(row.line, item))
                continue
            ids, mask = item
            if len(ids) > max_seq_len:
                if truncation == "drop":
                    stats.dropped.append(
                        RejectedRow(row.line, f"too long ({len(ids)} tokens > max_seq_len {max_seq_len})")
                    )
                    continue
                ids, mask = ids[:max_seq_len], mask[:max_seq_len]
                if not mask[1:].any():
                    stats.dropped.append(
                        RejectedRow(row.line, f"too long (no response token within max_seq_len {max_seq_len})")
                    )
                    continue
                stats.num_truncated += 1
            if not mask[1:].any():
                stats.dropped.append(RejectedRow(row.line, "no target token to predict"))
                continue
            samples.append(TokenizedSample(row.sample_id, ids, mask))
            stats.num_tokens += len(ids)
            stats.num_loss_tokens += int(mask[1:].sum())
    stats.num_samples = len(samples)

    if not samples:
        raise DataError(
            f"{stats.dropped_report()}. No sample is left: for rows that are too long, raise data.max_seq_len or "
            f"use data.truncation='right'; for a chat template whose prompt is not a prefix, use another template"
        )
    if stats.dropped:
        logger.warning("%s", stats.dropped_report())
    if stats.num_truncated:
        logger.info("%s: %d samples cut to max_seq_len=%d", stats.source, stats.num_truncated, max_seq_len)
    return samples, stats


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else []


def _encode_chat(
    rows: Sequence[Row], tokenizer: Any, template: str, eos: int
) -> list[tuple[np.ndarray, np.ndarray] | str]:
    """Per row: (ids, mask), or the reason it is dropped."""
    prompts = [
        tokenizer.apply_chat_template(
            row.prompt_messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
        for row in rows
    ]
    fulls = [
        tokenizer.apply_chat_template(list(map(dict, row.messages)), chat_template=template, tokenize=False)
        for row in rows
    ]
    out: list[tuple[np.ndarray, np.ndarray] | str] = []
    for row, prompt_ids, full_ids in zip(rows, _ids(tokenizer, prompts), _ids(tokenizer, fulls)):
        n = len(prompt_ids)
        if full_ids[:n] != prompt_ids:
            out.append("chat template: the prompt's tokens are not a prefix of the conversation's tokens")
            continue
        turn = full_ids[n:]
        if eos not in turn:
            raise ValueError(
                f"line {row.line}: the chat template's assistant turn {tokenizer.decode(turn)!r} does not contain "
                f"the end-of-turn token id {eos} ({tokenizer.convert_ids_to_tokens(eos)!r}): pass eos_token_id= "
                f"the template's end-of-turn token (e.g. the id of <|im_end|> for ChatML)"
            )
        end = n + len(turn) - turn[::-1].index(eos)  # one past the LAST end-of-turn token of the turn
        ids = np.asarray(full_ids[:end], dtype=np.int32)
        mask = np.zeros(end, dtype=bool)
        mask[n:] = True
        out.append((ids, mask))
    return out


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` if the tokenizer prepends BOS to plain text, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if bos is not None and with_special[:1] == [bos] and without[:1] != [bos]:
        return [bos]
    return []


def _encode_plain(
    rows: Sequence[Row], tokenizer: Any, eos: int | None, separator: str
) -> list[tuple[np.ndarray, np.ndarray] | str]:
    """Prompt/response rows without a chat template: ``[BOS] prompt separator | response [EOS]``."""
    for row in rows:
        if row.format != "prompt_response":
            raise DataError(
                f"line {row.line}: a 'messages' row needs a chat template, and the tokenizer has none: "
                f"set a chat template (data.chat_template) or write the rows as prompt/response"
            )
    bos = _bos_prefix(tokenizer)
    prompts = [row.messages[0]["content"] + separator if row.messages[0]["content"] else "" for row in rows]
    responses = [row.response for row in rows]
    tail = [eos] if eos is not None else []
    out: list[tuple[np.ndarray, np.ndarray] | str] = []
    for prompt_ids, response_ids in zip(_ids(tokenizer, prompts), _ids(tokenizer, responses)):
        n_prompt = len(bos) + len(prompt_ids)
        ids = np.asarray(bos + prompt_ids + response_ids + tail, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[n_prompt:] = True
        out.append((ids, mask))
    return out


def load_jsonl_dataset(
    path: str | Path,
    tokenizer: Any,
    *,
    max_seq_len: int,
    truncation: Truncation = "right",
    max_bad_fraction: float = 0.0,
    add_eos: bool = True,
    chat_template: str | None = None,
    eos_token_id: int | None = None,
    separator: str = "\n",
) -> tuple[list[TokenizedSample], DatasetStats]:
    """Read, validate and tokenize a JSONL file: :func:`read_jsonl` then :func:`tokenize_rows`; logs a summary."""
    rows, stats = read_jsonl(path, max_bad_fraction=max_bad_fraction)
    samples, stats = tokenize_rows(
        rows,
        tokenizer,
        max_seq_len=max_seq_len,
        truncation=truncation,
        add_eos=add_eos,
        chat_template=chat_template,
        eos_token_id=eos_token_id,
        separator=separator,
        stats=stats,
    )
    logger.info("%s", stats.summary())
    return samples, stats
