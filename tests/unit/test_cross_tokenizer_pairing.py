"""Cross-tokenizer pairing: student samples, the teacher's tokenization of the same rows, and their aligned targets.

Two real tokenizers are trained here (nothing is downloaded): the student is the byte-level BPE of
``tests.fixtures`` with a ChatML template (``<|im_end|>`` ends the turn, no BOS); the teacher is a
SentencePiece-style BPE ("▁" markers, byte fallback) that prepends ``<s>`` to plain text, with a
"### User:/### Assistant:" template that writes ``<s>`` and ends the turn with ``</s>``.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from kdscale.algorithms import cross_tokenizer
from kdscale.algorithms.cross_tokenizer import AlignmentReport, _Side, pair_samples
from kdscale.algorithms.token_alignment import _SurfaceDecoder, token_spans
from kdscale.data import DataError, TokenizedSample, read_jsonl, rows_from_records, tokenize_rows
from kdscale.data.tokenization import encode_rows
from tests.fixtures import _CORPUS, make_tiny_tokenizer

TEACHER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ m['content'] }}</s>\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
# The teacher template, but the content of a message that mentions "shout" is uppercased: its response is not
# in the teacher's rendering.
SHOUTING_TEMPLATE = TEACHER_TEMPLATE.replace(
    "### Assistant:\n{{ m['content'] }}",
    "### Assistant:\n{% if 'shout' in m['content'] %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}",
)

CHAT_RECORDS = [
    {"prompt": "What is two plus two?", "response": "Two plus two is four."},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a primary colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "Red is a primary colour.\n\nYellow is one too."},
        ]
    },
    {"prompt": "Explain gravity in one sentence.", "response": "Gravity pulls masses toward each other."},
    {"prompt": "Say hi in three ways.", "response": "Hi 🙂, 你好世界, and naïve café: héllo!"},
    {"prompt": "Write a haiku about the sea.", "response": "waves fold into foam,\nsalt wind carries gull voices"},
    # The response is also in the prompt: it is looked up after the rendered prompt.
    {"prompt": "Repeat: the quick brown fox.", "response": "the quick brown fox."},
]
ASCII_RECORDS = [CHAT_RECORDS[0], CHAT_RECORDS[1], CHAT_RECORDS[2], CHAT_RECORDS[4]]
PLAIN_RECORDS = [r for r in CHAT_RECORDS if "prompt" in r] + [{"prompt": "", "response": "No prompt at all."}]


STUDENT_VOCAB = 600


def _teacher_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<s>", "</s>", "<unk>", "<pad>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    corpus = [*_CORPUS, "### User:\n### Assistant:\n", "世界你好 🙂 naïve café héllo"]
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    # The byte tokens were passed as specials only to put them in the vocabulary: make them ordinary entries, as in
    # Llama/Mistral tokenizers.
    state = json.loads(tok.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if not t["content"].startswith("<0x")]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = TEACHER_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def student_tok():
    return make_tiny_tokenizer(vocab_size=STUDENT_VOCAB)


@pytest.fixture(scope="module")
def teacher_tok():
    return _teacher_tokenizer()


def _rows(records):
    rows, _ = rows_from_records(records, source="<test>")
    return rows


def _plain(tokenizer):
    """A copy without a chat template: prompt/response rows are tokenized plainly."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def _pair(rows, student_tok, teacher_tok, *, max_seq_len=512, **kwargs):
    samples, _ = tokenize_rows(rows, student_tok, max_seq_len=max_seq_len)
    return (samples, *pair_samples(rows, samples, student_tok, teacher_tok, max_seq_len=max_seq_len, **kwargs))


def _pairs(student: TokenizedSample, teacher: TokenizedSample) -> list[tuple[int, int]]:
    """(student target index, teacher target index) of each aligned prediction, checking the invariant."""
    assert student.kd_mask is not None and student.kd_mask.dtype == np.bool_ and len(student.kd_mask) == len(student)
    assert not student.kd_mask[0] and not teacher.loss_mask[0]
    assert not (student.kd_mask & ~student.loss_mask).any()  # a subset of the student's targets
    student_targets = np.flatnonzero(student.kd_mask[1:]) + 1
    teacher_targets = np.flatnonzero(teacher.loss_mask[1:]) + 1
    assert len(student_targets) == len(teacher_targets)
    assert student.kd_mask[1:].sum() == teacher.loss_mask[1:].sum()
    return list(zip(student_targets.tolist(), teacher_targets.tolist()))


