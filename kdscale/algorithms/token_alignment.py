"""Token alignment between two tokenizers over the same text: the first block of cross-tokenizer distillation.

A teacher and a student with different tokenizers cut one text into different tokens. This module says which
tokens (and which next-token predictions) of the two sides correspond, and which vocabulary entries the two
tokenizers share. It knows nothing of models or training; the trainer gathers rows with the index arrays it returns.

Design
------
- **Character offsets, not token strings.** Each token is placed by its ``[start, end)`` span in the text, as a
  Hugging Face *fast* tokenizer reports it (``return_offsets_mapping=True``). Token strings are tokenizer-specific
  encodings (byte-level ``"Ġ"``/``"Ċ"``, SentencePiece ``"▁"``, WordPiece ``"##"``, byte fallback ``"<0xE4>"``,
  partial UTF-8 bytes of one character) and matching them greedily against each other drifts on normalizers,
  unknown tokens and characters split into bytes. Offsets index the one string both sides tokenized, so equal
  spans mean equal text, and every token, even an unknown or partial one, has a place.
- **Normalized spans.** A token's span is stripped of whitespace at its edges, so ``" world"`` (byte-level, space
  attached) and ``"world"`` (space in its own or the previous token) cover the same characters. A token made only
  of whitespace (``"\\n"``, ``"Ġ"``) keeps its raw span, so newlines align with newlines. Special tokens (BOS/EOS,
  chat-template markers, UNK) have no normalized span: they are markup and never align.
- **Alignment rule.** The normalized spans of both sides are merged into connected components of overlapping
  intervals (half-open: touching spans do not connect). A component is the smallest character range that both
  tokenizations cut at its edges (up to whitespace). A component with one token per side and equal spans is a
  **1:1 pair**; one with tokens of both sides otherwise is a **group** (a merge 1:n, a split n:1, crossing
  boundaries n:m, or byte tokens of one character that share its span); one with tokens of one side only is
  **unaligned**. A component that touches text covered by a special token of either side (e.g. ``<|im_end|>``,
  which the other tokenizer spells with ordinary tokens) is unaligned too. Zero-width tokens (a BOS at ``(0, 0)``)
  are unaligned and shift nothing.
- **Prediction positions.** In a causal LM, position ``t`` predicts token ``t + 1``. Student position ``s`` pairs
  with teacher position ``t`` when tokens ``s + 1`` and ``t + 1`` are a 1:1 pair with identical *raw* spans and
  both prefixes end at the same character: both sides then predict the same piece of text from the same text.
  A pair whose raw spans differ only by whitespace (``" world"`` vs ``"world"``) aligns as tokens but not as
  predictions, since one side has already seen the space.
- **Shared vocabulary.** Entries whose surface bytes are equal (``"Ġ"``/``"▁"`` read as a space, byte-level and
  byte-fallback tokens as their bytes, WordPiece ``"##"`` dropped), specials excluded, kept only where the surface
  names exactly one id on each side.

Assumptions: offsets are character offsets into the Python ``str`` (what fast tokenizers return). Tokenizers that
trim whitespace out of offsets (a RoBERTa-style ``ByteLevel(trim_offsets=True)`` post-processor; Llama-3, Qwen2 and
SmolLM2 do not trim) still align as tokens but give fewer prediction pairs, whose raw spans then differ.

Usage::

    teacher = token_spans(teacher_tokenizer, text)
    student = token_spans(student_tokenizer, text)
    alignment = align(teacher, student)
    logger.info(alignment.stats())
    pairs = prediction_pairs(alignment, student_loss_mask)   # student_hidden[pairs.student_positions], ...
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "AlignedGroup",
    "Alignment",
    "PredictionPairs",
    "SharedVocab",
    "TokenSpans",
    "align",
    "prediction_pairs",
    "shared_vocab",
    "token_spans",
]

_STATS_PREFIX = "token_alignment"


@dataclass(frozen=True, eq=False)
class TokenSpans:
    """The tokens of one text: ids, raw character spans ``[starts[i], ends[i])`` in ``text``, and a special mask.

    Build it with :func:`token_spans` from a fast tokenizer, or with :meth:`from_offsets` from hand-written spans.
    """

    text: str
    token_ids: np.ndarray  # [N] int64 (-1 where unknown, e.g. hand-written spans)
    starts: np.ndarray  # [N] int64, raw span start (as the tokenizer reports it)
    ends: np.ndarray  # [N] int64, raw span end (exclusive)
    special: np.ndarray  # [N] bool, special tokens: never aligned

    def __post_init__(self) -> None:
        n = self.token_ids.shape[0]
        for name in ("token_ids", "starts", "ends", "special"):
            array = getattr(self, name)
            if array.ndim != 1 or array.shape[0] != n:
                raise ValueError(f"TokenSpans.{name} must have shape [{n}] like token_ids, got {list(array.shape)}")
        bad = np.flatnonzero((self.starts < 0) | (self.ends < self.starts) | (self.ends > len(self.text)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"token {i} has span ({int(self.starts[i])}, {int(self.ends[i])}), outside the text of "
                f"{len(self.text)} characters or with end < start"
            )

    @classmethod
    def from_offsets(
        cls,
        text: str,
        offsets: Sequence[tuple[int, int]],
        *,
        token_ids: Sequence[int] | None = None,
        special: Sequence[bool] | None = None,
    ) -> TokenSpans:
        """Spans from a list of ``(start, end)`` offsets; ``token_ids`` default to -1, ``special`` to False."""
        n = len(offsets)
        spans = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
        return cls(
            text=text,
            token_ids=np.full(n, -1, np.int64) if token_ids is None else np.asarray(token_ids, np.int64),
            starts=spans[:, 0].copy(),
            ends=spans[:, 1].copy(),
            special=np.zeros(n, bool) if special is None else np.asarray(special, bool),
        )

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def token_text(self, i: int) -> str:
        """The raw text of token ``i`` (empty for zero-width tokens)."""
        return self.text[int(self.starts[i]) : int(self.ends[i])]

    def normalized_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Spans stripped of whitespace at their edges; whitespace-only tokens keep theirs; specials are empty."""
        return self._normalized_spans(_content_positions(self.text))

    def _normalized_spans(self, content: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`normalized_spans`, given the positions of the text's non-whitespace characters."""
        starts, ends = self.starts.copy(), self.ends.copy()
        # A span [s, e) holds the content characters content[first:stop]; stripped, it runs from the first of them
        # to just after the last (str.strip() and this agree: both strip the characters str.isspace() accepts).
        first, stop = np.searchsorted(content, starts), np.searchsorted(content, ends)
        stripped = ~self.special & (stop > first)
        starts[stripped] = content[first[stripped]]
        ends[stripped] = content[stop[stripped] - 1] + 1
        ends[self.special] = starts[self.special]
        return starts, ends


class AlignedGroup(NamedTuple):
    """Tokens of both sides that together cover ``text[start:end]`` and cannot be split further."""

    teacher: tuple[int, ...]
    student: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True, eq=False)
