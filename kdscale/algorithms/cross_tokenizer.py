"""Pair every student sample with the teacher's tokenization of the same row, aligned on the response text.

Cross-tokenizer distillation: the student and the teacher cut each row into different tokens and may render it
with different chat templates. The controller tokenizes the rows for the student (:func:`tokenize_rows`);
:func:`pair_samples` tokenizes the same rows for the teacher and says which student predictions have a teacher
prediction of the same text from the same text. The student's ``kd_mask`` and the teacher sample's ``loss_mask``
mark those predictions, in the same order, so the trainer gathers matching rows on both sides with the usual
``hidden[:-1][mask[1:]]`` rule of :mod:`kdscale.data.batch`.

Design
------
- **Same rendering as the student's samples.** Both sides are rendered by :func:`kdscale.data.tokenization.
  encode_rows`, the code :func:`tokenize_rows` runs, with the character offset of every token; the teacher side
  gets the same ``max_seq_len``/``truncation`` rule (:func:`fit_to_length`). The student's re-rendered ids must
  equal the sample's (a prefix of them when it was cut); a row where they do not (``tokenize_rows`` was called
  with other arguments) gets no alignment and is counted.
- **Aligned on the response only.** The two full texts differ (templates, BOS, separators), so
  :func:`~kdscale.algorithms.token_alignment.align` runs on the response string that both contain. It is looked
  up in each rendered text after the end of the rendered prompt (``row.response``, else ``row.response.strip()``
  for templates that trim content, the same string on both sides). Tokens inside the response keep their span
  (in response coordinates) and special flag; tokens before it become zero-width at 0 and tokens after it zero-width
  at its end (both special); a token across a response edge is clipped to the response and made special, so the
  text under it stays unaligned. Specials and the whitespace-marker rule are those of
  :func:`~kdscale.algorithms.token_alignment.token_spans`.
- **Targets.** :func:`~kdscale.algorithms.token_alignment.prediction_pairs` keeps the pairs whose next token is a
  target on both sides (student ``loss_mask``, the teacher's response mask after truncation). The alignment itself
  is over the untruncated tokenizations (a cut through the byte tokens of one character must not leave a partial
  token that looks like the whole character), so truncation only removes pairs. Student position
  ``s`` and teacher position ``t`` set ``kd_mask[s + 1]`` and the teacher ``loss_mask[t + 1]``. The closing
  end-of-turn token (``<|im_end|>``, ``</s>``) lies after the response, so it is never aligned: its student target
  is in ``loss_mask`` but not in ``kd_mask``. Nor is a character split into several byte tokens on both sides
  (an emoji as four byte-level tokens): those tokens form a group, not 1:1 pairs.
- **Chunks, optionally in worker processes.** Rows are paired in chunks of :data:`CHUNK_ROWS` (one tokenizer call
  per side each); with ``num_workers`` > 1 the chunks run in a process pool (forked on Linux) and their results
  and reports are put back together in row order, so every worker count gives the serial result.
- **One bad row never stops the run.** A row whose teacher side is dropped (too long, prompt not a prefix), whose
  response is not found, or that has no aligned prediction gets an all-False ``kd_mask`` and a one-token teacher
  sample with an all-False mask (nothing to compute), and is counted in :class:`AlignmentReport`. Only a dataset
  where no sample at all has an alignment raises (the templates or tokenizers are wrong).

Assumptions: fast (Rust) tokenizers on both sides (character offsets). The chat template writes the last message's
content verbatim (or trimmed). Rows are those :func:`tokenize_rows` was given (``sample_id`` identifies the row).

Usage::

    samples, stats = tokenize_rows(rows, student_tokenizer, max_seq_len=L)
    samples, teacher_samples, report = pair_samples(rows, samples, student_tokenizer, teacher_tokenizer, max_seq_len=L)
    logger.info(report.summary(stats.source))
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdscale.algorithms.token_alignment import (
    TokenSpans,
    _content_positions,
    _require_fast,
    _special_ids,
    _SurfaceDecoder,
    align,
    prediction_pairs,
)
from kdscale.data.jsonl import DataError, RejectedRow, Row
from kdscale.data.tokenization import (
    EncodedRow,
    Rendering,
    TokenizedSample,
    Truncation,
    check_length_policy,
    encode_rows,
    fit_to_length,
    resolve_rendering,
)

__all__ = ["AlignmentReport", "pair_samples"]

logger = logging.getLogger(__name__)

_EXAMPLE_LIMIT = 10
CHUNK_ROWS = 256  # rows per unit of work (one tokenizer call per side); small enough to balance the workers
MAX_DEFAULT_WORKERS = 8
_REPORT_COUNTS = (
    "num_samples",
    "num_student_targets",
    "num_aligned",
    "num_teacher_targets",
    "num_without_alignment",
    "num_response_not_found",
    "num_teacher_dropped",
    "num_mismatched",
)


@dataclass
class AlignmentReport:
    """How many student target tokens of a dataset have an aligned teacher prediction, and why some do not.

    ``num_without_alignment`` counts every sample with no aligned prediction; ``num_response_not_found``,
    ``num_teacher_dropped`` and ``num_mismatched`` are the ones among them with a known cause (the rest had a
    response on both sides but no 1:1 prediction in it). ``examples`` lists the first few with their reason.
    """

    num_samples: int = 0
    num_student_targets: int = 0  # sum of student loss_mask[1:]
    num_aligned: int = 0  # sum of kd_mask[1:] (= sum of the teacher samples' loss_mask[1:])
    num_teacher_targets: int = 0  # teacher response targets (after truncation), before restricting to pairs
    num_without_alignment: int = 0
    num_response_not_found: int = 0  # the response text is not in one side's rendering (a template rewrote it)
    num_teacher_dropped: int = 0  # the teacher side is too long or its prompt is not a prefix of its conversation
    num_mismatched: int = 0  # the student sample is not what the student rendering gives (other arguments)
    examples: list[RejectedRow] = field(default_factory=list)

    @property
    def aligned_fraction(self) -> float:
        """Student target tokens with an aligned teacher prediction, over all student target tokens."""
        return self.num_aligned / self.num_student_targets if self.num_student_targets else 0.0

    def summary(self, source: str) -> str:
        """One line for the log."""
        return (
            f"{source}: {self.num_aligned}/{self.num_student_targets} student target tokens "
            f"({self.aligned_fraction:.1%}) have an aligned teacher prediction "
            f"(teacher: {self.num_teacher_targets} target tokens); {self.num_without_alignment} of "
            f"{self.num_samples} samples without any (response not found {self.num_response_not_found}, teacher "
            f"side dropped {self.num_teacher_dropped}, student sample mismatch {self.num_mismatched})"
        )

    def as_metrics(self, prefix: str = "cross_tokenizer") -> dict[str, float]:
        """The counts and the aligned fraction as ``{prefix}/name`` metrics."""
        metrics = {f"{prefix}/{name}": float(getattr(self, name)) for name in _REPORT_COUNTS}
        metrics[f"{prefix}/aligned_fraction"] = self.aligned_fraction
        return metrics

    def _add(self, other: AlignmentReport) -> None:
        """Add the report of the rows after this report's (the counts add up; examples stay the first ones)."""
        for name in _REPORT_COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples.extend(other.examples[: _EXAMPLE_LIMIT - len(self.examples)])

    def _count_unaligned(self, line: int, reason: str, cause: str | None) -> None:
        """One more sample without alignment; ``cause`` names the counter of its cause, if it has one."""
        self.num_without_alignment += 1
        if cause is not None:
            setattr(self, cause, getattr(self, cause) + 1)
        if len(self.examples) < _EXAMPLE_LIMIT:
            self.examples.append(RejectedRow(line, reason))


