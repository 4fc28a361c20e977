"""Token alignment across tokenizers: hand-written spans, prediction positions, and real tokenizers trained here."""

from __future__ import annotations

import numpy as np
import pytest

from kdscale.algorithms.token_alignment import (
    AlignedGroup,
    Alignment,
    TokenSpans,
    align,
    prediction_pairs,
    shared_vocab,
    token_spans,
)
from tests.fixtures import make_tiny_tokenizer

spans = TokenSpans.from_offsets


def _pairs(alignment: Alignment) -> list[tuple[int, int]]:
    return [tuple(p) for p in alignment.pairs.tolist()]


def _norm_span(spans_: TokenSpans, i: int) -> tuple[int, int]:
    starts, ends = spans_.normalized_spans()
    return int(starts[i]), int(ends[i])


def _check_partition(alignment: Alignment) -> None:
    """Every token of each side is in exactly one pair, group or the unaligned list."""
    for side, spans_, unaligned, pair_column in (
        ("teacher", alignment.teacher, alignment.teacher_unaligned, 0),
        ("student", alignment.student, alignment.student_unaligned, 1),
    ):
        members = list(alignment.pairs[:, pair_column].tolist()) + list(unaligned.tolist())
        for group in alignment.groups:
            members += list(getattr(group, side))
        assert sorted(members) == list(range(len(spans_))), side


# ------------------------------------------------------------------------------------------- hand-written spans


def test_identical_tokenization_is_all_pairs():
    text = "hello world"
    alignment = align(spans(text, [(0, 5), (5, 11)]), spans(text, [(0, 5), (5, 11)]))
    assert _pairs(alignment) == [(0, 0), (1, 1)]
    assert alignment.groups == () and alignment.teacher_unaligned.size == alignment.student_unaligned.size == 0
    stats = alignment.stats()
    assert stats["token_alignment/teacher_pair_fraction"] == stats["token_alignment/student_pair_fraction"] == 1.0
    assert stats["token_alignment/num_pairs"] == 2


def test_merge_and_split():
    text = "hello!"
    merge = align(spans(text, [(0, 5), (5, 6)]), spans(text, [(0, 3), (3, 5), (5, 6)]))
    assert merge.groups == (AlignedGroup(teacher=(0,), student=(0, 1), start=0, end=5),)
    assert _pairs(merge) == [(1, 2)]
    split = align(spans(text, [(0, 3), (3, 5), (5, 6)]), spans(text, [(0, 5), (5, 6)]))
    assert split.groups == (AlignedGroup(teacher=(0, 1), student=(0,), start=0, end=5),)
    assert _pairs(split) == [(2, 1)]
    stats = merge.stats()
    assert stats["token_alignment/student_group_fraction"] == pytest.approx(2 / 3)
    assert stats["token_alignment/teacher_group_fraction"] == pytest.approx(1 / 2)


def test_crossing_boundaries_form_one_minimal_group():
    text = "abcde"
    alignment = align(spans(text, [(0, 2), (2, 4), (4, 5)]), spans(text, [(0, 1), (1, 4), (4, 5)]))
    assert alignment.groups == (AlignedGroup(teacher=(0, 1), student=(0, 1), start=0, end=4),)
    assert _pairs(alignment) == [(2, 2)]
    _check_partition(alignment)


def test_leading_space_markers_do_not_break_alignment():
    text = "hello world"
    teacher = spans(text, [(0, 5), (5, 11)])  # "hello", " world" (byte-level: the space is attached)
    separate_space = align(teacher, spans(text, [(0, 5), (5, 6), (6, 11)]))  # "hello", " ", "world"
    assert _pairs(separate_space) == [(0, 0), (1, 2)]
    assert separate_space.student_unaligned.tolist() == [1] and separate_space.groups == ()
    trailing_space = align(teacher, spans(text, [(0, 6), (6, 11)]))  # "hello ", "world"
    assert _pairs(trailing_space) == [(0, 0), (1, 1)]
    # Whitespace-only tokens keep their span: a newline aligns with a newline, two newlines with one "\n\n".
    text = "a\n\nb"
    newlines = align(spans(text, [(0, 1), (1, 2), (2, 3), (3, 4)]), spans(text, [(0, 1), (1, 3), (3, 4)]))
    assert _pairs(newlines) == [(0, 0), (3, 2)]
    assert newlines.groups == (AlignedGroup(teacher=(1, 2), student=(1,), start=1, end=3),)