class Alignment:
    """The alignment of two tokenizations of one text; every token is in exactly one pair, group or unaligned."""

    teacher: TokenSpans
    student: TokenSpans
    pairs: np.ndarray  # [P, 2] int64: (teacher index, student index), increasing
    groups: tuple[AlignedGroup, ...]
    teacher_unaligned: np.ndarray  # int64 indices, increasing
    student_unaligned: np.ndarray

    def stats(self) -> dict[str, float]:
        """Fractions of each side's tokens in 1:1 pairs, in groups and unaligned (they sum to 1), and counts.

        A side with no token reports 0 for its fractions.
        """
        out: dict[str, float] = {
            f"{_STATS_PREFIX}/num_pairs": float(len(self.pairs)),
            f"{_STATS_PREFIX}/num_groups": float(len(self.groups)),
        }
        sides = (
            ("teacher", len(self.teacher), sum(len(g.teacher) for g in self.groups), len(self.teacher_unaligned)),
            ("student", len(self.student), sum(len(g.student) for g in self.groups), len(self.student_unaligned)),
        )
        for side, num_tokens, num_grouped, num_unaligned in sides:
            denom = max(num_tokens, 1)
            out[f"{_STATS_PREFIX}/num_{side}_tokens"] = float(num_tokens)
            out[f"{_STATS_PREFIX}/{side}_pair_fraction"] = len(self.pairs) / denom
            out[f"{_STATS_PREFIX}/{side}_group_fraction"] = num_grouped / denom
            out[f"{_STATS_PREFIX}/{side}_unaligned_fraction"] = num_unaligned / denom
        return out