def _response_start(sample: TokenizedSample) -> int:
    return int(np.argmax(sample.loss_mask))


def _surface(tokenizer, token_id) -> bytes:
    """The bytes one vocabulary entry stands for ("Ġ"/"▁" are spaces, "<0x5A>" is "Z")."""
    token_id = int(token_id)
    return _SurfaceDecoder(tokenizer)(token_id, tokenizer.convert_ids_to_tokens(token_id))


def _check_same_text(student_tok, teacher_tok, student, teacher, teacher_full, response):
    """Each aligned prediction predicts the same text after the same response prefix, decoded by each tokenizer;
    returns the (prefix, predicted text) of each."""
    assert teacher.input_ids.tolist() == teacher_full.input_ids[: len(teacher)].tolist()
    s0, t0 = _response_start(student), _response_start(teacher_full)

    def decode(tok, ids):
        return tok.decode(ids.tolist())

    texts = []
    for s, t in _pairs(student, teacher):
        student_prefix = decode(student_tok, student.input_ids[s0:s])
        teacher_prefix = decode(teacher_tok, teacher.input_ids[t0:t])
        assert student_prefix == teacher_prefix
        student_next = decode(student_tok, student.input_ids[s0 : s + 1])[len(student_prefix) :]
        teacher_next = decode(teacher_tok, teacher.input_ids[t0 : t + 1])[len(teacher_prefix) :]
        assert student_next == teacher_next and student_next and "\ufffd" not in student_next
        assert response.startswith(student_prefix + student_next)
        # Token by token: the two target tokens stand for the same bytes, up to the space SentencePiece prepends to a
        # text it tokenizes (the plain response's first token "▁Two" covers "Two"; token_spans' rule).
        student_surface = _surface(student_tok, student.input_ids[s])
        teacher_surface = _surface(teacher_tok, teacher.input_ids[t])
        assert student_surface == teacher_surface or (s == s0 and student_surface == teacher_surface.lstrip(b" "))
        texts.append((student_prefix, student_next))
    return texts


# ----------------------------------------------------------------------------------------------- invariants


def test_chat_rows_pair_the_same_text(student_tok, teacher_tok):
    rows = _rows(CHAT_RECORDS)
    samples, paired, teacher_samples, report = _pair(rows, student_tok, teacher_tok)
    teacher_full, _ = tokenize_rows(rows, teacher_tok, max_seq_len=512)
    assert [s.sample_id for s in paired] == [s.sample_id for s in samples] == list(range(len(rows)))
    assert set(teacher_samples) == {s.sample_id for s in samples}
    for original, student, full in zip(samples, paired, teacher_full):
        assert student is not original and original.kd_mask is None  # new samples; the input is unchanged
        assert np.array_equal(student.input_ids, original.input_ids)
        assert np.array_equal(student.loss_mask, original.loss_mask)
        teacher = teacher_samples[student.sample_id]
        assert teacher.sample_id == student.sample_id
        assert len(_pairs(student, teacher)) >= 3
        _check_same_text(student_tok, teacher_tok, student, teacher, full, rows[student.sample_id].response)
        # The closing end-of-turn target (<|im_end|>) is never aligned.
        assert student.input_ids[-1] == student_tok.eos_token_id and student.loss_mask[-1] and not student.kd_mask[-1]
        assert not teacher.loss_mask[-1] and full.input_ids[-1] == teacher_tok.eos_token_id
    assert report.num_without_alignment == 0 and 0.3 < report.aligned_fraction < 1.0


def test_plain_rows_without_chat_templates(student_tok, teacher_tok):
    student_plain, teacher_plain = _plain(student_tok), _plain(teacher_tok)
    rows = _rows(PLAIN_RECORDS)
    samples, paired, teacher_samples, report = _pair(rows, student_plain, teacher_plain)
    teacher_full, _ = tokenize_rows(rows, teacher_plain, max_seq_len=512)
    assert all(t.input_ids[0] == teacher_plain.bos_token_id for t in teacher_full)  # plain text gets <s>
    for student, full in zip(paired, teacher_full):
        teacher = teacher_samples[student.sample_id]
        assert len(_pairs(student, teacher)) >= 3
        _check_same_text(student_plain, teacher_plain, student, teacher, full, rows[student.sample_id].response)
        assert not student.kd_mask[-1]  # the appended EOS
    assert report.num_without_alignment == 0