def test_special_tokens_never_align_and_shift_nothing():
    text = "hello world"
    # BOS at (0, 0) in the student only.
    bos = align(spans(text, [(0, 5), (5, 11)]), spans(text, [(0, 0), (0, 5), (5, 11)], special=[True, False, False]))
    assert _pairs(bos) == [(0, 1), (1, 2)]
    assert bos.student_unaligned.tolist() == [0] and bos.teacher_unaligned.size == 0
    # A chat marker: one special token for the teacher, ordinary tokens for the student. The student's tokens
    # over the marker are unaligned, and so is a student token straddling the marker and the content after it.
    text = "<|im_start|>hi there"
    teacher = spans(text, [(0, 12), (12, 14), (14, 20)], special=[True, False, False])
    student = align(teacher, spans(text, [(0, 2), (2, 10), (10, 12), (12, 14), (14, 20)]))
    assert _pairs(student) == [(1, 3), (2, 4)]
    assert student.teacher_unaligned.tolist() == [0] and student.student_unaligned.tolist() == [0, 1, 2]
    straddling = align(teacher, spans(text, [(0, 10), (10, 14), (14, 20)]))  # "...|>hi"
    assert _pairs(straddling) == [(2, 2)]
    assert straddling.teacher_unaligned.tolist() == [0, 1] and straddling.student_unaligned.tolist() == [0, 1]
    # The same special on both sides is still markup, not a pair.
    both = align(teacher, spans(text, [(0, 12), (12, 14), (14, 20)], special=[True, False, False]))
    assert _pairs(both) == [(1, 1), (2, 2)] and both.student_unaligned.tolist() == [0]
    for alignment in (bos, student, straddling, both):
        _check_partition(alignment)
        stats = alignment.stats()
        for side in ("teacher", "student"):
            fractions = [stats[f"token_alignment/{side}_{kind}_fraction"] for kind in ("pair", "group", "unaligned")]
            assert sum(fractions) == pytest.approx(1.0)


def test_unicode_byte_tokens_with_identical_spans_are_grouped():
    text = "a🙂世界"  # 4 characters; the emoji is 4 UTF-8 bytes, each CJK character 3
    # Byte-level teacher: the emoji as 4 byte tokens sharing its span, "世界" as one token.
    teacher = spans(text, [(0, 1), (1, 2), (1, 2), (1, 2), (1, 2), (2, 4)])
    # Student: the emoji whole, "世" as 3 byte tokens, "界" whole.
    student = spans(text, [(0, 1), (1, 2), (2, 3), (2, 3), (2, 3), (3, 4)])
    alignment = align(teacher, student)
    assert _pairs(alignment) == [(0, 0)]
    assert alignment.groups == (
        AlignedGroup(teacher=(1, 2, 3, 4), student=(1,), start=1, end=2),
        AlignedGroup(teacher=(5,), student=(2, 3, 4, 5), start=2, end=4),
    )
    # Both sides split the emoji into byte tokens: one 2:2 group, never guessed 1:1 pairs.
    same_split = align(spans(text[:2], [(0, 1), (1, 2), (1, 2)]), spans(text[:2], [(0, 1), (1, 2), (1, 2)]))
    assert _pairs(same_split) == [(0, 0)]
    assert same_split.groups == (AlignedGroup(teacher=(1, 2), student=(1, 2), start=1, end=2),)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="texts differ at character 6"):
        align(spans("hello world", [(0, 11)]), spans("hello there", [(0, 11)]))
    with pytest.raises(ValueError, match="outside the text"):
        spans("abc", [(0, 4)])
    with pytest.raises(ValueError, match="shape"):
        TokenSpans("ab", np.zeros(2, np.int64), np.zeros(1, np.int64), np.zeros(2, np.int64), np.zeros(2, bool))
    alignment = align(spans("ab", [(0, 1), (1, 2)]), spans("ab", [(0, 1), (1, 2)]))
    with pytest.raises(ValueError, match="student loss mask has shape \\[3\\], but the student has 2 tokens"):
        prediction_pairs(alignment, [True, True, True])