def align(teacher: TokenSpans, student: TokenSpans) -> Alignment:
    """Align two tokenizations of the same text by character offsets (rule in the module docstring).

    Raises:
        ValueError: the two spans are over different texts.
    """
    if teacher.text != student.text:
        raise ValueError(
            "align() needs the teacher and student tokens of the same text, but the texts differ "
            f"{_first_difference(teacher.text, student.text)}: tokenize one string with both tokenizers"
        )
    text_len = len(teacher.text)
    # Characters inside any special token's span (either side) are markup: a component touching them is unaligned.
    markup = np.zeros(text_len + 1, np.int64)
    for spans in (teacher, student):
        marked = spans.special & (spans.ends > spans.starts)
        markup += np.bincount(spans.starts[marked], minlength=text_len + 1)
        markup -= np.bincount(spans.ends[marked], minlength=text_len + 1)
    markup_prefix = np.concatenate([[0], np.cumsum(np.cumsum(markup)[:text_len] > 0)])

    # The normalized spans of both sides as intervals (start, end, side 0=teacher 1=student, index).
    content = _content_positions(teacher.text)
    (teacher_starts, teacher_ends), (student_starts, student_ends) = (
        spans._normalized_spans(content) for spans in (teacher, student)
    )
    starts = np.concatenate([teacher_starts, student_starts]).astype(np.int64)
    ends = np.concatenate([teacher_ends, student_ends]).astype(np.int64)
    sides = np.concatenate([np.zeros(len(teacher), np.int64), np.ones(len(student), np.int64)])
    indices = np.concatenate([np.arange(len(teacher), dtype=np.int64), np.arange(len(student), dtype=np.int64)])
    unaligned = ends <= starts  # specials and zero-width tokens; per token of both sides, teacher first
    order = np.flatnonzero(~unaligned)
    # By start; equal starts keep the teacher's interval first (a stable sort). The order among equal starts changes
    # no component, nor the members of one (they are sorted below).
    order = order[np.argsort(starts[order], kind="stable")]
    starts, ends, sides, indices = starts[order], ends[order], sides[order], indices[order]

    # The sweep over components of overlapping intervals: an interval opens a new component when it starts at or
    # after the end of every interval before it (the running maximum of ends is the open component's end).
    opens = np.ones(len(order), bool)
    opens[1:] = starts[1:] >= np.maximum.accumulate(ends)[:-1]
    first = np.flatnonzero(opens)  # [C] the first interval of each component
    component = np.cumsum(opens) - 1  # [I] the component of each interval
    num_members = np.diff(np.append(first, len(order)))
    component_start = starts[first]
    component_end = np.maximum.reduceat(ends, first) if len(first) else ends[:0]
    num_teacher = np.bincount(component[sides == 0], minlength=len(first))
    num_student = num_members - num_teacher
    aligned = (num_teacher > 0) & (num_student > 0) & (markup_prefix[component_end] <= markup_prefix[component_start])
    # A 1:1 pair: one interval per side with the same span; sorted, the teacher's comes first.
    candidate = first[aligned & (num_members == 2) & (num_teacher == 1)]
    equal = (starts[candidate] == starts[candidate + 1]) & (ends[candidate] == ends[candidate + 1])
    paired = candidate[equal]
    is_pair = np.zeros(len(first), bool)
    is_pair[component[paired]] = True
    unaligned[order[~aligned[component]]] = True

    # The members of each group, by component, then side (teacher first), then index.
    is_group = aligned & ~is_pair
    members = np.flatnonzero(is_group[component])
    members = members[np.argsort((component[members] * 2 + sides[members]) * len(unaligned) + indices[members])]
    member_indices = indices[members].tolist()
    groups: list[AlignedGroup] = []
    at = 0
    for num_teacher_members, size, start, end in zip(
        num_teacher[is_group].tolist(),
        num_members[is_group].tolist(),
        component_start[is_group].tolist(),
        component_end[is_group].tolist(),
    ):
        teacher_members = tuple(member_indices[at : at + num_teacher_members])
        groups.append(
            AlignedGroup(teacher_members, tuple(member_indices[at + num_teacher_members : at + size]), start, end)
        )
        at += size

    return Alignment(
        teacher=teacher,
        student=student,
        pairs=np.stack([indices[paired], indices[paired + 1]], axis=1).reshape(-1, 2),
        groups=tuple(groups),
        teacher_unaligned=np.flatnonzero(unaligned[: len(teacher)]).astype(np.int64),
        student_unaligned=np.flatnonzero(unaligned[len(teacher) :]).astype(np.int64),
    )