def test_rows_from_a_jsonl_file_and_the_report(student_tok, teacher_tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in CHAT_RECORDS))
    rows, _ = read_jsonl(path)
    samples, paired, teacher_samples, report = _pair(rows, student_tok, teacher_tok)
    teacher_full, _ = tokenize_rows(rows, teacher_tok, max_seq_len=512)
    assert report.num_samples == len(rows)
    assert report.num_student_targets == sum(int(s.loss_mask[1:].sum()) for s in samples)
    assert report.num_aligned == sum(int(s.kd_mask[1:].sum()) for s in paired)
    assert report.num_aligned == sum(int(t.loss_mask[1:].sum()) for t in teacher_samples.values())
    assert report.num_teacher_targets == sum(int(t.loss_mask[1:].sum()) for t in teacher_full)
    assert report.num_aligned < min(report.num_student_targets, report.num_teacher_targets)
    assert report.aligned_fraction == report.num_aligned / report.num_student_targets
    line = report.summary("train.jsonl")
    assert line.startswith(f"train.jsonl: {report.num_aligned}/{report.num_student_targets} student target tokens")
    assert f"({report.aligned_fraction:.1%})" in line and f"0 of {len(rows)} samples without any" in line
    metrics = report.as_metrics("kd")
    assert metrics["kd/aligned_fraction"] == report.aligned_fraction
    assert metrics["kd/num_aligned"] == report.num_aligned and metrics["kd/num_without_alignment"] == 0
    assert AlignmentReport().aligned_fraction == 0.0


def test_identical_tokenizers_distill_every_target_but_the_end_of_turn(student_tok):
    chat_rows, plain_rows = _rows(ASCII_RECORDS), _rows([r for r in ASCII_RECORDS if "prompt" in r])
    for tokenizer, rows in ((student_tok, chat_rows), (_plain(student_tok), plain_rows)):
        samples, paired, teacher_samples, report = _pair(rows, tokenizer, copy.deepcopy(tokenizer))
        for student in paired:
            teacher = teacher_samples[student.sample_id]
            assert np.array_equal(teacher.input_ids, student.input_ids)
            expected = student.loss_mask.copy()
            expected[-1] = False  # the closing <|im_end|>: after the response text, never aligned
            assert student.input_ids[-1] == tokenizer.eos_token_id
            assert np.array_equal(student.kd_mask, expected)
            assert np.array_equal(teacher.loss_mask, expected)
        assert report.num_aligned == report.num_student_targets - len(rows)


def test_unicode_responses(student_tok, teacher_tok):
    response = "🙂 世界你好, naïve café 😀👍 Zürich"
    rows = _rows([{"prompt": "Greet me.", "response": response}])
    samples, paired, teacher_samples, _ = _pair(rows, student_tok, teacher_tok)
    (teacher_full,), _ = tokenize_rows(rows, teacher_tok, max_seq_len=512)
    student, teacher = paired[0], teacher_samples[0]
    texts = _check_same_text(student_tok, teacher_tok, student, teacher, teacher_full, response)
    # Offsets are in characters: after emoji, CJK and accented letters (several bytes, several byte tokens on one
    # side or both), the alignment picks up again.
    assert ("🙂 世界你好, naïve café 😀👍 Zü", "r") in texts
    # The student spells each emoji as 4 byte tokens, all with the emoji's span: they are grouped, never paired.
    assert not any(any(ord(c) > 0xFFFF for c in text) for _, text in texts)
    assert len(student_tok("😀", add_special_tokens=False)["input_ids"]) == 4


# ----------------------------------------------------------------------------------------------- truncation


TRUNCATION_RECORDS = [
    {"prompt": "Say hi.", "response": "Hi 🙂 the quick brown fox 你好 jumps over the lazy dog. Two plus two is four."}
]