def pair_samples(
    rows: Sequence[Row],
    student_samples: Sequence[TokenizedSample],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    max_seq_len: int,
    truncation: Truncation = "right",
    teacher_chat_template: str | None = None,
    teacher_eos_token_id: int | None = None,
    student_chat_template: str | None = None,
    student_eos_token_id: int | None = None,
    add_eos: bool = True,
    separator: str = "\n",
    num_workers: int | None = None,
) -> tuple[list[TokenizedSample], dict[int, TokenizedSample], AlignmentReport]:
    """Tokenize the rows of ``student_samples`` for the teacher and align both sides' predictions on the response.

    Args:
        rows: the rows :func:`tokenize_rows` was given (looked up by ``sample_id``).
        student_samples: its samples (rows it dropped are simply absent).
        student_tokenizer, teacher_tokenizer: fast Hugging Face tokenizers.
        max_seq_len, truncation: the length policy, applied to the teacher side as to the student's.
        teacher_chat_template, teacher_eos_token_id: the teacher's rendering (None: its tokenizer's template and
            EOS), as :func:`tokenize_rows` takes them.
        student_chat_template, student_eos_token_id, add_eos, separator: the arguments ``tokenize_rows`` was
            given for the student (``add_eos``/``separator`` apply to both sides' plain prompt/response rows).
        num_workers: processes that pair chunks of :data:`CHUNK_ROWS` rows (None: the usable CPUs, at most
            :data:`MAX_DEFAULT_WORKERS`; 0 or 1: none, all in this process). Datasets of fewer than two chunks are
            paired in this process. The results are the same for any value.

    Returns:
        The student samples (same order, ids and ``loss_mask``; new objects with ``kd_mask`` set), the teacher
        sample of every student sample by ``sample_id`` (``loss_mask`` True exactly on the aligned teacher
        targets: the k-th True of ``kd_mask[1:]`` and of the teacher's ``loss_mask[1:]`` are the same prediction),
        and the report.

    Raises:
        ValueError: bad arguments (length policy, a slow tokenizer, no EOS, a negative ``num_workers``), a sample
            without its row, a repeated ``sample_id``, or a teacher chat template that does not close the turn with
            its EOS.
        DataError: "messages" rows and a teacher without a chat template, or no sample has any alignment.
    """
    check_length_policy(max_seq_len, truncation)
    student = _Side.of("student", student_tokenizer, student_chat_template, student_eos_token_id, add_eos, separator)
    teacher = _Side.of("teacher", teacher_tokenizer, teacher_chat_template, teacher_eos_token_id, add_eos, separator)
    rows_by_id = {row.sample_id: row for row in rows}
    seen: set[int] = set()
    for sample in student_samples:
        if sample.sample_id not in rows_by_id:
            raise ValueError(
                f"student sample {sample.sample_id} has no row with that sample_id: pass the rows that "
                "tokenize_rows was given"
            )
        if sample.sample_id in seen:
            raise ValueError(f"sample_id {sample.sample_id} appears twice among the student samples")
        seen.add(sample.sample_id)
    if teacher.rendering.chat_template is None and any(rows_by_id[i].format == "messages" for i in seen):
        raise DataError(
            "the dataset has 'messages' rows and the teacher tokenizer has no chat template: set the teacher's "
            "chat template (teacher_chat_template)"
        )

    pairing = _Pairing(student, teacher, max_seq_len, truncation)
    chunks = []
    for start in range(0, len(student_samples), CHUNK_ROWS):
        chunk = student_samples[start : start + CHUNK_ROWS]
        chunks.append((chunk, [rows_by_id[sample.sample_id] for sample in chunk]))
    num_workers = _resolve_num_workers(num_workers, len(chunks))
    results = _map_in_processes(pairing, chunks, num_workers) if num_workers > 1 else map(pairing, chunks)

    report = AlignmentReport()
    paired: list[TokenizedSample] = []
    teacher_samples: dict[int, TokenizedSample] = {}
    for (chunk, _), (kd_masks, chunk_teacher_samples, chunk_report) in zip(chunks, results):
        for sample, kd_mask, teacher_sample in zip(chunk, kd_masks, chunk_teacher_samples):
            paired.append(TokenizedSample(sample.sample_id, sample.input_ids, sample.loss_mask, kd_mask=kd_mask))
            teacher_samples[sample.sample_id] = teacher_sample
        report._add(chunk_report)

    if report.num_samples and not report.num_aligned:
        raise DataError(
            f"cross-tokenizer distillation: no sample has a student prediction aligned with a teacher prediction "
            f"({report.summary('dataset')}; e.g. {'; '.join(map(str, report.examples[:3]))}): check the teacher's "
            "and the student's chat templates (the response must appear verbatim in both) and max_seq_len"
        )
    if report.num_without_alignment:
        examples = "; ".join(map(str, report.examples))
        logger.warning("%d samples have no aligned teacher prediction: %s", report.num_without_alignment, examples)
    return paired, teacher_samples, report


