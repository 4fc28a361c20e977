"""The central claim: distillation from teacher HIDDEN STATES (sent through the channel, teacher logits recomputed
with the teacher's output head read from its checkpoint, chunked loss) gives the same loss and the same student
gradients as distillation fed the teacher's FULL LOGITS, for every divergence, with temperature, prompt masking,
right padding and differently padded vocabularies (fp32)."""

from __future__ import annotations

import pytest
import torch

from kdscale.checkpoint.hf_io import read_output_head
from kdscale.data import make_micro_batch, rows_from_records, tokenize_rows
from kdscale.data.batch import gather_labels, gather_prediction_rows, prediction_mask
from kdscale.losses import DIVERGENCES, chunked_distill_loss, naive_distill_loss
from kdscale.teacher.base import TeacherOutput
from kdscale.teacher.hf import HFTeacherEngine
from kdscale.transport.channel import InProcessChannel

RECORDS = [
    {"prompt": "What is two plus two?", "response": "Two plus two is four."},
    {"prompt": "Name a primary colour.", "response": "Red is a primary colour, and so is blue."},
    {"messages": [{"role": "user", "content": "Explain gravity in one sentence."},
                  {"role": "assistant", "content": "Gravity pulls masses toward each other."}]},
]
LOSS = {"temperature": 2.0, "kd_ratio": 0.7, "jsd_beta": 0.3, "skew_lambda": 0.2, "adaptive_alpha": 0.6}


@pytest.fixture(scope="module")
def setup(tiny_pair, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    teacher_dir, student_dir = tiny_pair
    rows, _ = rows_from_records(RECORDS, source="inline")
    samples, _ = tokenize_rows(rows, tiny_tokenizer, max_seq_len=64)
    micro_batch = make_micro_batch(samples, pad_token_id=tiny_tokenizer.pad_token_id)
    assert micro_batch.attention_mask.min() == 0  # right padding is exercised
    assert (~micro_batch.loss_mask & micro_batch.attention_mask.bool()).any()  # and prompt masking

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=micro_batch.input_ids, attention_mask=micro_batch.attention_mask).logits
    full_teacher_logits = gather_prediction_rows(teacher_logits, micro_batch.loss_mask)

    engine = HFTeacherEngine(model_path=teacher_dir, transport_dtype="float32", attn_implementation="eager")
    engine.start()
    channel = InProcessChannel()
    teacher_hidden = channel.get([channel.put(engine.forward(micro_batch))])[0]
    teacher_head = read_output_head(teacher_dir)  # just the head tensor, from the safetensors files
    assert teacher_head.shape[0] == len(tiny_tokenizer) + 12  # padded teacher vocabulary
    student = AutoModelForCausalLM.from_pretrained(student_dir, attn_implementation="eager")
    assert student.lm_head.weight.shape[0] == len(tiny_tokenizer) + 4  # differently padded student vocabulary
    return micro_batch, full_teacher_logits, teacher_hidden, teacher_head, student, len(tiny_tokenizer)


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_hidden_state_path_equals_full_logit_distillation(setup, divergence):
    micro_batch, full_teacher_logits, teacher_hidden, teacher_head, student, vocab_size = setup
    labels = gather_labels(micro_batch.input_ids, micro_batch.loss_mask)
    n = int(prediction_mask(micro_batch.loss_mask).sum())
    assert teacher_hidden.shape[0] == n == full_teacher_logits.shape[0]

    # Reference: the student's full logits against the teacher's full logits.
    logits = student(input_ids=micro_batch.input_ids, attention_mask=micro_batch.attention_mask).logits
    ref = naive_distill_loss(gather_prediction_rows(logits, micro_batch.loss_mask), full_teacher_logits, labels,
                             vocab_size=vocab_size, divergence=divergence, **LOSS)
    ref.loss.backward()
    ref_grads = _grads(student)

    # kdscale: the student's hidden rows and head, the teacher's hidden rows and head, chunked.
    hidden = student.model(input_ids=micro_batch.input_ids, attention_mask=micro_batch.attention_mask)[0]
    out = chunked_distill_loss(gather_prediction_rows(hidden, micro_batch.loss_mask), student.lm_head.weight,
                               teacher_hidden, teacher_head, labels, vocab_size=vocab_size, divergence=divergence,
                               chunk_size=7, **LOSS)
    out.loss.backward()
    grads = _grads(student)

    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-6)
    assert out.kd_sum == pytest.approx(ref.kd_sum, rel=1e-5, abs=1e-6)
    assert out.ce_sum == pytest.approx(ref.ce_sum, rel=1e-5, abs=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_bf16_transport_stays_close(setup):
    """bf16 transport (the default) rounds the hidden states only: the loss moves by bf16 rounding, no more."""
    micro_batch, full_teacher_logits, teacher_hidden, teacher_head, student, vocab_size = setup
    labels = gather_labels(micro_batch.input_ids, micro_batch.loss_mask)
    bf16 = TeacherOutput.from_tensor(teacher_hidden, "bfloat16").as_tensor()
    with torch.no_grad():
        hidden = gather_prediction_rows(student.model(input_ids=micro_batch.input_ids,
                                                      attention_mask=micro_batch.attention_mask)[0],
                                        micro_batch.loss_mask)
        exact = chunked_distill_loss(hidden, student.lm_head.weight, teacher_hidden, teacher_head, labels,
                                     vocab_size=vocab_size).loss.item()
        rounded = chunked_distill_loss(hidden, student.lm_head.weight, bf16, teacher_head, labels,
                                       vocab_size=vocab_size).loss.item()
    assert rounded == pytest.approx(exact, rel=1e-2)