def _content_positions(text: str) -> np.ndarray:
    """The positions of the characters of ``text`` that are not whitespace (``str.isspace``), increasing."""
    codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    table = _space_table()
    in_table = codepoints < len(table)
    is_space = table[np.where(in_table, codepoints, 0)]
    if not in_table.all():  # beyond the Basic Multilingual Plane (emoji, ...): rare, asked one by one
        beyond = np.flatnonzero(~in_table)
        is_space[beyond] = [text[i].isspace() for i in beyond.tolist()]
    return np.flatnonzero(~is_space)


@functools.cache
def _space_table() -> np.ndarray:
    """``table[c]``: ``chr(c).isspace()``, for the code points of the Basic Multilingual Plane."""
    return np.array([chr(c).isspace() for c in range(0x10000)], bool)


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {i} (teacher {a[i : i + 20]!r}, student {b[i : i + 20]!r}; lengths {len(a)} and {len(b)})"


@dataclass(frozen=True, eq=False)
class PredictionPairs:
    """Aligned next-token predictions, in increasing student position.

    ``student_positions[k]`` (predicting student token ``student_positions[k] + 1``) and ``teacher_positions[k]``
    predict the same text from the same prefix. ``student_rows``/``teacher_rows`` index the same predictions among
    the loss rows of each side (``hidden[:-1][loss_mask[1:]]``, the convention of :mod:`kdscale.data.batch`);
    ``teacher_rows`` is None when no teacher loss mask was given.
    """

    student_positions: np.ndarray  # [K] int64
    teacher_positions: np.ndarray  # [K] int64
    student_rows: np.ndarray  # [K] int64
    teacher_rows: np.ndarray | None

    def __len__(self) -> int:
        return int(self.student_positions.shape[0])


def prediction_pairs(
    alignment: Alignment,
    student_loss_mask: np.ndarray | Sequence[bool] | None = None,
    *,
    teacher_loss_mask: np.ndarray | Sequence[bool] | None = None,
) -> PredictionPairs:
    """Map a token alignment to aligned prediction positions (rule in the module docstring).

    Args:
        alignment: from :func:`align`.
        student_loss_mask: ``[len(student)]`` bool, True on the student's target tokens (response + EOS), as in
            :mod:`kdscale.data.batch`: position ``s`` is kept only if token ``s + 1`` is a target. None: all.
        teacher_loss_mask: the same for the teacher; if given, teacher targets outside it are dropped too and
            ``teacher_rows`` is filled.

    Raises:
        ValueError: a mask whose length is not the number of tokens of its side.
    """
    teacher, student = alignment.teacher, alignment.student
    student_mask = _loss_mask(student_loss_mask, len(student), "student")
    teacher_mask = _loss_mask(teacher_loss_mask, len(teacher), "teacher")
    teacher_prefix_end = np.maximum.accumulate(teacher.ends) if len(teacher) else teacher.ends
    student_prefix_end = np.maximum.accumulate(student.ends) if len(student) else student.ends

    pairs = alignment.pairs.astype(np.int64).reshape(-1, 2)
    pairs = pairs[(pairs[:, 0] > 0) & (pairs[:, 1] > 0)]  # the first token is predicted by no position
    t_next, s_next = pairs[:, 0], pairs[:, 1]
    same_piece = (teacher.starts[t_next] == student.starts[s_next]) & (teacher.ends[t_next] == student.ends[s_next])
    same_prefix = teacher_prefix_end[t_next - 1] == student_prefix_end[s_next - 1]
    keep = student_mask[s_next] & teacher_mask[t_next] & same_piece & same_prefix
    teacher_positions, student_positions = t_next[keep] - 1, s_next[keep] - 1
    return PredictionPairs(
        student_positions=student_positions,
        teacher_positions=teacher_positions,
        student_rows=_loss_rows(student_mask)[student_positions],
        teacher_rows=None if teacher_loss_mask is None else _loss_rows(teacher_mask)[teacher_positions],
    )


