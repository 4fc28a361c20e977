"""Packed (padding-free) micro-batches train the FSDP2 student exactly like right-padded ones.

The same samples, laid out padded and packed by ``build_step_layout``, with the same teacher rows per sample, must
give the same loss and the same gradients (fp32, tight tolerance): attention stays within each packed sample, RoPE
restarts per sample, and the rows/labels line up. Single process, gloo world of 1. The helpers here
(:func:`make_samples`, :func:`teacher_rows`, :func:`step_inputs`) are shared with the Megatron packing test.

Also prints (never asserts) how much of the quickstart data's padded layout is padding, and of the packed one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdscale.data import StepLayout, TokenizedSample, build_step_layout

TEACHER_HIDDEN = 48
LOSS = {"divergence": "forward_kl", "kd_ratio": 0.7, "temperature": 1.5, "chunk_size": 7}
LENGTHS = [29, 5, 17, 3, 24, 11, 8, 20, 14]  # different lengths; several samples per micro-batch
MAX_TOKENS = 64  # several micro-batches per step in both layouts
LOSS_TOLERANCE = 1e-6  # measured: <= ~2e-7
GRAD_TOLERANCE = 1e-7  # measured: <= ~5e-9
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- shared helpers


def make_samples(vocab_size: int, pad_token_id: int, lengths=LENGTHS, seed: int = 0) -> list[TokenizedSample]:
    """Samples of the given lengths: random non-pad tokens, a prompt of about a third, then targets."""
    rng = np.random.default_rng(seed)
    samples = []
    for sample_id, length in enumerate(lengths):
        ids = rng.integers(0, vocab_size, size=length).astype(np.int32)
        ids[ids == pad_token_id] = (pad_token_id + 1) % vocab_size
        loss_mask = np.arange(length) >= max(1, length // 3)
        samples.append(TokenizedSample(sample_id, ids, loss_mask))
    return samples


def teacher_rows(samples: list[TokenizedSample], seed: int = 0) -> dict[int, torch.Tensor]:
    """Teacher hidden rows of every sample ([num_loss_tokens, TEACHER_HIDDEN]), whatever its micro-batch."""
    generator = torch.Generator().manual_seed(seed)
    return {s.sample_id: torch.randn(s.num_loss_tokens, TEACHER_HIDDEN, generator=generator) for s in samples}


def step_inputs(layout: StepLayout, rows: dict[int, torch.Tensor], dp_rank: int = 0):
    """(micro-batches, teacher hidden per micro-batch) of one rank: a micro-batch's rows are its samples' rows in
    its sample order (the row convention of kdscale.data.batch, padded or packed)."""
    micro_batches = layout.shards[dp_rank]
    hidden = [
        torch.cat([rows[i] for i in mb.sample_ids]) if mb.sample_ids else torch.zeros(0, TEACHER_HIDDEN)
        for mb in micro_batches
    ]
    return micro_batches, hidden


def layouts(samples: list[TokenizedSample], *, dp_size: int, pad_token_id: int, pad_to_multiple_of: int = 1):
    """The padded and the packed layout of the same samples (same token budget)."""
    kwargs = {
        "dp_size": dp_size,
        "max_tokens_per_micro_batch": MAX_TOKENS,
        "pad_token_id": pad_token_id,
        "pad_to_multiple_of": pad_to_multiple_of,
    }
    return build_step_layout(samples, **kwargs), build_step_layout(samples, **kwargs, packing=True)


# ----------------------------------------------------------------------------- FSDP2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny student, its tokenizer's sizes and a teacher head, in a gloo process group of one."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from tests.fixtures import make_tiny_llama, make_tiny_tokenizer

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    tokenizer = make_tiny_tokenizer()
    path = make_tiny_llama(tmp_path_factory.mktemp("packing") / "student", tokenizer=tokenizer, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    generator = torch.Generator().manual_seed(7)
    teacher_head = torch.randn(len(tokenizer) + 8, TEACHER_HIDDEN, generator=generator) * 0.3
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield {"path": path, "vocab_size": len(tokenizer), "pad": tokenizer.pad_token_id, "teacher_head": teacher_head}
    dist.destroy_process_group()


def _backend(world, **overrides):
    from kdscale.student import build_student_backend

    backend = build_student_backend(
        "fsdp2",
        model_path=str(world["path"]),
        teacher_head=world["teacher_head"],
        vocab_size=world["vocab_size"],
        loss=LOSS,
        lr=3e-3,
        teacher_head_dtype="float32",
        seed=1234,
        **overrides,
    )
    backend.setup()
    return backend


def _loss_and_grads(backend, layout: StepLayout, rows) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and full gradients of the layout's step through the backend's forward call site (no optimizer step)."""
    micro_batches, hidden = step_inputs(layout, rows)
    total = 0.0
    for micro_batch, teacher_hidden in zip(micro_batches, hidden, strict=True):
        loss, _ = backend._forward(micro_batch, teacher_hidden, float(layout.global_num_loss_tokens))
        loss.backward()
        total += loss.item()
    grads = {name: param.grad.full_tensor().clone() for name, param in backend.module.named_parameters()}
    backend.optimizer.zero_grad(set_to_none=True)
    return total, grads


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("pad_to_multiple_of", [1, 8])  # 8: packed rows end with a pad tail
def test_fsdp2_packed_equals_padded(world, attn_implementation, pad_to_multiple_of):
    samples = make_samples(world["vocab_size"], world["pad"])
    rows = teacher_rows(samples)
    padded, packed = layouts(samples, dp_size=1, pad_token_id=world["pad"], pad_to_multiple_of=pad_to_multiple_of)
    assert len(packed.shards[0]) >= 2 and all(mb.is_packed for mb in packed.shards[0])
    assert any(len(mb.sample_ids) >= 3 for mb in packed.shards[0])  # samples of different lengths share a row
    if pad_to_multiple_of > 1:
        assert any(mb.num_tokens < mb.input_ids.numel() for mb in packed.shards[0])
    assert packed.global_num_loss_tokens == padded.global_num_loss_tokens

    backend = _backend(world, attn_implementation=attn_implementation)
    padded_loss, padded_grads = _loss_and_grads(backend, padded, rows)
    packed_loss, packed_grads = _loss_and_grads(backend, packed, rows)
    print(
        f"\n{attn_implementation}, pad_to_multiple_of={pad_to_multiple_of}: |loss diff| "
        f"{abs(packed_loss - padded_loss):.2e}, max |grad diff| "
        f"{max(float((packed_grads[n] - padded_grads[n]).abs().max()) for n in padded_grads):.2e}"
    )
    assert packed_loss == pytest.approx(padded_loss, abs=LOSS_TOLERANCE)
    assert set(packed_grads) == set(padded_grads)
    for name, grad in padded_grads.items():
        assert grad.abs().max() > 0 or "embed" in name, name  # every layer takes part
        torch.testing.assert_close(
            packed_grads[name], grad, rtol=0, atol=GRAD_TOLERANCE, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_fsdp2_packed_train_step_and_evaluate_match_padded(world):
    samples = make_samples(world["vocab_size"], world["pad"], seed=1)
    rows = teacher_rows(samples, seed=1)
    padded, packed = layouts(samples, dp_size=1, pad_token_id=world["pad"])
    results = []
    for layout in (padded, packed):
        backend = _backend(world)
        micro_batches, hidden = step_inputs(layout, rows)
        total = layout.global_num_loss_tokens
        evaluation = backend.evaluate(micro_batches, hidden, global_num_loss_tokens=total)
        metrics = backend.train_step(micro_batches, hidden, global_num_loss_tokens=total).as_dict()
        results.append((evaluation, metrics))
        del backend
    (padded_eval, padded_metrics), (packed_eval, packed_metrics) = results
    for key in ("kl", "loss", "kd", "ce"):
        assert packed_eval[key] == pytest.approx(padded_eval[key], abs=LOSS_TOLERANCE), key
    for key in ("loss", "kd", "ce", "grad_norm"):
        assert packed_metrics[key] == pytest.approx(padded_metrics[key], abs=LOSS_TOLERANCE), key
    for key in ("num_loss_tokens", "num_tokens"):  # real tokens only: the padding is not counted in either
        assert packed_metrics[key] == padded_metrics[key], key


# ----------------------------------------------------------------------------- measurement


@pytest.mark.slow
def test_print_quickstart_padding_fractions(smollm2_cache_dir):
    """Measured, not asserted: the share of padding in the quickstart's micro-batches over one epoch (SmolLM2
    tokenizer, shuffled global batches of 8, max_seq_len 256, 2048 tokens per micro-batch)."""
    from transformers import AutoTokenizer

    from kdscale.checkpoint.hf_io import materialize_hf_dir
    from kdscale.config.load import load_config
    from kdscale.data import StepSampler, read_jsonl, tokenize_rows

    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    tokenizer = AutoTokenizer.from_pretrained(materialize_hf_dir(cfg.teacher.model_path, cache_dir=smollm2_cache_dir))
    rows, _ = read_jsonl(REPO / cfg.data.train_path)
    samples, _ = tokenize_rows(rows, tokenizer, max_seq_len=cfg.data.max_seq_len, truncation=cfg.data.truncation)
    sampler = StepSampler(len(samples), global_batch_size=cfg.data.global_batch_size, seed=cfg.run.seed)
    epoch = [sampler.next_step()[1] for _ in range(sampler.steps_per_epoch)]
    for dp_size in (1, 2):
        totals = {False: [0, 0, 0], True: [0, 0, 0]}  # packing -> [tokens laid out, real tokens, micro-batches]
        for step, indices in enumerate(epoch):
            for packing in (False, True):
                layout = build_step_layout(
                    [samples[i] for i in indices],
                    dp_size=dp_size,
                    max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch,
                    pad_token_id=tokenizer.pad_token_id,
                    packing=packing,
                    step=step,
                )
                micro_batches = [mb for shard in layout.shards for mb in shard]
                totals[packing][0] += sum(mb.input_ids.numel() for mb in micro_batches)
                totals[packing][1] += sum(mb.num_tokens for mb in micro_batches)
                totals[packing][2] += len(micro_batches)
        for packing, (laid_out, real, count) in totals.items():
            print(
                f"\nquickstart train, dp_size={dp_size}, {'packed' if packing else 'padded'}: "
                f"{1 - real / laid_out:.1%} of {laid_out} tokens are padding "
                f"({count} micro-batches over {len(epoch)} steps)"
            )