# ----------------------------------------------------------------------------------------------- chunks

_ChunkResult = tuple[list[np.ndarray], list[TokenizedSample], AlignmentReport]


@dataclass
class _Pairing:
    """Pairs one chunk of rows: the student kd_mask and the teacher sample of each, and the chunk's report."""

    student: _Side
    teacher: _Side
    max_seq_len: int
    truncation: Truncation

    def __call__(self, chunk: tuple[Sequence[TokenizedSample], Sequence[Row]]) -> _ChunkResult:
        samples, rows = chunk
        report = AlignmentReport(num_samples=len(samples))
        kd_masks: list[np.ndarray] = []
        teacher_samples: list[TokenizedSample] = []
        student_encoded, teacher_encoded = self.student.encode(rows), self.teacher.encode(rows)
        for sample, row, s_enc, t_enc in zip(samples, rows, student_encoded, teacher_encoded):
            kd_mask, teacher_sample = _pair_one(
                sample, row, s_enc, t_enc, self.student, self.teacher, self.max_seq_len, self.truncation, report
            )
            kd_masks.append(kd_mask)
            teacher_samples.append(teacher_sample)
            report.num_student_targets += sample.num_loss_tokens
            report.num_aligned += int(kd_mask[1:].sum())
        return kd_masks, teacher_samples, report