def _loss_mask(mask: np.ndarray | Sequence[bool] | None, num_tokens: int, side: str) -> np.ndarray:
    if mask is None:
        return np.ones(num_tokens, bool)
    mask = np.asarray(mask, bool)
    if mask.shape != (num_tokens,):
        raise ValueError(f"the {side} loss mask has shape {list(mask.shape)}, but the {side} has {num_tokens} tokens")
    return mask


def _loss_rows(mask: np.ndarray) -> np.ndarray:
    """For each position p, its row among the positions whose next token is a target (-1 where it is none)."""
    targets = mask[1:]
    rows = np.cumsum(targets) - 1
    return np.where(targets, rows, -1).astype(np.int64)


# ----------------------------------------------------------------------------------------------- tokenizers


def token_spans(tokenizer: Any, text: str, *, add_special_tokens: bool = False) -> TokenSpans:
    """Tokenize ``text`` with a fast tokenizer and return its tokens with character spans.

    ``add_special_tokens`` defaults to False, as kdscale tokenizes rendered chat templates (the template writes its
    own specials). Specials are the tokenizer's special ids and added tokens marked special, wherever they occur.
    A whitespace-marker token whose reported span covers non-whitespace (SentencePiece's prepended ``"▁"`` is
    reported at the first character) is made zero-width, so that it does not swallow the word after it.

    Raises:
        ValueError: a slow (Python) tokenizer, which has no character offsets.
    """
    _require_fast(tokenizer)
    encoding = tokenizer(
        text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, return_special_tokens_mask=True
    )
    ids = np.asarray(encoding["input_ids"], np.int64)
    offsets = np.asarray(encoding["offset_mapping"], np.int64).reshape(-1, 2)
    special = np.asarray(encoding["special_tokens_mask"], bool) | np.isin(ids, sorted(_special_ids(tokenizer)))
    starts, ends = offsets[:, 0].copy(), offsets[:, 1].copy()
    surface = _SurfaceDecoder(tokenizer)
    for i, (token_id, token) in enumerate(zip(ids.tolist(), tokenizer.convert_ids_to_tokens(ids.tolist()))):
        if special[i] or not text[starts[i] : ends[i]].strip():
            continue
        piece = surface(token_id, token).decode("utf-8", "replace")
        if piece and piece.isspace():
            ends[i] = starts[i]
    return TokenSpans(text=text, token_ids=ids, starts=starts, ends=ends, special=special)


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer, which reports no character offsets: load the "
            "fast one, AutoTokenizer.from_pretrained(name_or_path, use_fast=True) (it needs a tokenizer.json, or "
            "the sentencepiece/tiktoken conversion that transformers runs when one is missing)"
        )


