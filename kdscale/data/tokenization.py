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

The rendering steps (:func:`resolve_rendering`, :func:`encode_rows`, :func:`fit_to_length`) are public so that
cross-tokenizer distillation (:mod:`kdscale.algorithms.cross_tokenizer`) renders rows for a second tokenizer
exactly as :func:`tokenize_rows` does, with the character offset of every token.
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
ENCODE_BATCH = 1024  # rows rendered and tokenized per tokenizer call


@dataclass(eq=False)
class TokenizedSample:
    """One tokenized row: ``input_ids`` (int32) and ``loss_mask`` (bool, True on response + EOS), same length."""

    sample_id: int
    input_ids: np.ndarray
    loss_mask: np.ndarray
    # Cross-tokenizer distillation only: True on the target tokens whose prediction has an aligned teacher
    # prediction (a subset of loss_mask; see kdscale.algorithms.cross_tokenizer). None: every target is distilled.
    kd_mask: np.ndarray | None = None

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
    check_length_policy(max_seq_len, truncation)
    rendering = resolve_rendering(
        tokenizer, chat_template=chat_template, eos_token_id=eos_token_id, add_eos=add_eos, separator=separator
    )
    if stats is None:
        stats = DatasetStats(source="<rows>", num_rows=len(rows))
    else:
        stats = replace(stats, rejected=list(stats.rejected), dropped=list(stats.dropped))

    samples: list[TokenizedSample] = []
    for start in range(0, len(rows), ENCODE_BATCH):
        chunk = rows[start : start + ENCODE_BATCH]
        for row, item in zip(chunk, encode_rows(chunk, tokenizer, rendering)):
            if isinstance(item, str):
                stats.dropped.append(RejectedRow(row.line, item))
                continue
            fitted = fit_to_length(item, max_seq_len, truncation)
            if isinstance(fitted, str):
                stats.dropped.append(RejectedRow(row.line, fitted))
                continue
            ids, mask = fitted
            stats.num_truncated += int(len(ids) < len(item.input_ids))
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


# ----------------------------------------------------------------------------------------------- rendering
# Shared with kdscale.algorithms.cross_tokenizer, which renders the same rows with a second (teacher) tokenizer
# and needs the character offsets of exactly the tokens tokenize_rows produces.


@dataclass(frozen=True)
class Rendering:
    """How rows become text and tokens for one tokenizer (resolve it with :func:`resolve_rendering`).

    ``chat_template`` None means plain prompt/response rows. ``eos_token_id`` is, with a chat template, the
    end-of-turn token that closes the assistant turn; without one, the EOS appended after the response (None:
    nothing is appended).
    """

    chat_template: str | None
    eos_token_id: int | None
    separator: str = "\n"


def resolve_rendering(
    tokenizer: Any,
    *,
    chat_template: str | None = None,
    eos_token_id: int | None = None,
    add_eos: bool = True,
    separator: str = "\n",
) -> Rendering:
    """The rendering :func:`tokenize_rows` uses for these arguments (defaults: the tokenizer's template and EOS).

    Raises:
        ValueError: the closing token is needed but the tokenizer has no eos_token and none is given.
    """
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if eos is None and (template or add_eos):
        raise ValueError("the tokenizer has no eos_token: pass eos_token_id (the end-of-turn token id)")
    return Rendering(template or None, eos if (template or add_eos) else None, separator)


@dataclass(frozen=True, eq=False)
class EncodedRow:
    """One row rendered and tokenized, before truncation: what :func:`tokenize_rows` turns into a sample.

    ``text`` is the rendered text the tokens come from (chat: the conversation as the template writes it; plain:
    prompt + separator + response). ``offsets`` (only when asked for) holds the ``[start, end)`` character span
    of each token in ``text``; tokens kdscale adds itself (the plain BOS and EOS) are zero-width at the start and
    at the end of the text.
    """

    input_ids: np.ndarray  # [N] int32
    loss_mask: np.ndarray  # [N] bool, True on the response and the closing token
    text: str
    offsets: np.ndarray | None = None  # [N, 2] int64