def _resolve_num_workers(num_workers: int | None, num_chunks: int) -> int:
    """The number of worker processes to use; 1 means none (pair in this process)."""
    if num_workers is None:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        num_workers = min(MAX_DEFAULT_WORKERS, usable)
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more (0 or 1: no worker process), got {num_workers}")
    return max(1, min(num_workers, num_chunks)) if num_chunks >= 2 else 1


_WORKER_STATE: dict[str, _Pairing] = {}


def _init_worker(pairing: _Pairing) -> None:
    """Runs once in each worker process: keeps the pairing (tokenizers included) for the chunks it is sent."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _WORKER_STATE["pairing"] = pairing


def _pair_chunk_in_worker(chunk: tuple[Sequence[TokenizedSample], Sequence[Row]]) -> _ChunkResult:
    """Runs in a worker process: one chunk, paired with the worker's pairing."""
    return _WORKER_STATE["pairing"](chunk)


def _map_in_processes(
    pairing: _Pairing, chunks: Sequence[tuple[Sequence[TokenizedSample], Sequence[Row]]], num_workers: int
) -> list[_ChunkResult]:
    """``[pairing(chunk) for chunk in chunks]``, run in ``num_workers`` processes (forked where the OS can).

    A chunk's error is raised here as it would be by the serial loop: the one of the first failing chunk.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker, initargs=(pairing,))
    try:
        # The workers start during the submits. Older Hugging Face tokenizers releases warn in a forked child when
        # the parent has used their thread pool, unless TOKENIZERS_PARALLELISM is set: set it while they start.
        with _environment_default("TOKENIZERS_PARALLELISM", "false"):
            futures = [pool.submit(_pair_chunk_in_worker, chunk) for chunk in chunks]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(cancel_futures=True)


@contextlib.contextmanager
def _environment_default(name: str, value: str) -> Iterator[None]:
    """Set the environment variable ``name`` to ``value`` inside the block, unless it is set already."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


# ----------------------------------------------------------------------------------------------- one row