def _special_ids(tokenizer: Any) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    return ids


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: byte-level token characters to the bytes they stand for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _SurfaceDecoder:
    """The bytes a single vocabulary entry stands for, read from the tokenizer's decoder configuration.

    Byte-level entries map back through GPT-2's byte table; byte-fallback ``<0xNN>`` entries are their byte; the
    Metaspace/Replace marker (``"▁"``) is a space; a WordPiece continuation prefix (``"##"``) is dropped; added
    tokens are their literal content. This is per token, unlike ``decode``, which drops the leading space of a
    first ``"▁word"`` and turns partial UTF-8 bytes into ``"\\ufffd"``.
    """

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = backend.decoder if backend is not None else None
        state = json.loads(decoder.__getstate__()) if decoder is not None else {"type": None}
        parts = state["decoders"] if state.get("type") == "Sequence" else [state]
        types = {part.get("type") for part in parts}
        self.byte_level = _gpt2_byte_decoder() if "ByteLevel" in types else None
        self.byte_fallback = "ByteFallback" in types
        self.replacements: list[tuple[str, str]] = []
        self.continuation_prefix: str | None = None
        for part in parts:
            if part.get("type") == "Metaspace":
                self.replacements.append((part.get("replacement", "▁"), " "))
            elif part.get("type") == "Replace" and "String" in part.get("pattern", {}):
                self.replacements.append((part["pattern"]["String"], part["content"]))
            elif part.get("type") == "WordPiece":
                self.continuation_prefix = part.get("prefix", "##")
        if decoder is None:  # no decoder configuration (e.g. a slow SentencePiece tokenizer): the usual marker
            self.replacements.append(("▁", " "))
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.added = {int(i): str(token) for i, token in added.items()}

    def __call__(self, token_id: int, token: str) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode()
        if self.byte_level is not None and all(c in self.byte_level for c in token):
            return bytes(self.byte_level[c] for c in token)
        if self.byte_fallback and (match := _BYTE_FALLBACK.fullmatch(token)):
            return bytes([int(match.group(1), 16)])
        prefix = self.continuation_prefix
        if prefix and token.startswith(prefix) and token != prefix:
            token = token[len(prefix) :]
        for old, new in self.replacements:
            token = token.replace(old, new)
        return token.encode()


@dataclass(frozen=True, eq=False)
class SharedVocab:
    """Vocabulary entries the two tokenizers share: ``teacher_ids[k]`` and ``student_ids[k]`` stand for the same
    bytes (in increasing student id). Gather logits with them for distillation on the shared vocabulary."""

    teacher_ids: np.ndarray  # [V_shared] int64
    student_ids: np.ndarray  # [V_shared] int64
    teacher_vocab_size: int
    student_vocab_size: int

    def __len__(self) -> int:
        return int(self.teacher_ids.shape[0])

    def stats(self) -> dict[str, float]:
        """Size of the shared vocabulary and the fraction of each tokenizer's vocabulary it covers."""
        return {
            f"{_STATS_PREFIX}/shared_vocab_size": float(len(self)),
            f"{_STATS_PREFIX}/shared_vocab_teacher_fraction": len(self) / max(self.teacher_vocab_size, 1),
            f"{_STATS_PREFIX}/shared_vocab_student_fraction": len(self) / max(self.student_vocab_size, 1),
        }


def shared_vocab(teacher_tokenizer: Any, student_tokenizer: Any) -> SharedVocab:
    """Entries of both vocabularies with the same surface bytes (specials excluded, one id per side).

    Surfaces: ``"Ġ"``/``"▁"`` are spaces, byte-level and byte-fallback entries are their bytes (so a partial UTF-8
    entry matches only the same bytes), WordPiece ``"##"`` is dropped. A surface that several ids of one side
    stand for (e.g. ``"▁"`` and ``"<0x20>"``, or ``"ab"`` and ``"##ab"``) is left out.
    """
    teacher_index = _surface_index(teacher_tokenizer)
    student_index = _surface_index(student_tokenizer)
    pairs = sorted(
        (student_ids[0], teacher_index[surface][0])
        for surface, student_ids in student_index.items()
        if len(student_ids) == 1 and len(teacher_index.get(surface, ())) == 1
    )
    ids = np.asarray(pairs, np.int64).reshape(-1, 2)
    return SharedVocab(
        teacher_ids=ids[:, 1].copy(),
        student_ids=ids[:, 0].copy(),
        teacher_vocab_size=len(teacher_tokenizer),
        student_vocab_size=len(student_tokenizer),
    )


def _surface_index(tokenizer: Any) -> dict[bytes, list[int]]:
    """Surface bytes -> the non-special ids that stand for them."""
    surface: Callable[[int, str], bytes] = _SurfaceDecoder(tokenizer)
    specials = _special_ids(tokenizer)
    index: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in specials:
            continue
        key = surface(int(token_id), token)
        if key:
            index.setdefault(key, []).append(int(token_id))
    return index
