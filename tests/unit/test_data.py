"""kdscale.data: JSONL validation, tokenization and loss masks, per-rank layout, step sampler, quickstart data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdscale.data import (
    DataError,
    StepSampler,
    TokenizedSample,
    build_step_layout,
    gather_labels,
    gather_prediction_rows,
    load_jsonl_dataset,
    make_micro_batch,
    make_packed_micro_batch,
    read_jsonl,
    rows_from_records,
    sample_spans,
    tokenize_rows,
)
from tests.fixtures import make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "data" / "quickstart"

PR_ROW = {"prompt": "What is two plus two?", "response": "Two plus two is four."}
MSG_ROW = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a primary colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Red is a primary colour."},
    ],
    "id": "m1",
}


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def _rows(*records):
    rows, _ = rows_from_records(list(records), source="<test>")
    return rows


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _masked_text(tokenizer, sample: TokenizedSample) -> str:
    return tokenizer.decode(sample.input_ids[sample.loss_mask].tolist())


# ----------------------------------------------------------------------------------------------- loss masks


def test_chat_template_prompt_response_mask(tok):
    (sample,), stats = tokenize_rows(_rows(PR_ROW), tok, max_seq_len=512)
    assert _masked_text(tok, sample) == PR_ROW["response"] + "<|im_end|>"
    messages = [{"role": "user", "content": PR_ROW["prompt"]}]
    prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert sample.input_ids[:n].tolist() == prompt_ids
    assert not sample.loss_mask[:n].any()  # the prompt is never a target
    assert sample.loss_mask[n:].all()  # the response and the closing EOS are
    assert sample.input_ids[-1] == tok.eos_token_id  # the template's trailing "\n" is cut after the EOS
    assert sample.input_ids.dtype == np.int32 and sample.loss_mask.dtype == np.bool_
    assert stats.num_samples == 1 and stats.num_loss_tokens == sample.num_loss_tokens


def test_chat_template_messages_mask_only_last_turn(tok):
    (sample,), _ = tokenize_rows(_rows(MSG_ROW), tok, max_seq_len=512)
    assert _masked_text(tok, sample) == "Red is a primary colour.<|im_end|>"
    text = tok.decode(sample.input_ids.tolist())
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "<|im_start|>assistant\nBlue.<|im_end|>" in text  # earlier assistant turn: context, not target
    assert int((sample.input_ids == tok.eos_token_id).sum()) == 5
    assert int((sample.input_ids[sample.loss_mask] == tok.eos_token_id).sum()) == 1


def test_plain_concatenation_without_chat_template(plain_tok):
    (sample,), _ = tokenize_rows(_rows(PR_ROW), plain_tok, max_seq_len=512)
    prompt_ids = plain_tok(PR_ROW["prompt"] + "\n", add_special_tokens=False)["input_ids"]
    response_ids = plain_tok(PR_ROW["response"], add_special_tokens=False)["input_ids"]
    assert sample.input_ids.tolist() == prompt_ids + response_ids + [plain_tok.eos_token_id]
    assert sample.loss_mask.tolist() == [False] * len(prompt_ids) + [True] * (len(response_ids) + 1)
    assert _masked_text(plain_tok, sample) == PR_ROW["response"] + "<|im_end|>"

    (no_eos,), _ = tokenize_rows(_rows(PR_ROW), plain_tok, max_seq_len=512, add_eos=False)
    assert no_eos.input_ids.tolist() == prompt_ids + response_ids


def test_plain_concatenation_adds_bos_only_if_tokenizer_does():
    from tokenizers.processors import TemplateProcessing

    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = None
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    assert tokenizer("a")["input_ids"][0] == bos
    (sample,), _ = tokenize_rows(_rows(PR_ROW), tokenizer, max_seq_len=512)
    assert sample.input_ids[0] == bos and int((sample.input_ids == bos).sum()) == 1
    assert not sample.loss_mask[0]
    assert _masked_text(tokenizer, sample) == PR_ROW["response"] + "<|im_end|>"


def test_messages_row_needs_a_chat_template(plain_tok):
    with pytest.raises(DataError, match="chat template"):
        tokenize_rows(_rows(MSG_ROW), plain_tok, max_seq_len=512)


def test_chat_template_override_and_missing_end_of_turn(plain_tok, tok):
    (sample,), _ = tokenize_rows(_rows(PR_ROW), plain_tok, max_seq_len=512, chat_template=tok.chat_template)
    assert _masked_text(plain_tok, sample) == PR_ROW["response"] + "<|im_end|>"
    no_eos_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    no_eos_template += "{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(ValueError, match="eos_token_id"):
        tokenize_rows(_rows(PR_ROW), tok, max_seq_len=512, chat_template=no_eos_template)


def test_rows_whose_prompt_is_not_a_prefix_are_dropped(tok):
    # a template whose generation prompt is not how the assistant turn is rendered: nothing can be masked safely
    template = tok.chat_template.replace(
        "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\nSure: {% endif %}"
    )
    with pytest.raises(DataError, match="not a prefix"):
        tokenize_rows(_rows(PR_ROW), tok, max_seq_len=512, chat_template=template)


# ----------------------------------------------------------------------------------------------- truncation


def test_truncation_right_keeps_partial_response_and_drops_rows_without_targets(tok):
    long_row = {"prompt": "Say it.", "response": "The quick brown fox jumps over the lazy dog. " * 6}
    long_prompt = {"prompt": "The quick brown fox jumps over the lazy dog. " * 6, "response": "Yes."}
    (full,), _ = tokenize_rows(_rows(long_row), tok, max_seq_len=4096)
    n_prompt = int(np.argmax(full.loss_mask))
    max_seq_len = n_prompt + 5
    short_row = {"prompt": "Hi", "response": "Hello."}
    samples, stats = tokenize_rows(_rows(long_row, long_prompt, short_row), tok, max_seq_len=max_seq_len)
    assert [s.sample_id for s in samples] == [0, 2]
    cut = samples[0]
    assert len(cut) == max_seq_len and cut.loss_mask[n_prompt:].all() and cut.num_loss_tokens == 5
    assert cut.input_ids.tolist() == full.input_ids[:max_seq_len].tolist()
    assert stats.num_truncated == 1
    assert [d.line for d in stats.dropped] == [2] and "too long" in stats.dropped[0].reason
    assert stats.num_rejected == 0  # drops are not malformed rows


def test_truncation_drop(tok):
    long_row = {"prompt": "Say it.", "response": "The quick brown fox jumps over the lazy dog. " * 6}
    samples, stats = tokenize_rows(_rows(PR_ROW, long_row), tok, max_seq_len=40, truncation="drop")
    assert [s.sample_id for s in samples] == [0] and stats.num_truncated == 0
    assert [d.line for d in stats.dropped] == [2] and "max_seq_len 40" in stats.dropped[0].reason
    with pytest.raises(DataError, match="No sample is left"):
        tokenize_rows(_rows(long_row), tok, max_seq_len=40, truncation="drop")
    with pytest.raises(ValueError, match="truncation"):
        tokenize_rows(_rows(PR_ROW), tok, max_seq_len=40, truncation="left")


# ----------------------------------------------------------------------------------------------- JSONL


BAD_LINES = {
    2: ('{"prompt": "hi", "response": "hello"', "invalid JSON"),
    3: ('{"prompt": "hi"}', "missing 'response'"),
    4: ('{"prompt": "hi", "response": ""}', "empty response"),
    5: ('{"prompt": 3, "response": "x"}', "'prompt' must be a string"),
    6: ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must be from the assistant"),
    7: ('{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "is not one of"),
    8: ('{"instruction": "hi", "output": "x"}', "needs 'prompt' and 'response', or 'messages'"),
    9: ('["prompt", "response"]', "not a JSON object"),
    10: ('{"messages": [{"role": "assistant", "content": "x"}]}', "no prompt before"),
    12: ('{"prompt": "a", "response": "b", "id": [1]}', "'id' must be"),
    13: ('{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]}', "content must be"),
}


def _mixed_file(tmp_path: Path) -> Path:
    lines = []
    for line_no in range(1, 21):
        if line_no in BAD_LINES:
            lines.append(BAD_LINES[line_no][0])
        elif line_no == 11:
            lines.append("")  # blank lines are skipped, not rows
        elif line_no % 2:
            lines.append(json.dumps({**PR_ROW, "id": line_no}))
        else:
            lines.append(json.dumps(MSG_ROW))
    return _write(tmp_path / "mixed.jsonl", lines)


def test_read_jsonl_collects_bad_rows_with_line_numbers(tmp_path):
    rows, stats = read_jsonl(_mixed_file(tmp_path), max_bad_fraction=0.6)
    assert stats.num_rows == 19 and stats.num_rejected == len(BAD_LINES) and len(rows) == 8
    assert [r.line for r in stats.rejected] == sorted(BAD_LINES)
    for rejected in stats.rejected:
        assert BAD_LINES[rejected.line][1] in rejected.reason, rejected
    assert [r.sample_id for r in rows] == list(range(8))
    assert rows[0].line == 1 and rows[0].row_id == "1" and rows[0].format == "prompt_response"
    assert rows[0].messages[0] == {"role": "user", "content": PR_ROW["prompt"]}
    messages_row = next(r for r in rows if r.format == "messages")
    assert messages_row.response == "Red is a primary colour." and len(messages_row.prompt_messages) == 4


def test_too_many_bad_rows_raise_with_report(tmp_path):
    with pytest.raises(DataError) as info:
        read_jsonl(_mixed_file(tmp_path), max_bad_fraction=0.1)
    message = str(info.value)
    assert "11 of 19 rows rejected" in message and "line 2: invalid JSON" in message
    assert "line 3: missing 'response'" in message and "raise data.max_bad_fraction" in message
    assert "line 12:" in message and "line 13:" not in message and "(1 more)" in message  # the first 10
    assert isinstance(info.value, ValueError)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="empty"):
        read_jsonl(_write(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match="empty"):
        read_jsonl(_write(tmp_path / "blank.jsonl", ["", "   "]))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(PR_ROW).encode() + b"\r\n\xff\n")
    rows, stats = read_jsonl(bom, max_bad_fraction=0.5)
    assert len(rows) == 1 and [(r.line, r.reason[:17]) for r in stats.rejected] == [(2, "not valid UTF-8 (")]
    with pytest.raises(DataError, match="1 of 1 rows rejected"):
        read_jsonl(_write(tmp_path / "allbad.jsonl", ["nope"]), max_bad_fraction=1.0)


def test_load_jsonl_dataset_end_to_end(tmp_path, tok):
    path = _write(tmp_path / "d.jsonl", [json.dumps(PR_ROW), "oops", json.dumps(MSG_ROW)])
    samples, stats = load_jsonl_dataset(path, tok, max_seq_len=512, max_bad_fraction=0.5)
    assert [s.sample_id for s in samples] == [0, 1]
    assert stats.num_rows == 3 and stats.num_rejected == 1 and stats.num_samples == 2
    assert "3 rows -> 2 samples" in stats.summary()


# ----------------------------------------------------------------------------------------------- layout


def _synthetic_samples(n: int, seed: int = 0, max_len: int = 60) -> list[TokenizedSample]:
    rng = np.random.default_rng(seed)
    samples = []
    for sample_id in range(n):
        length = int(rng.integers(4, max_len))
        n_prompt = int(rng.integers(1, length - 1))
        ids = rng.integers(10, 250, size=length).astype(np.int32)
        mask = np.zeros(length, dtype=bool)
        mask[n_prompt:] = True
        samples.append(TokenizedSample(sample_id, ids, mask))
    return samples


def _check_layout(layout, samples, max_tokens, pad_id=0):
    by_id = {s.sample_id: s for s in samples}
    seen = [i for shard in layout.shards for mb in shard for i in mb.sample_ids]
    assert sorted(seen) == sorted(by_id)  # every sample exactly once
    assert len({len(shard) for shard in layout.shards}) == 1  # same number of micro-batches on every rank
    for shard in layout.shards:
        for mb in shard:
            batch, length = mb.input_ids.shape
            assert batch * length <= max_tokens or batch == 1
            for b, sample_id in enumerate(mb.sample_ids):
                sample = by_id[sample_id]
                n = len(sample)
                assert length == max(len(by_id[i]) for i in mb.sample_ids)
                assert mb.input_ids[b, :n].tolist() == sample.input_ids.tolist()
                assert mb.loss_mask[b, :n].tolist() == sample.loss_mask.tolist()
                assert (mb.input_ids[b, n:] == pad_id).all() and not mb.loss_mask[b, n:].any()
                assert mb.attention_mask[b].sum() == n
    assert layout.global_num_loss_tokens == sum(s.num_loss_tokens for s in samples)
    assert layout.global_num_loss_tokens == sum(mb.num_loss_tokens for shard in layout.shards for mb in shard)


@pytest.mark.parametrize("dp_size,max_tokens", [(1, 256), (2, 256), (3, 100), (4, 64), (8, 30)])
def test_layout_balance_and_invariants(dp_size, max_tokens):
    samples = _synthetic_samples(37, seed=dp_size)
    layout = build_step_layout(
        samples, dp_size=dp_size, max_tokens_per_micro_batch=max_tokens, pad_token_id=0, step=5, epoch=1
    )
    assert layout.dp_size == dp_size and layout.step == 5 and layout.epoch == 1
    _check_layout(layout, samples, max_tokens)
    rank_tokens = [sum(mb.num_tokens for mb in shard if mb.sample_ids) for shard in layout.shards]
    assert max(rank_tokens) - min(rank_tokens) <= max(len(s) for s in samples)
    again = build_step_layout(samples, dp_size=dp_size, max_tokens_per_micro_batch=max_tokens, pad_token_id=0)
    assert [[mb.sample_ids for mb in shard] for shard in again.shards] == [
        [mb.sample_ids for mb in shard] for shard in layout.shards
    ]


def test_layout_dp1_and_dp2_hold_the_same_samples():
    samples = _synthetic_samples(16, seed=3)
    one = build_step_layout(samples, dp_size=1, max_tokens_per_micro_batch=128, pad_token_id=0)
    two = build_step_layout(samples, dp_size=2, max_tokens_per_micro_batch=128, pad_token_id=0)
    ids = [sorted(i for shard in lay.shards for mb in shard for i in mb.sample_ids) for lay in (one, two)]
    assert ids[0] == ids[1] == list(range(16))
    assert one.global_num_loss_tokens == two.global_num_loss_tokens


def test_layout_equalizes_micro_batch_counts_by_splitting_then_filler():
    samples = _synthetic_samples(9, seed=1, max_len=20)
    huge = TokenizedSample(99, np.arange(500, dtype=np.int32) % 200, np.arange(500) >= 100)
    layout = build_step_layout([huge, *samples], dp_size=2, max_tokens_per_micro_batch=60, pad_token_id=3)
    # rank 0 holds the huge sample alone; rank 1 packs the small ones; both run the same number of passes
    assert layout.shards[0][0].sample_ids == [99]
    assert len(layout.shards[0]) == len(layout.shards[1])
    fillers = layout.shards[0][1:]
    assert fillers and all(mb.sample_ids == [] and mb.num_loss_tokens == 0 for mb in fillers)
    assert all(mb.input_ids.tolist() == [[3]] and mb.attention_mask.tolist() == [[1]] for mb in fillers)
    _check_layout(layout, [huge, *samples], 60, pad_id=3)

    # splitting: rank 1 has one fat micro-batch, rank 0 two; rank 1 splits instead of adding fillers
    small = [TokenizedSample(i, np.ones(10, dtype=np.int32), np.arange(10) >= 5) for i in range(6)]
    big = [TokenizedSample(10 + i, np.ones(30, dtype=np.int32), np.arange(30) >= 5) for i in range(2)]
    layout = build_step_layout(big + small, dp_size=2, max_tokens_per_micro_batch=60, pad_token_id=0)
    assert [len(shard) for shard in layout.shards] == [2, 2]
    assert all(mb.sample_ids for shard in layout.shards for mb in shard)
    _check_layout(layout, big + small, 60)


def test_layout_pad_to_multiple_and_errors():
    samples = _synthetic_samples(6, seed=2)
    layout = build_step_layout(samples, dp_size=2, max_tokens_per_micro_batch=200, pad_token_id=0, pad_to_multiple_of=8)
    for shard in layout.shards:
        for mb in shard:
            assert mb.input_ids.shape[1] % 8 == 0 and mb.input_ids.numel() <= 200 or len(mb.sample_ids) == 1
    with pytest.raises(ValueError, match="at least 4"):
        build_step_layout(samples[:3], dp_size=4, max_tokens_per_micro_batch=200, pad_token_id=0)


def test_micro_batch_labels_follow_the_batch_convention(tok):
    samples, _ = tokenize_rows(_rows(PR_ROW, MSG_ROW), tok, max_seq_len=512)
    mb = make_micro_batch(samples, pad_token_id=tok.pad_token_id)
    labels = gather_labels(mb.input_ids, mb.loss_mask)
    expected = np.concatenate([s.input_ids[1:][s.loss_mask[1:]] for s in samples])
    assert labels.dtype == torch.int64 and labels.tolist() == expected.tolist()
    assert mb.num_loss_tokens == len(expected)


# ----------------------------------------------------------------------------------------------- packed layout


def _check_packed_layout(layout, samples, max_tokens, multiple=1, pad_id=0):
    by_id = {s.sample_id: s for s in samples}
    seen = [i for shard in layout.shards for mb in shard for i in mb.sample_ids]
    assert sorted(seen) == sorted(by_id)  # every sample exactly once
    assert len({len(shard) for shard in layout.shards}) == 1  # same number of micro-batches on every rank
    for shard in layout.shards:
        for mb in shard:
            if not mb.sample_ids:  # a filler: the same in both layouts
                assert not mb.is_packed and mb.num_loss_tokens == 0
                continue
            assert mb.is_packed and mb.input_ids.shape[0] == 1
            members = [by_id[i] for i in mb.sample_ids]
            assert [len(s) for s in members] == sorted((len(s) for s in members), reverse=True)  # longest first
            num_tokens = sum(len(s) for s in members)
            length = mb.input_ids.shape[1]
            assert length % multiple == 0 and length - multiple < num_tokens <= length
            assert length <= max_tokens or len(members) == 1  # the token budget (a longer sample alone)
            assert mb.num_tokens == num_tokens
            start = 0
            for sample in members:
                stop = start + len(sample)
                assert mb.input_ids[0, start:stop].tolist() == sample.input_ids.tolist()
                assert mb.position_ids[0, start:stop].tolist() == list(range(len(sample)))  # restart per sample
                assert not mb.loss_mask[0, start]  # a sample's first token is never a target
                assert mb.loss_mask[0, start + 1 : stop].tolist() == sample.loss_mask[1:].tolist()
                assert mb.attention_mask[0, start:stop].all()
                start = stop
            assert sample_spans(mb) == [
                (0, s, s + len(x)) for s, x in zip(np.cumsum([0] + [len(x) for x in members]), members)
            ]
            # the pad tail: not attended, no target, pad ids, its own segment of position ids
            assert not mb.attention_mask[0, start:].any() and not mb.loss_mask[0, start:].any()
            assert (mb.input_ids[0, start:] == pad_id).all()
            assert mb.position_ids[0, start:].tolist() == list(range(length - start))
    assert layout.global_num_loss_tokens == sum(s.num_loss_tokens for s in samples)
    assert layout.global_num_loss_tokens == sum(mb.num_loss_tokens for shard in layout.shards for mb in shard)


@pytest.mark.parametrize("dp_size,max_tokens,multiple", [(1, 256, 1), (2, 100, 1), (3, 64, 8), (4, 40, 1), (8, 30, 4)])
def test_packed_layout_invariants(dp_size, max_tokens, multiple):
    samples = _synthetic_samples(37, seed=dp_size)
    kwargs = {"dp_size": dp_size, "max_tokens_per_micro_batch": max_tokens, "pad_token_id": 0}
    layout = build_step_layout(samples, **kwargs, pad_to_multiple_of=multiple, packing=True, step=3, epoch=2)
    assert layout.step == 3 and layout.epoch == 2
    _check_packed_layout(layout, samples, max_tokens, multiple)
    again = build_step_layout(list(reversed(samples)), **kwargs, pad_to_multiple_of=multiple, packing=True)
    for shard, other in zip(layout.shards, again.shards):  # deterministic, whatever the input order
        for mb, mb_again in zip(shard, other, strict=True):
            assert mb.sample_ids == mb_again.sample_ids and torch.equal(mb.input_ids, mb_again.input_ids)
            assert torch.equal(mb.position_ids, mb_again.position_ids) if mb.is_packed else not mb_again.is_packed
    # Ranks hold the same samples as in the padded layout (same balancing), in no more micro-batches.
    padded = build_step_layout(samples, **kwargs, pad_to_multiple_of=multiple)
    for shard, padded_shard in zip(layout.shards, padded.shards):
        assert sorted(i for mb in shard for i in mb.sample_ids) == sorted(
            i for mb in padded_shard for i in mb.sample_ids
        )
    assert len(layout.shards[0]) <= len(padded.shards[0])


def test_packed_layout_equalizes_micro_batch_counts_by_splitting_then_filler():
    samples = _synthetic_samples(9, seed=1, max_len=20)
    huge = TokenizedSample(99, np.arange(500, dtype=np.int32) % 200, np.arange(500) >= 100)
    layout = build_step_layout([huge, *samples], dp_size=2, max_tokens_per_micro_batch=60, pad_token_id=3, packing=True)
    assert layout.shards[0][0].sample_ids == [99] and layout.shards[0][0].input_ids.shape == (1, 500)
    assert len(layout.shards[0]) == len(layout.shards[1])
    fillers = layout.shards[0][1:]
    assert fillers and all(mb.input_ids.tolist() == [[3]] and mb.sample_ids == [] for mb in fillers)
    _check_packed_layout(layout, [huge, *samples], 60, pad_id=3)

    # rank 1 packs its six small samples into one micro-batch, rank 0 needs two: rank 1 splits instead of fillers
    small = [TokenizedSample(i, np.ones(10, dtype=np.int32), np.arange(10) >= 5) for i in range(6)]
    big = [TokenizedSample(10 + i, np.ones(30, dtype=np.int32), np.arange(30) >= 5) for i in range(3)]
    layout = build_step_layout(big + small, dp_size=2, max_tokens_per_micro_batch=60, pad_token_id=0, packing=True)
    assert [len(shard) for shard in layout.shards] == [2, 2]
    assert all(mb.sample_ids for shard in layout.shards for mb in shard)
    _check_packed_layout(layout, big + small, 60)


def test_packed_rows_and_labels_equal_padded_ones(tok):
    samples, _ = tokenize_rows(_rows(PR_ROW, MSG_ROW, PR_ROW), tok, max_seq_len=512)
    samples += _synthetic_samples(5, seed=4)
    samples[-1].loss_mask[0] = True  # a target on a first token: never predicted, in either layout
    padded = make_micro_batch(samples, pad_token_id=tok.pad_token_id)
    packed = make_packed_micro_batch(samples, pad_token_id=tok.pad_token_id, pad_to_multiple_of=16)
    assert packed.is_packed and not padded.is_packed and packed.sample_ids == padded.sample_ids
    assert packed.num_loss_tokens == padded.num_loss_tokens == sum(s.num_loss_tokens for s in samples)
    assert packed.num_tokens == padded.num_tokens
    assert torch.equal(
        gather_labels(packed.input_ids, packed.loss_mask), gather_labels(padded.input_ids, padded.loss_mask)
    )

    # A "hidden state" that names its token and its position within its sample: the rows must name the same ones.
    def fake_hidden(mb):
        positions = mb.position_ids if mb.is_packed else torch.arange(mb.input_ids.shape[1]).expand_as(mb.input_ids)
        return torch.stack([mb.input_ids, positions], dim=-1)

    packed_rows = gather_prediction_rows(fake_hidden(packed), packed.loss_mask)
    padded_rows = gather_prediction_rows(fake_hidden(padded), padded.loss_mask)
    assert torch.equal(packed_rows, padded_rows)

    # Per-sample row counts from the spans, in the same order in both layouts.
    def rows_per_sample(mb):
        return [int(mb.loss_mask[row, start + 1 : stop].sum()) for row, start, stop in sample_spans(mb)]

    assert rows_per_sample(packed) == rows_per_sample(padded) == [s.num_loss_tokens for s in samples]


def test_packed_micro_batch_checks_position_ids_shape():
    mb = make_packed_micro_batch(_synthetic_samples(2), pad_token_id=0)
    with pytest.raises(ValueError, match="position_ids"):
        type(mb)(mb.input_ids, mb.attention_mask, mb.loss_mask, position_ids=mb.position_ids[:, 1:])


# ----------------------------------------------------------------------------------------------- sampler


def test_sampler_is_deterministic_and_drops_the_last_partial_batch():
    sampler = StepSampler(10, global_batch_size=3, seed=7)
    assert sampler.steps_per_epoch == 3
    steps = [sampler.next_step() for _ in range(6)]
    assert [epoch for epoch, _ in steps] == [0, 0, 0, 1, 1, 1]
    for epoch in (0, 1):
        seen = [i for e, idx in steps if e == epoch for i in idx]
        assert len(seen) == len(set(seen)) == 9 and set(seen) <= set(range(10))
    assert steps[:3] != steps[3:]  # a new order each epoch
    other = StepSampler(10, global_batch_size=3, seed=7)
    assert [other.next_step() for _ in range(6)] == steps
    assert StepSampler(10, global_batch_size=3, seed=8).next_step() != steps[0]
    ordered = StepSampler(10, global_batch_size=5, seed=0, shuffle=False)
    assert ordered.next_step() == (0, [0, 1, 2, 3, 4])


def test_sampler_resume_continues_exactly():
    reference = StepSampler(50, global_batch_size=8, seed=3)
    expected = [reference.next_step() for _ in range(20)]
    first = StepSampler(50, global_batch_size=8, seed=3)
    got = [first.next_step() for _ in range(7)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round-trip (the checkpoint format)
    assert state["epoch"] == 1 and state["step_in_epoch"] == 1
    resumed = StepSampler(50, global_batch_size=8, seed=3)
    resumed.load_state_dict(state)
    got += [resumed.next_step() for _ in range(13)]
    assert got == expected
    assert first.position_after(0, 5) == {"epoch": 1, "step_in_epoch": 0}
    with pytest.raises(ValueError, match="seed"):
        StepSampler(50, global_batch_size=8, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        StepSampler(51, global_batch_size=8, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(5, global_batch_size=8, seed=3)


# ----------------------------------------------------------------------------------------------- quickstart


def test_quickstart_dataset_is_clean_and_held_out(tok):
    train, train_stats = read_jsonl(QUICKSTART / "train.jsonl")
    held_out, eval_stats = read_jsonl(QUICKSTART / "eval.jsonl")
    assert train_stats.num_rejected == eval_stats.num_rejected == 0
    assert 200 <= len(train) <= 300 and 30 <= len(held_out) <= 60
    assert 0.1 <= sum(r.format == "messages" for r in train) / len(train) <= 0.35

    def key(row):
        return tuple((m["role"], m["content"].strip().lower()) for m in row.prompt_messages)

    assert len({key(r) for r in train}) == len(train)
    assert not {key(r) for r in train} & {key(r) for r in held_out}
    samples, stats = tokenize_rows(train + held_out, tok, max_seq_len=4096)
    assert stats.num_dropped == 0 and len(samples) == len(train) + len(held_out)


def _cross_tokenizer_pairs(samples, seed):
    """Student samples with a kd_mask (a random subset of the targets) and teacher samples of other lengths whose
    loss_mask has as many targets, as kdscale.algorithms.cross_tokenizer.pair_samples makes them."""
    rng = np.random.default_rng(seed)
    students, teachers = [], {}
    for s in samples:
        kd = s.loss_mask & (rng.random(len(s)) < 0.6)
        kd[0] = False
        students.append(TokenizedSample(s.sample_id, s.input_ids, s.loss_mask, kd_mask=kd))
        n = len(s) + int(rng.integers(-3, 6))
        n = max(n, int(kd[1:].sum()) + 1)
        mask = np.zeros(n, dtype=bool)
        mask[1 + rng.choice(n - 1, int(kd[1:].sum()), replace=False)] = True
        ids = (rng.integers(1000, 2000, n) + s.sample_id).astype(np.int32)  # teacher ids, another vocabulary
        teachers[s.sample_id] = TokenizedSample(s.sample_id, ids, mask)
    return students, teachers


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("dp_size,max_tokens", [(1, 256), (2, 96), (3, 64)])
def test_layout_with_teacher_samples_pairs_every_micro_batch(packing, dp_size, max_tokens):
    students, teachers = _cross_tokenizer_pairs(_synthetic_samples(23, seed=dp_size), seed=dp_size)
    layout = build_step_layout(students, dp_size=dp_size, max_tokens_per_micro_batch=max_tokens, pad_token_id=0,
                               packing=packing, teacher_samples=teachers, teacher_pad_token_id=7)  # fmt: skip
    plain = build_step_layout(students, dp_size=dp_size, max_tokens_per_micro_batch=max_tokens, pad_token_id=0,
                              packing=packing)  # fmt: skip
    assert [[mb.sample_ids for mb in shard] for shard in layout.shards] == [
        [mb.sample_ids for mb in shard] for shard in plain.shards]  # the student's layout is unchanged  # fmt: skip
    assert layout.teacher_work is layout.teacher_shards and plain.teacher_work is plain.shards
    for shard, teacher_shard in zip(layout.shards, layout.teacher_shards, strict=True):
        assert len(shard) == len(teacher_shard)
        for student_mb, teacher_mb in zip(shard, teacher_shard):
            assert teacher_mb.sample_ids == student_mb.sample_ids  # same samples, same order
            assert teacher_mb.is_packed == student_mb.is_packed == (packing and bool(student_mb.sample_ids))
            assert teacher_mb.num_loss_tokens == student_mb.num_kd_tokens  # one teacher row per aligned prediction
            assert student_mb.num_kd_tokens <= student_mb.num_loss_tokens
            if student_mb.kd_mask is not None:
                assert not (student_mb.kd_mask & ~student_mb.loss_mask).any()
            real = teacher_mb.attention_mask.bool()
            ids = teacher_mb.input_ids[real].tolist()
            assert ids == [t for i in teacher_mb.sample_ids for t in teachers[i].input_ids.tolist()]
            assert (teacher_mb.input_ids[~real] == 7).all()  # the teacher's own pad id
    assert layout.global_num_kd_tokens == sum(int(s.kd_mask[1:].sum()) for s in students)
    assert layout.global_num_loss_tokens == plain.global_num_loss_tokens


def test_layout_with_teacher_samples_refuses_unpaired_samples():
    students, teachers = _cross_tokenizer_pairs(_synthetic_samples(6, seed=1), seed=1)
    with pytest.raises(ValueError, match=r"no teacher tokenization of sample\(s\) \[2\]"):
        build_step_layout(students, dp_size=1, max_tokens_per_micro_batch=512, pad_token_id=0,
                          teacher_samples={k: v for k, v in teachers.items() if k != 2})  # fmt: skip
    k = next(s.sample_id for s in students if s.kd_mask[1:].any())  # a teacher sample with too few targets
    bad = {**teachers, k: TokenizedSample(k, teachers[k].input_ids, np.zeros(len(teachers[k]), dtype=bool))}
    with pytest.raises(ValueError, match="aligned predictions but the teacher"):
        build_step_layout(students, dp_size=1, max_tokens_per_micro_batch=512, pad_token_id=0, teacher_samples=bad)
    mixed = [students[0], TokenizedSample(1, students[1].input_ids, students[1].loss_mask)]
    with pytest.raises(ValueError, match="either every sample of a micro-batch has a kd_mask"):
        build_step_layout(mixed, dp_size=1, max_tokens_per_micro_batch=512, pad_token_id=0)