@dataclass
class _Side:
    """One tokenizer with its rendering, and what turning its offsets into spans needs (built once)."""

    name: str
    tokenizer: Any
    rendering: Rendering
    special_ids: np.ndarray  # sorted int64
    whitespace_ids: np.ndarray  # sorted int64: entries that stand for whitespace only ("▁", "Ġ", "\n")

    @classmethod
    def of(
        cls, name: str, tokenizer: Any, chat_template: str | None, eos: int | None, add_eos: bool, separator: str
    ) -> _Side:
        _require_fast(tokenizer)
        try:
            rendering = resolve_rendering(
                tokenizer, chat_template=chat_template, eos_token_id=eos, add_eos=add_eos, separator=separator
            )
        except ValueError as e:
            raise ValueError(f"{name} tokenizer: {e} (here: {name}_eos_token_id)") from e
        special = np.asarray(sorted(_special_ids(tokenizer)), np.int64)
        surface = _SurfaceDecoder(tokenizer)
        whitespace = sorted(
            int(i)
            for token, i in tokenizer.get_vocab().items()
            if surface(int(i), token).decode("utf-8", "replace").isspace()
        )
        return cls(name, tokenizer, rendering, special, np.asarray(whitespace, np.int64))

    def encode(self, rows: Sequence[Row]) -> list[EncodedRow | str]:
        """:func:`encode_rows` with offsets; its errors name the side."""
        try:
            return encode_rows(rows, self.tokenizer, self.rendering, with_offsets=True)
        except ValueError as e:  # DataError included
            raise type(e)(f"{self.name} tokenizer: {e}") from e

    def placeholder_id(self, encoded: EncodedRow | str) -> int:
        """The one token of a teacher sample that has nothing to distill."""
        if isinstance(encoded, EncodedRow) and len(encoded.input_ids):
            return int(encoded.input_ids[0])
        for candidate in (
            getattr(self.tokenizer, "bos_token_id", None),
            self.rendering.eos_token_id,
            getattr(self.tokenizer, "eos_token_id", None),
        ):
            if candidate is not None:
                return int(candidate)
        return 0

    def token_spans(self, encoded: EncodedRow) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``starts, ends, special`` of the tokens in ``encoded.text``, as ``token_spans`` makes them."""
        assert encoded.offsets is not None, "encode_rows(..., with_offsets=True)"
        ids = encoded.input_ids.astype(np.int64)
        starts, ends = encoded.offsets[:, 0].copy(), encoded.offsets[:, 1].copy()
        special = _is_in(ids, self.special_ids)
        # token_spans' whitespace-marker rule: a token that stands for whitespace only ("▁") but is reported over
        # other text (SentencePiece's prepended marker, at the first character) is made zero-width.
        markers = np.flatnonzero(~special & (ends > starts) & _is_in(ids, self.whitespace_ids))
        if len(markers):
            content = _content_positions(encoded.text)
            over_content = np.searchsorted(content, ends[markers]) > np.searchsorted(content, starts[markers])
            ends[markers[over_content]] = starts[markers[over_content]]
        return starts, ends, special


def _pair_one(
    sample: TokenizedSample,
    row: Row,
    s_enc: EncodedRow | str,
    t_enc: EncodedRow | str,
    student: _Side,
    teacher: _Side,
    max_seq_len: int,
    truncation: Truncation,
    report: AlignmentReport,
) -> tuple[np.ndarray, TokenizedSample]:
    """The student's kd_mask and the teacher sample of one row; failures are counted in ``report``."""
    n_student = len(sample)
    kd_mask = np.zeros(n_student, dtype=bool)

    def no_alignment(reason: str, cause: str | None = None) -> tuple[np.ndarray, TokenizedSample]:
        report._count_unaligned(row.line, reason, cause)
        placeholder = np.asarray([teacher.placeholder_id(t_enc)], np.int32)
        return kd_mask, TokenizedSample(sample.sample_id, placeholder, np.zeros(1, dtype=bool))

    if isinstance(s_enc, str):
        return no_alignment(f"the student rendering drops the row ({s_enc})", "num_mismatched")
    if (
        len(s_enc.input_ids) < n_student
        or not np.array_equal(s_enc.input_ids[:n_student], sample.input_ids)
        or not np.array_equal(s_enc.loss_mask[:n_student], sample.loss_mask)
    ):
        return no_alignment(
            "the student sample differs from the student rendering (pass pair_samples the chat template, EOS and "
            "separator that tokenize_rows used)",
            "num_mismatched",
        )
    if isinstance(t_enc, str):
        return no_alignment(f"teacher side: {t_enc}", "num_teacher_dropped")
    fitted = fit_to_length(t_enc, max_seq_len, truncation)
    if isinstance(fitted, str):
        return no_alignment(f"teacher side: {fitted}", "num_teacher_dropped")
    teacher_ids, teacher_response_mask = fitted
    report.num_teacher_targets += int(teacher_response_mask[1:].sum())

    found = _find_response(row.response, s_enc, t_enc)
    if found is None:
        return no_alignment("the response text is not in both rendered conversations", "num_response_not_found")
    response, student_at, teacher_at = found
    # The untruncated tokenizations are aligned; truncation only removes targets (see the module docstring).
    student_spans, student_base = _response_spans(student, s_enc, response, student_at)
    teacher_spans, teacher_base = _response_spans(teacher, t_enc, response, teacher_at)
    pairs = prediction_pairs(
        align(teacher_spans, student_spans),
        _window(sample.loss_mask, student_base, len(student_spans)),
        teacher_loss_mask=_window(teacher_response_mask, teacher_base, len(teacher_spans)),
    )
    if not len(pairs):
        return no_alignment("no 1:1 aligned prediction in the response")
    s_next = pairs.student_positions + 1 + student_base
    t_next = pairs.teacher_positions + 1 + teacher_base
    if np.any(np.diff(s_next) <= 0) or np.any(np.diff(t_next) <= 0):  # offsets out of token order
        return no_alignment("the aligned predictions are not in the same order on both sides")
    kd_mask[s_next] = True
    teacher_mask = np.zeros(len(teacher_ids), dtype=bool)
    teacher_mask[t_next] = True
    return kd_mask, TokenizedSample(sample.sample_id, teacher_ids, teacher_mask)