def test_slow_tokenizer_is_rejected_with_the_fix(tmp_path):
    try:  # transformers 5 keeps the Python (slow) WordPiece tokenizer under this name
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as SlowTokenizer
    except ImportError:  # transformers 4
        from transformers import BertTokenizer as SlowTokenizer
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n")
    slow = SlowTokenizer(str(vocab))
    assert not slow.is_fast
    with pytest.raises(ValueError, match="slow .*use_fast=True"):
        token_spans(slow, "hello world")


# ------------------------------------------------------------------------------------------- prediction positions


def _prediction_case() -> Alignment:
    text = "ab cd ef gh."
    # Teacher: <bos> | ab | " cd" | " ef" | " gh" | "."
    teacher = spans(text, [(0, 0), (0, 2), (2, 5), (5, 8), (8, 11), (11, 12)], special=[True] + [False] * 5)
    # Student: a | b | " cd" | " " | ef | " gh" | "."
    student = spans(text, [(0, 1), (1, 2), (2, 5), (5, 6), (6, 8), (8, 11), (11, 12)])
    return align(teacher, student)


def test_prediction_pairs_exact_indices():
    alignment = _prediction_case()
    assert _pairs(alignment) == [(2, 2), (3, 4), (4, 5), (5, 6)]
    pairs = prediction_pairs(alignment)
    # " cd" is predicted after "ab" by both; "ef" is not (the student has already seen the space, the teacher
    # predicts " ef"); " gh" and "." are. The group "ab" = "a" + "b" gives no prediction pair.
    assert pairs.student_positions.tolist() == [1, 4, 5]
    assert pairs.teacher_positions.tolist() == [1, 3, 4]
    assert pairs.student_positions.dtype == pairs.teacher_positions.dtype == np.int64
    assert pairs.student_rows.tolist() == [1, 4, 5] and pairs.teacher_rows is None


def test_prediction_pairs_need_the_same_prefix():
    text = "ab cd"
    # Same span for "cd", but the teacher's offsets leave the space out (trimmed) while the student's "ab " has
    # seen it: the prefixes "ab" and "ab " differ, so the predictions do not pair.
    alignment = align(spans(text, [(0, 2), (3, 5)]), spans(text, [(0, 3), (3, 5)]))
    assert _pairs(alignment) == [(0, 0), (1, 1)]
    assert len(prediction_pairs(alignment)) == 0
    # A zero-width BOS in the prefix is no text: the prefixes are equal.
    alignment = align(
        spans(text, [(0, 0), (0, 2), (2, 5)], special=[True, False, False]), spans(text, [(0, 2), (2, 5)])
    )
    pairs = prediction_pairs(alignment)
    assert pairs.teacher_positions.tolist() == [1] and pairs.student_positions.tolist() == [0]