@pytest.mark.parametrize("teacher_is_longer", [False, True])
def test_truncation_only_removes_pairs(student_tok, teacher_tok, teacher_is_longer):
    """At every max_seq_len, the pairs are those of the untruncated samples that fit on both sides (a cut through
    the byte tokens of an emoji or a CJK character must not pair its first byte with the whole character)."""
    if teacher_is_longer:  # the byte-level tokenizer needs more tokens for this row
        student_tok, teacher_tok = teacher_tok, student_tok
    rows = _rows(TRUNCATION_RECORDS)
    _, (full_student,), full_teacher, _ = _pair(rows, student_tok, teacher_tok, max_seq_len=4096)
    full_pairs = set(_pairs(full_student, full_teacher[0]))
    assert (len(full_teacher[0]) > len(full_student)) == teacher_is_longer
    checked = 0
    for max_seq_len in range(2, max(len(full_student), len(full_teacher[0])) + 1):
        try:
            student_samples, _ = tokenize_rows(rows, student_tok, max_seq_len=max_seq_len)
        except DataError:
            continue  # no student target within max_seq_len
        expected = {(s, t) for s, t in full_pairs if s < max_seq_len and t < max_seq_len}
        try:
            (student,), teachers, _ = pair_samples(
                rows, student_samples, student_tok, teacher_tok, max_seq_len=max_seq_len
            )
        except DataError:
            assert not expected, max_seq_len
            continue
        teacher = teachers[0]
        assert len(student) <= max_seq_len and len(teacher) <= max_seq_len
        assert set(_pairs(student, teacher)) == expected, max_seq_len
        checked += 1
    assert checked > 10


def test_teacher_side_too_long_is_counted(student_tok, teacher_tok):
    # Under truncation="drop": no alignment, a one-token teacher sample, counted. The byte-level tokenizer spells
    # this row with more tokens, so here it is the teacher.
    short, long = teacher_tok, student_tok
    (full_short,), _ = tokenize_rows(_rows(TRUNCATION_RECORDS), short, max_seq_len=4096)
    (full_long,), _ = tokenize_rows(_rows(TRUNCATION_RECORDS), long, max_seq_len=4096)
    cut = len(full_short)
    assert len(full_long) > cut
    rows2 = _rows([*TRUNCATION_RECORDS, {"prompt": "Hi", "response": "Hello."}])
    student_samples, _ = tokenize_rows(rows2, short, max_seq_len=cut, truncation="drop")
    assert [s.sample_id for s in student_samples] == [0, 1]
    paired, teachers, report = pair_samples(rows2, student_samples, short, long, max_seq_len=cut, truncation="drop")
    assert report.num_teacher_dropped == 1 and report.num_without_alignment == 1
    assert teachers[0].input_ids.tolist() == full_long.input_ids[:1].tolist()  # its first token
    assert not teachers[0].loss_mask.any()
    assert not paired[0].kd_mask.any() and paired[1].kd_mask.any()
    assert "teacher side: too long" in str(report.examples[0])


# ----------------------------------------------------------------------------------------------- failures


def test_response_not_found_is_counted(student_tok, teacher_tok):
    rows = _rows([*CHAT_RECORDS, {"prompt": "Be loud.", "response": "I shout: hello world"}])
    samples, paired, teacher_samples, report = _pair(
        rows, student_tok, teacher_tok, teacher_chat_template=SHOUTING_TEMPLATE
    )
    loud = paired[-1]
    assert not loud.kd_mask.any() and loud.loss_mask[1:].any()
    assert len(teacher_samples[loud.sample_id]) == 1 and not teacher_samples[loud.sample_id].loss_mask.any()
    assert report.num_response_not_found == 1 and report.num_without_alignment == 1
    assert [e.line for e in report.examples] == [len(rows)]
    assert all(p.kd_mask[1:].any() for p in paired[:-1])
    assert f"1 of {len(rows)} samples without any (response not found 1" in report.summary("x")
    # Every row unaligned: the templates are wrong, which is an error, not a report.
    with pytest.raises(DataError, match="no sample has a student prediction aligned"):
        _pair(rows[-1:], student_tok, teacher_tok, teacher_chat_template=SHOUTING_TEMPLATE)


def test_a_template_that_trims_the_response(student_tok, teacher_tok):
    trimming = TEACHER_TEMPLATE.replace(
        "### Assistant:\n{{ m['content'] }}</s>", "### Assistant:\n{{ m['content'] | trim }}</s>"
    )
    rows = _rows([{"prompt": "Hi", "response": "  Hello there, friend.  "}])
    _, (student,), teachers, report = _pair(rows, student_tok, teacher_tok, teacher_chat_template=trimming)
    assert report.num_without_alignment == 0
    assert len(_pairs(student, teachers[0])) >= 2