def _is_in(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """``np.isin(ids, sorted_ids)`` for a sorted ``sorted_ids``, without isin's per-call overhead."""
    if not len(sorted_ids):
        return np.zeros(len(ids), bool)
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[at] == ids


def _prompt_end(encoded: EncodedRow) -> int:
    """Where the rendered prompt ends in ``encoded.text``: the end of its last prompt token."""
    assert encoded.offsets is not None
    num_prompt = int(np.argmax(encoded.loss_mask)) if encoded.loss_mask.any() else len(encoded.loss_mask)
    return int(encoded.offsets[:num_prompt, 1].max()) if num_prompt else 0


def _find_response(response: str, student: EncodedRow, teacher: EncodedRow) -> tuple[str, int, int] | None:
    """The response string found after the prompt on both sides (verbatim, else stripped) and where it starts."""
    student_from, teacher_from = _prompt_end(student), _prompt_end(teacher)
    for candidate in dict.fromkeys((response, response.strip())):
        if not candidate:
            continue
        student_at = student.text.find(candidate, student_from)
        teacher_at = teacher.text.find(candidate, teacher_from)
        if student_at >= 0 and teacher_at >= 0:
            return candidate, student_at, teacher_at
    return None


def _window(mask: np.ndarray, base: int, length: int) -> np.ndarray:
    """``mask[base : base + length]``, False beyond the end of ``mask`` (a cut sample over its untruncated tokens)."""
    out = np.zeros(length, dtype=bool)
    part = mask[base : base + length]
    out[: len(part)] = part
    return out


def _response_spans(side: _Side, encoded: EncodedRow, response: str, at: int) -> tuple[TokenSpans, int]:
    """The tokens of ``encoded`` over ``response`` (which starts at character ``at`` of ``encoded.text``), and the
    index of the first of them in ``encoded``.

    Only the tokens that cover some of the response are kept, after one token before them: that one stands for the
    whole rendered prompt (zero-width at 0), so the first response token has a position that predicts it. The tokens
    left out would all be zero-width specials at the edges, which change no alignment (and cost time: prompts are
    often longer than responses).
    """
    starts, ends, special = side.token_spans(encoded)
    window_end = at + len(response)
    inside = (starts >= at) & (ends <= window_end)
    covering = inside | ((ends > at) & (starts < window_end))
    # Clipping puts a token before the response at (0, 0), one after it at (len, len), and cuts one across an edge
    # to its part in the response; all of them are markup.
    special = special | ~inside
    starts = np.minimum(np.maximum(starts, at), window_end) - at
    ends = np.minimum(np.maximum(ends, at), window_end) - at
    where = np.flatnonzero(covering)
    base, stop = (max(int(where[0]) - 1, 0), int(where[-1]) + 1) if len(where) else (0, 0)
    spans = TokenSpans(
        text=response,
        token_ids=encoded.input_ids[base:stop].astype(np.int64),
        starts=starts[base:stop],
        ends=ends[base:stop],
        special=special[base:stop],
    )
    return spans, base