def test_prediction_pairs_respect_the_loss_masks():
    alignment = _prediction_case()
    # Student targets: " ef" onwards (tokens 3..6), so positions 2..5 are loss rows 0..3.
    student_mask = np.array([False, False, False, True, True, True, True])
    pairs = prediction_pairs(alignment, student_mask)
    assert pairs.student_positions.tolist() == [4, 5] and pairs.teacher_positions.tolist() == [3, 4]
    assert pairs.student_rows.tolist() == [2, 3]
    # The teacher's mask drops "." (teacher token 5) and numbers the teacher's own loss rows.
    teacher_mask = np.array([False, False, True, True, True, False])
    pairs = prediction_pairs(alignment, student_mask, teacher_loss_mask=teacher_mask)
    assert pairs.student_positions.tolist() == [4] and pairs.teacher_positions.tolist() == [3]
    assert pairs.student_rows.tolist() == [2] and pairs.teacher_rows.tolist() == [2]
    empty = prediction_pairs(alignment, np.zeros(7, bool))
    assert len(empty) == 0 and empty.student_rows.dtype == np.int64


# ------------------------------------------------------------------------------------------- the rules, token by token


def _reference_normalized(spans_: TokenSpans) -> list[tuple[int, int]]:
    """The normalized-span rule read literally: str.strip() of each token's text."""
    out = []
    for i in range(len(spans_)):
        s, e = int(spans_.starts[i]), int(spans_.ends[i])
        piece = spans_.text[s:e]
        if spans_.special[i]:
            out.append((s, s))
        elif piece.strip():
            s += len(piece) - len(piece.lstrip())
            out.append((s, s + len(piece.strip())))
        else:
            out.append((s, e))
    return out


def _reference_align(teacher: TokenSpans, student: TokenSpans):
    """The alignment rule read literally: a sweep over the sorted intervals, one component at a time."""
    markup = set()
    for side in (teacher, student):
        for i in np.flatnonzero(side.special):
            markup.update(range(int(side.starts[i]), int(side.ends[i])))
    intervals, unaligned = [], ([], [])
    for side, spans_ in enumerate((teacher, student)):
        for i, (s, e) in enumerate(_reference_normalized(spans_)):
            if e > s:
                intervals.append((s, e, side, i))
            else:
                unaligned[side].append(i)
    intervals.sort()
    pairs, groups, k = [], [], 0
    while k < len(intervals):
        start, end, members = intervals[k][0], intervals[k][1], []
        while k < len(intervals) and intervals[k][0] < end:
            members.append(intervals[k])
            end = max(end, intervals[k][1])
            k += 1
        ids = [sorted(i for _, _, side, i in members if side == which) for which in (0, 1)]
        if not ids[0] or not ids[1] or markup & set(range(start, end)):
            unaligned[0].extend(ids[0])
            unaligned[1].extend(ids[1])
        elif len(ids[0]) == len(ids[1]) == 1 and len({(s, e) for s, e, _, _ in members}) == 1:
            pairs.append((ids[0][0], ids[1][0]))
        else:
            groups.append(AlignedGroup(tuple(ids[0]), tuple(ids[1]), start, end))
    return pairs, tuple(groups), sorted(unaligned[0]), sorted(unaligned[1])


def _random_spans(rng: np.random.Generator, text: str) -> TokenSpans:
    """Mostly consecutive spans (a tokenization), with overlapping, zero-width and special ones among them."""
    offsets, position = [], 0
    for _ in range(rng.integers(0, 14)):
        if rng.random() < 0.3:
            start = int(rng.integers(0, len(text) + 1))
            offsets.append((start, min(len(text), start + int(rng.integers(0, 5)))))
        else:
            offsets.append((position, min(len(text), position + int(rng.integers(0, 4)))))
            position = offsets[-1][1]
    return spans(text, offsets, special=(rng.random(len(offsets)) < 0.1).tolist())