def test_a_token_across_the_response_edge_is_not_aligned(student_tok, teacher_tok):
    # The teacher's turn writes a space after the generation prompt: its "▁Two" covers " Two", one character before
    # the response. Clipped to "Two" it would look like the student's "Two", but it predicts " Two" after "...:".
    template = TEACHER_TEMPLATE.replace("### Assistant:\n{% endif %}", "### Assistant:{% endif %}")
    template = template.replace("### Assistant:\n{{", "### Assistant: {{")
    rows = _rows([CHAT_RECORDS[0]])
    _, (student,), teachers, _ = _pair(rows, student_tok, teacher_tok, teacher_chat_template=template)
    teacher = teachers[0]
    first = _response_start(student)
    assert student_tok.convert_ids_to_tokens(int(student.input_ids[first])) == "Two"
    assert "▁Two" in teacher_tok.convert_ids_to_tokens(teacher.input_ids.tolist())
    assert not student.kd_mask[first] and student.kd_mask[first + 1]
    (teacher_full,), _ = tokenize_rows(rows, teacher_tok, max_seq_len=512, chat_template=template)
    _check_same_text(student_tok, teacher_tok, student, teacher, teacher_full, rows[0].response)


def test_student_sample_mismatch_is_counted(student_tok, teacher_tok):
    rows = _rows(ASCII_RECORDS)
    samples, _ = tokenize_rows(rows, student_tok, max_seq_len=512)
    tampered = copy.copy(samples)
    ids = samples[1].input_ids.copy()
    ids[2] = (ids[2] + 1) % len(student_tok)
    tampered[1] = TokenizedSample(samples[1].sample_id, ids, samples[1].loss_mask)
    paired, teachers, report = pair_samples(rows, tampered, student_tok, teacher_tok, max_seq_len=512)
    assert report.num_mismatched == 1 and report.num_without_alignment == 1
    assert not paired[1].kd_mask.any() and len(teachers[samples[1].sample_id]) == 1
    assert all(p.kd_mask.any() for i, p in enumerate(paired) if i != 1)
    # The student's chat template must be the one tokenize_rows used.
    other_template = "System prompt.\n" + student_tok.chat_template
    with pytest.raises(DataError, match="no sample has a student prediction aligned"):
        pair_samples(rows, samples, student_tok, teacher_tok, max_seq_len=512, student_chat_template=other_template)
    with pytest.raises(ValueError, match="student tokenizer: line 1: the chat template's assistant turn"):
        pair_samples(rows, samples, student_tok, teacher_tok, max_seq_len=512, student_chat_template=TEACHER_TEMPLATE)


def test_argument_errors(student_tok, teacher_tok):
    rows = _rows(CHAT_RECORDS)
    samples, _ = tokenize_rows(rows, student_tok, max_seq_len=512)
    with pytest.raises(ValueError, match="no row with that sample_id"):
        pair_samples(rows[:2], samples, student_tok, teacher_tok, max_seq_len=512)
    with pytest.raises(ValueError, match="appears twice"):
        pair_samples(rows, [samples[0], samples[0]], student_tok, teacher_tok, max_seq_len=512)
    with pytest.raises(DataError, match="teacher tokenizer has no chat template"):
        pair_samples(rows, samples, student_tok, _plain(teacher_tok), max_seq_len=512)
    with pytest.raises(ValueError, match="truncation"):
        pair_samples(rows, samples, student_tok, teacher_tok, max_seq_len=512, truncation="left")


# ----------------------------------------------------------------------------------------------- spans


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_batched_spans_equal_token_spans(student_tok, teacher_tok, which):
    """The spans built from the batched offsets are those token_spans gives for the rendered text."""
    tokenizer = student_tok if which == "student" else teacher_tok
    side = _Side.of(which, tokenizer, None, None, True, "\n")
    for encoded in encode_rows(_rows(CHAT_RECORDS), tokenizer, side.rendering, with_offsets=True):
        reference = token_spans(tokenizer, encoded.text)
        n = len(encoded.input_ids)
        starts, ends, special = side.token_spans(encoded)
        assert encoded.input_ids.tolist() == reference.token_ids[:n].tolist()
        assert starts.tolist() == reference.starts[:n].tolist()
        assert ends.tolist() == reference.ends[:n].tolist()
        assert special.tolist() == reference.special[:n].tolist()