def encode_rows(
    rows: Sequence[Row], tokenizer: Any, rendering: Rendering, *, with_offsets: bool = False
) -> list[EncodedRow | str]:
    """Render and tokenize rows (one batched tokenizer call per part); per row an :class:`EncodedRow`, or the
    reason it is dropped. ``with_offsets`` needs a fast tokenizer.

    Raises:
        DataError: a "messages" row and no chat template.
        ValueError: the chat template does not close the assistant turn with ``rendering.eos_token_id``.
    """
    if rendering.chat_template:
        return _encode_chat(rows, tokenizer, rendering.chat_template, rendering.eos_token_id, with_offsets)
    return _encode_plain(rows, tokenizer, rendering.eos_token_id, rendering.separator, with_offsets)


def check_length_policy(max_seq_len: int, truncation: str) -> None:
    """Raise ``ValueError`` for a truncation policy or ``max_seq_len`` that :func:`fit_to_length` cannot apply."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"data.truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if max_seq_len < 2:
        raise ValueError(f"data.max_seq_len must be at least 2 (a prompt token and a target), got {max_seq_len}")


def fit_to_length(encoded: EncodedRow, max_seq_len: int, truncation: Truncation) -> tuple[np.ndarray, np.ndarray] | str:
    """Apply the truncation policy (module docstring): ``(ids, mask)``, cut if needed, or the reason to drop."""
    ids, mask = encoded.input_ids, encoded.loss_mask
    if len(ids) > max_seq_len:
        if truncation == "drop":
            return f"too long ({len(ids)} tokens > max_seq_len {max_seq_len})"
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if not mask[1:].any():
            return f"too long (no response token within max_seq_len {max_seq_len})"
    if not mask[1:].any():
        return "no target token to predict"
    return ids, mask


def _encode(
    tokenizer: Any, texts: list[str], with_offsets: bool
) -> tuple[list[list[int]], list[list[tuple[int, int]]] | None]:
    if not texts:
        return [], ([] if with_offsets else None)
    encoding = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=with_offsets)
    return list(encoding["input_ids"]), (list(encoding["offset_mapping"]) if with_offsets else None)


def _encode_chat(
    rows: Sequence[Row], tokenizer: Any, template: str, eos: int | None, with_offsets: bool
) -> list[EncodedRow | str]:
    """Per row: the conversation's tokens up to the last end-of-turn token, or the reason it is dropped."""
    assert eos is not None, "resolve_rendering requires an end-of-turn token with a chat template"
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
    all_prompt_ids, _ = _encode(tokenizer, prompts, False)
    all_full_ids, all_offsets = _encode(tokenizer, fulls, with_offsets)
    out: list[EncodedRow | str] = []
    for k, (row, prompt_ids, full_ids) in enumerate(zip(rows, all_prompt_ids, all_full_ids)):
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
        offsets = None if all_offsets is None else np.asarray(all_offsets[k][:end], np.int64).reshape(-1, 2)
        out.append(EncodedRow(ids, mask, fulls[k], offsets))
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
    rows: Sequence[Row], tokenizer: Any, eos: int | None, separator: str, with_offsets: bool
) -> list[EncodedRow | str]:
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
    all_prompt_ids, prompt_offsets = _encode(tokenizer, prompts, with_offsets)
    all_response_ids, response_offsets = _encode(tokenizer, responses, with_offsets)
    out: list[EncodedRow | str] = []
    for k, (prompt_ids, response_ids) in enumerate(zip(all_prompt_ids, all_response_ids)):
        n_prompt = len(bos) + len(prompt_ids)
        ids = np.asarray(bos + prompt_ids + response_ids + tail, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[n_prompt:] = True
        text = prompts[k] + responses[k]
        offsets = None
        if prompt_offsets is not None and response_offsets is not None:
            offsets = np.asarray(
                [(0, 0)] * len(bos)
                + [tuple(o) for o in prompt_offsets[k]]
                + [(s + len(prompts[k]), e + len(prompts[k])) for s, e in response_offsets[k]]
                + [(len(text), len(text))] * len(tail),
                np.int64,
            ).reshape(-1, 2)
        out.append(EncodedRow(ids, mask, text, offsets))
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