def test_vectorized_rules_equal_the_rules_token_by_token():
    """normalized_spans, align and prediction_pairs (array code) agree with a literal reading of the module's rules
    on random spans over texts with Unicode whitespace and characters outside the Basic Multilingual Plane."""
    rng = np.random.default_rng(0)
    alphabet = ["a", "b", "c", " ", "\n", "\t", "\u3000", "\u00a0", "\u2028", "\x1c", "é", "🙂", "𝕏"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 16))).tolist())
        teacher, student = _random_spans(rng, text), _random_spans(rng, text)
        for side in (teacher, student):
            starts, ends = side.normalized_spans()
            assert list(zip(starts.tolist(), ends.tolist())) == _reference_normalized(side), text
        alignment = align(teacher, student)
        pairs, groups, teacher_unaligned, student_unaligned = _reference_align(teacher, student)
        assert _pairs(alignment) == pairs and alignment.pairs.dtype == np.int64, text
        assert alignment.groups == groups, text
        assert alignment.teacher_unaligned.tolist() == teacher_unaligned, text
        assert alignment.student_unaligned.tolist() == student_unaligned, text
        _check_partition(alignment)
        student_mask = rng.random(len(student)) < 0.8
        teacher_mask = rng.random(len(teacher)) < 0.8
        predictions = prediction_pairs(alignment, student_mask, teacher_loss_mask=teacher_mask)
        expected = [
            (t - 1, s - 1)
            for t, s in pairs
            if t > 0
            and s > 0
            and student_mask[s]
            and teacher_mask[t]
            and (teacher.starts[t], teacher.ends[t]) == (student.starts[s], student.ends[s])
            and teacher.ends[:t].max() == student.ends[:s].max()
        ]
        got = list(zip(predictions.teacher_positions.tolist(), predictions.student_positions.tolist()))
        assert got == expected, text


# ------------------------------------------------------------------------------------------- real tokenizers

_CORPUS = [
    "hello world, héllo wörld! The quick brown fox jumps over the lazy dog.",
    "世界你好 🙂 emoji 🙂🙂 naïve café",
    "Two plus two is four.\n\nNew paragraph:  double  spaces\tand a tab.",
    "don't stop, it's 2024; costs $3.50 (approx.)",
]

_SENTENCES = [
    "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nTwo plus two is four.<|im_end|>\n",
    "héllo wörld 🙂  世界你好\n\nThe quick brown fox, naïve café.",
    "Unseen words: Zürich, Ελληνικά, 😀👍, \t tabs and   spaces.",
]