# ----------------------------------------------------------------------------------------------- worker processes


def _worker_records(num_rows: int) -> list[dict]:
    """CHAT_RECORDS in turn, every 17th row one whose response is not in the (shouting) teacher's rendering."""
    return [
        {"prompt": f"Row {i}: be loud.", "response": f"I shout: hello world {i}"}
        if i % 17 == 5
        else CHAT_RECORDS[i % len(CHAT_RECORDS)]
        for i in range(num_rows)
    ]


def test_worker_processes_give_the_serial_result(student_tok, teacher_tok, monkeypatch):
    monkeypatch.setattr(cross_tokenizer, "CHUNK_ROWS", 32)  # 10 chunks
    calls = []
    in_processes = cross_tokenizer._map_in_processes
    monkeypatch.setattr(
        cross_tokenizer,
        "_map_in_processes",
        lambda pairing, chunks, num_workers: calls.append(num_workers) or in_processes(pairing, chunks, num_workers),
    )
    rows = _rows(_worker_records(300))
    samples, stats = tokenize_rows(rows, student_tok, max_seq_len=40)  # rows dropped, others cut
    assert stats.dropped and stats.num_truncated
    kwargs = {"max_seq_len": 40, "teacher_chat_template": SHOUTING_TEMPLATE}
    serial = pair_samples(rows, samples, student_tok, teacher_tok, num_workers=1, **kwargs)
    assert calls == []
    parallel = pair_samples(rows, samples, student_tok, teacher_tok, num_workers=2, **kwargs)
    assert calls == [2]

    (serial_samples, serial_teachers, serial_report), (samples2, teachers2, report2) = serial, parallel
    assert report2 == serial_report
    assert serial_report.num_response_not_found == 18 and len(serial_report.examples) == 10  # from several chunks
    assert serial_report.num_aligned > 0 and serial_report.num_without_alignment == 18
    assert [s.sample_id for s in samples2] == [s.sample_id for s in serial_samples] == [s.sample_id for s in samples]
    for a, b in zip(serial_samples, samples2):
        assert a.input_ids is b.input_ids and a.loss_mask is b.loss_mask  # the caller's arrays, as serially
        assert a.kd_mask.dtype == b.kd_mask.dtype and np.array_equal(a.kd_mask, b.kd_mask)
    assert list(teachers2) == list(serial_teachers)
    for sample_id, a in serial_teachers.items():
        b = teachers2[sample_id]
        assert a.sample_id == b.sample_id and a.kd_mask is None and b.kd_mask is None
        assert a.input_ids.dtype == b.input_ids.dtype and np.array_equal(a.input_ids, b.input_ids)
        assert a.loss_mask.dtype == b.loss_mask.dtype and np.array_equal(a.loss_mask, b.loss_mask)

    # An error in a worker is raised as the serial loop raises it: the first failing chunk's.
    with pytest.raises(ValueError, match="student tokenizer: line 1: the chat template's assistant turn"):
        pair_samples(rows, samples, student_tok, teacher_tok, num_workers=2, student_chat_template=TEACHER_TEMPLATE,
                     **kwargs)  # fmt: skip
    assert calls == [2, 2]


def test_num_workers(student_tok, teacher_tok):
    assert cross_tokenizer._resolve_num_workers(8, 3) == 3  # no more workers than chunks
    assert cross_tokenizer._resolve_num_workers(8, 1) == 1  # one chunk: in this process
    assert cross_tokenizer._resolve_num_workers(0, 10) == 1
    assert 1 <= cross_tokenizer._resolve_num_workers(None, 100) <= cross_tokenizer.MAX_DEFAULT_WORKERS
    rows = _rows(CHAT_RECORDS)
    samples, _ = tokenize_rows(rows, student_tok, max_seq_len=512)
    with pytest.raises(ValueError, match="num_workers must be 0 or more"):
        pair_samples(rows, samples, student_tok, teacher_tok, max_seq_len=512, num_workers=-1)