def _unigram_tokenizer():
    """A SentencePiece-style tokenizer ("▁" markers, Unigram) that adds a BOS, unlike the byte-level fixture."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<s>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 5, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers():
    return {
        "bpe": make_tiny_tokenizer(),
        "bpe_large": make_tiny_tokenizer(vocab_size=400),
        "unigram": _unigram_tokenizer(),
    }


@pytest.mark.parametrize("names", [("bpe", "unigram"), ("unigram", "bpe"), ("bpe", "bpe_large")])
def test_real_tokenizers_cover_the_text(tokenizers, names):
    teacher_tok, student_tok = tokenizers[names[0]], tokenizers[names[1]]
    for text in _SENTENCES:
        teacher = token_spans(teacher_tok, text, add_special_tokens=True)
        student = token_spans(student_tok, text, add_special_tokens=True)
        assert teacher.token_ids.tolist() == teacher_tok(text, add_special_tokens=True)["input_ids"]
        alignment = align(teacher, student)
        _check_partition(alignment)

        # 1:1 pairs cover equal text up to whitespace at the edges.
        for t, s in alignment.pairs.tolist():
            assert teacher.token_text(t).strip() == student.token_text(s).strip()
            assert teacher.token_text(t).strip() or teacher.token_text(t) == student.token_text(s)
        # Every character is in exactly one pair or group, or under an unaligned token (or a special), or is
        # whitespace that one side puts in its own token.
        owners = np.zeros(len(text), np.int64)
        starts, ends = teacher.normalized_spans()
        for t, _ in alignment.pairs.tolist():
            owners[starts[t] : ends[t]] += 1
        for group in alignment.groups:
            owners[group.start : group.end] += 1
        assert owners.max() <= 1
        unaligned_cover = np.zeros(len(text), bool)
        for side, indices in ((teacher, alignment.teacher_unaligned), (student, alignment.student_unaligned)):
            for i in indices.tolist():
                unaligned_cover[side.starts[i] : side.ends[i]] = True
        for c, char in enumerate(text):
            assert owners[c] == 1 or unaligned_cover[c] or char.isspace(), (names, text, c, char)

        stats = alignment.stats()
        for side in ("teacher", "student"):
            fractions = [stats[f"token_alignment/{side}_{kind}_fraction"] for kind in ("pair", "group", "unaligned")]
            assert sum(fractions) == pytest.approx(1.0)
        assert stats["token_alignment/num_pairs"] > 0

        # Aligned predictions: the same next text after the same text.
        pairs = prediction_pairs(alignment)
        assert len(pairs) > 0
        for t, s in zip(pairs.teacher_positions.tolist(), pairs.student_positions.tolist()):
            assert teacher.token_text(t + 1) == student.token_text(s + 1)
            assert text[: teacher.ends[: t + 1].max()] == text[: student.ends[: s + 1].max()]


def test_unigram_bos_and_prepended_marker_are_unaligned(tokenizers):
    text = "hello world"
    student = token_spans(tokenizers["unigram"], text, add_special_tokens=True)
    tokens = tokenizers["unigram"].convert_ids_to_tokens(student.token_ids.tolist())
    assert tokens[0] == "<s>" and student.special[0] and not student.special[1:].any()
    # The prepended "▁" is reported at the first character; it must not swallow the first word.
    for i, token in enumerate(tokens):
        if token == "▁":
            assert student.token_text(i).strip() == ""
    alignment = align(token_spans(tokenizers["bpe"], text), student)
    assert 0 in alignment.student_unaligned.tolist()
    covered = {c for t, _ in alignment.pairs.tolist() for c in range(*map(int, _norm_span(alignment.teacher, t)))}
    covered |= {c for group in alignment.groups for c in range(group.start, group.end)}
    assert covered >= {0, 1, 2, 3, 4, 6, 7, 8, 9, 10}


def test_shared_vocab_has_equal_strings_only(tokenizers):
    bpe, unigram = tokenizers["bpe"], tokenizers["unigram"]
    vocab = shared_vocab(bpe, unigram)
    assert len(vocab) > 20
    assert vocab.teacher_ids.dtype == vocab.student_ids.dtype == np.int64
    assert len(set(vocab.teacher_ids.tolist())) == len(vocab) == len(set(vocab.student_ids.tolist()))
    assert not set(vocab.teacher_ids.tolist()) & set(bpe.all_special_ids)
    assert not set(vocab.student_ids.tolist()) & set(unigram.all_special_ids)
    for t, s in zip(vocab.teacher_ids.tolist(), vocab.student_ids.tolist()):
        teacher_string = bpe.convert_tokens_to_string([bpe.convert_ids_to_tokens(t)])  # byte-level: exact
        student_string = unigram.convert_ids_to_tokens(s).replace("▁", " ")
        assert teacher_string == student_string and teacher_string
    # The markers are whitespace: "Ġ" and "▁" are the same entry.
    assert (bpe.convert_tokens_to_ids("Ġ"), unigram.convert_tokens_to_ids("▁")) in set(
        zip(vocab.teacher_ids.tolist(), vocab.student_ids.tolist())
    )
    stats = vocab.stats()
    assert stats["token_alignment/shared_vocab_size"] == len(vocab)
    assert stats["token_alignment/shared_vocab_student_fraction"] == pytest.approx(len(vocab) / len(unigram))

    # Two byte-level tokenizers share every single-byte entry, partial UTF-8 bytes included.
    byte_vocab = shared_vocab(bpe, tokenizers["bpe_large"])
    assert len(byte_vocab) >= 256
    for t, s in zip(byte_vocab.teacher_ids.tolist(), byte_vocab.student_ids.tolist()):
        assert bpe.convert_ids_to_tokens(t) == tokenizers["bpe_large"].convert_ids_to_tokens(s)
