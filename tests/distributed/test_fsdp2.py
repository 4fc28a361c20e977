"""FSDP2 student backend on gloo: DP invariance, exact resume, resharding, HF export, tied heads, AC, bf16.

Spawning a process group costs ~10 s of imports per process, so two spawned groups (DP=2, then DP=1) run every
check once, in a module-scoped fixture, and write their results to files; the tests below only compare them.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

NUM_STEPS = 5
SAVE_AT_STEP = 2
NUM_MICRO_BATCHES = 4  # per global batch; DP=2 splits them 2 + 2 with uneven token counts
TEACHER_HIDDEN = 48  # the student's hidden size is 64
TEACHER_VOCAB_PAD = 8
STUDENT_VOCAB_PAD = 12
EMPTY_STEP = NUM_STEPS + 1  # a step whose second half of micro-batches has empty loss masks
BACKEND_KWARGS = {
    "loss": {"divergence": "forward_kl", "kd_ratio": 0.7, "temperature": 1.5, "chunk_size": 7},
    "lr": 3e-3,
    "weight_decay": 0.01,
    "betas": (0.9, 0.95),
    "grad_clip": 0.5,  # below the step-1 gradient norm (~0.55): clipping is exercised
    "warmup_steps": 2,
    "total_steps": 8,
    "min_lr_ratio": 0.1,
    "teacher_head_dtype": "float32",
    "seed": 1234,
}


# ----------------------------------------------------------------------------- spawning


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, world_size: int, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)


# ----------------------------------------------------------------------------- data


def _make_step_data(step: int, vocab_size: int, pad_token_id: int):
    """The global batch of optimizer step ``step`` (1-based): micro-batches and read-only bf16 teacher hidden."""
    from kdscale.data.batch import MicroBatch
    from kdscale.teacher.base import TeacherOutput

    generator = torch.Generator().manual_seed(1000 + step)
    micro_batches, hidden = [], []
    batch_size, seq_len = 2, 16
    for index in range(NUM_MICRO_BATCHES):
        input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
        attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.int64)
        loss_mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
        for row in range(batch_size):
            length = int(torch.randint(seq_len - 6, seq_len + 1, (1,), generator=generator))
            # The first two micro-batches (rank 0 at DP=2) get longer responses: uneven tokens per rank.
            prompt = 2 if index < 2 else length // 2 + 1
            attention_mask[row, :length] = 1
            # Step EMPTY_STEP: rank 1's micro-batches (DP=2) have no loss tokens at all.
            loss_mask[row, prompt:length] = not (step == EMPTY_STEP and index >= 2)
            input_ids[row, length:] = pad_token_id
        micro_batch = MicroBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask)
        rows = torch.randn(micro_batch.num_loss_tokens, TEACHER_HIDDEN, generator=generator)
        output = TeacherOutput.from_tensor(rows, "bfloat16")
        output.array.setflags(write=False)  # as from the Ray object store
        micro_batches.append(micro_batch)
        hidden.append(output.as_tensor())
    global_num_loss_tokens = sum(mb.num_loss_tokens for mb in micro_batches)
    return micro_batches, hidden, global_num_loss_tokens


def _shard(items: list, dp_rank: int, dp_size: int) -> list:
    per_rank = len(items) // dp_size
    return items[dp_rank * per_rank : (dp_rank + 1) * per_rank]


class _World:
    """Models and teacher head of one spawned group (rebuilt identically in every process)."""

    def __init__(self, root: Path) -> None:
        from transformers import AutoTokenizer

        self.root = root
        self.student_path = root / "student"
        self.tied_path = root / "student_tied"
        tokenizer = AutoTokenizer.from_pretrained(self.student_path)
        self.vocab_size = len(tokenizer)
        self.pad_token_id = tokenizer.pad_token_id
        generator = torch.Generator().manual_seed(7)
        self.teacher_head = torch.randn(self.vocab_size + TEACHER_VOCAB_PAD, TEACHER_HIDDEN, generator=generator) * 0.3

    def data(self, step: int, dp_rank: int, dp_size: int):
        micro_batches, hidden, total = _make_step_data(step, self.vocab_size, self.pad_token_id)
        return _shard(micro_batches, dp_rank, dp_size), _shard(hidden, dp_rank, dp_size), total

    def backend(self, model_path: Path | None = None, **overrides):
        from kdscale.student import build_student_backend

        kwargs = {**BACKEND_KWARGS, **overrides}
        backend = build_student_backend(
            "fsdp2",
            model_path=str(model_path or self.student_path),
            teacher_head=self.teacher_head,
            vocab_size=self.vocab_size,
            **kwargs,
        )
        backend.setup()
        return backend

    def train(self, backend, steps) -> list[dict]:
        metrics = []
        for step in steps:
            micro_batches, hidden, total = self.data(step, backend.dp_rank, backend.dp_size)
            metrics.append(backend.train_step(micro_batches, hidden, global_num_loss_tokens=total).as_dict())
        return metrics


def _clean_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def _full_gradients(backend, world: _World, step: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and full (unsharded) gradients of step ``step``'s global batch, without an optimizer step."""
    micro_batches, hidden, total = world.data(step, backend.dp_rank, backend.dp_size)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    for micro_batch, rows in zip(micro_batches, hidden):
        loss, _ = backend.module(
            micro_batch.input_ids,
            micro_batch.attention_mask,
            micro_batch.loss_mask,
            rows,
            backend.teacher_head,
            float(total),
        )
        loss.backward()
        loss_sum += loss.detach().double()
    torch.distributed.all_reduce(loss_sum)
    grads = {_clean_name(name): param.grad.full_tensor() for name, param in backend.module.named_parameters()}
    backend.optimizer.zero_grad(set_to_none=True)
    return float(loss_sum), grads


def _full_params(backend) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {name: tensor.clone() for name, tensor in get_model_state_dict(backend.module, options=options).items()}


def _backend_logits(backend, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of the backend's (sharded) model through the plain HF forward (collective)."""
    backend.module.unshard()
    with torch.no_grad():
        logits = backend.module.model(input_ids=input_ids, attention_mask=attention_mask).logits
    backend.module.reshard()
    return logits


def _export_logits_error(backend, world: _World, path: Path) -> float:
    """Max |logits| difference between the exported HF directory (loaded by transformers) and the backend."""
    from transformers import AutoModelForCausalLM

    micro_batch = world.data(1, 0, 1)[0][0]
    logits = _backend_logits(backend, micro_batch.input_ids, micro_batch.attention_mask)
    backend.export_hf(str(path))
    error = 0.0
    if backend.dp_rank == 0:
        exported = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            reference = exported(input_ids=micro_batch.input_ids, attention_mask=micro_batch.attention_mask).logits
        error = float((reference - logits).abs().max())
        assert (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    return error


# ----------------------------------------------------------------------------- spawned groups


def _dp2_group(rank: int, world_size: int, root: str) -> None:
    import torch.distributed as dist

    world = _World(Path(root))
    results: dict = {}

    # Uninterrupted run: gradients of step 1, then 5 steps with a checkpoint after step 2, an evaluation on
    # step 4's batch before training on it, and the parameters after step 3.
    backend = world.backend()
    results["layout"] = backend.layout()
    # Rank 1 alone gets teacher rows that do not match: every rank raises, none hangs.
    micro_batches, hidden, total = world.data(1, rank, world_size)
    bad_hidden = [rows[1:] for rows in hidden] if rank == 1 else hidden
    try:
        backend.train_step(micro_batches, bad_hidden, global_num_loss_tokens=total)
    except RuntimeError as error:
        results["rank1_error_seen_on_rank0"] = str(error)
    results["grad_loss"], results["grads"] = _full_gradients(backend, world, step=1)
    checkpoint_dir = Path(root) / "ckpt_dp2"
    if rank == 0:
        checkpoint_dir.mkdir()
    dist.barrier()
    metrics = world.train(backend, range(1, SAVE_AT_STEP + 1))
    backend.save(str(checkpoint_dir))
    metrics += world.train(backend, [3])
    results["params_step3"] = _full_params(backend)
    micro_batches, hidden, total = world.data(4, backend.dp_rank, backend.dp_size)
    results["eval_step4"] = backend.evaluate(micro_batches, hidden, global_num_loss_tokens=total)
    results["eval_step4_again"] = backend.evaluate(micro_batches, hidden, global_num_loss_tokens=total)
    metrics += world.train(backend, range(4, NUM_STEPS + 1))
    results["metrics"] = metrics
    results["export_error"] = _export_logits_error(backend, world, Path(root) / "export")
    results["export_error_again"] = _export_logits_error(backend, world, Path(root) / "export")  # replaces it
    del backend

    # Resume from the DP=2 checkpoint at DP=2.
    resumed = world.backend()
    resumed.load(str(checkpoint_dir))
    results["resumed_step"] = resumed.step
    results["resumed_metrics"] = world.train(resumed, range(SAVE_AT_STEP + 1, NUM_STEPS + 1))
    results["empty_metrics"] = world.train(resumed, [EMPTY_STEP])
    del resumed

    # Activation checkpointing: same loss and gradients.
    checkpointed = world.backend(activation_checkpointing=True)
    results["ac_grad_loss"], results["ac_grads"] = _full_gradients(checkpointed, world, step=1)
    results["ac_metrics"] = world.train(checkpointed, [1, 2])
    del checkpointed

    # bf16 mixed precision: runs, finite, close.
    mixed = world.backend(mixed_precision="bf16")
    results["bf16_metrics"] = world.train(mixed, [1, 2])
    del mixed

    # Tied embeddings: gradients of the shared weight, steps, export.
    tied = world.backend(model_path=world.tied_path)
    results["tied_grad_loss"], results["tied_grads"] = _full_gradients(tied, world, step=1)
    results["tied_metrics"] = world.train(tied, [1, 2])
    results["tied_export_error"] = _export_logits_error(tied, world, Path(root) / "export_tied")
    del tied

    if rank == 0:
        torch.save(results, Path(root) / "results_dp2.pt")


def _dp1_group(rank: int, world_size: int, root: str) -> None:
    from transformers import AutoModelForCausalLM

    from kdscale.data.batch import gather_labels, gather_prediction_rows
    from kdscale.losses import naive_distill_loss

    world = _World(Path(root))
    results: dict = {}

    backend = world.backend()
    results["layout"] = backend.layout()
    micro_batches, hidden, total = world.data(1, 0, 1)
    errors = {}
    for name, bad_hidden, bad_total in (
        ("rows", [rows[1:] for rows in hidden], total),
        ("total", hidden, total + 1),
        ("count", hidden[:-1], total),
    ):
        try:
            backend.train_step(micro_batches, bad_hidden, global_num_loss_tokens=bad_total)
        except (RuntimeError, ValueError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
    results["errors"] = errors
    results["grad_loss"], results["grads"] = _full_gradients(backend, world, step=1)
    results["metrics"] = world.train(backend, range(1, 4))
    results["params_step3"] = _full_params(backend)
    del backend

    # Reference without FSDP: the plain HF model, full logits, naive loss, one global batch.
    for name, path in (("plain", world.student_path), ("plain_tied", world.tied_path)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        micro_batches, hidden, total = world.data(1, 0, 1)
        loss_sum = 0.0
        for micro_batch, rows in zip(micro_batches, hidden):
            logits = model(input_ids=micro_batch.input_ids, attention_mask=micro_batch.attention_mask).logits
            out = naive_distill_loss(
                gather_prediction_rows(logits, micro_batch.loss_mask),
                rows.float() @ world.teacher_head.T,
                gather_labels(micro_batch.input_ids, micro_batch.loss_mask),
                vocab_size=world.vocab_size,
                normalizer=float(total),
                **{k: v for k, v in BACKEND_KWARGS["loss"].items() if k != "chunk_size"},
            )
            out.loss.backward()
            loss_sum += float(out.loss)
        results[f"{name}_loss"] = loss_sum
        results[f"{name}_grads"] = {
            "model." + param_name: param.grad.clone() for param_name, param in model.named_parameters()
        }

    # Reshard: the DP=2 checkpoint of step 2 loads at DP=1 and continues.
    resharded = world.backend()
    resharded.load(str(Path(root) / "ckpt_dp2"))
    results["resharded_step"] = resharded.step
    results["resharded_metrics"] = world.train(resharded, range(SAVE_AT_STEP + 1, NUM_STEPS + 1))
    results["empty_metrics"] = world.train(resharded, [EMPTY_STEP])

    torch.save(results, Path(root) / "results_dp1.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.fixtures import make_tiny_llama, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("fsdp2")
    tokenizer = make_tiny_tokenizer()
    vocab = len(tokenizer) + STUDENT_VOCAB_PAD
    make_tiny_llama(root / "student", tokenizer=tokenizer, vocab_size=vocab, seed=1)
    make_tiny_llama(root / "student_tied", tokenizer=tokenizer, vocab_size=vocab, tie_word_embeddings=True, seed=2)
    _spawn(_dp2_group, 2, str(root))
    _spawn(_dp1_group, 1, str(root))
    return torch.load(root / "results_dp2.pt"), torch.load(root / "results_dp1.pt")


# ----------------------------------------------------------------------------- checks


def _assert_grads_close(actual: dict, expected: dict, atol: float) -> None:
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_layout(results):
    dp2, dp1 = results
    assert dp2["layout"] == {0: [0], 1: [1]}
    assert dp1["layout"] == {0: [0]}


def test_dp1_matches_plain_model_with_naive_loss(results):
    _, dp1 = results
    assert abs(dp1["grad_loss"] - dp1["plain_loss"]) < 1e-6
    _assert_grads_close(dp1["grads"], dp1["plain_grads"], atol=1e-6)


def test_dp2_matches_dp1_loss_grads_and_params(results):
    dp2, dp1 = results
    assert abs(dp2["grad_loss"] - dp1["grad_loss"]) < 1e-6
    _assert_grads_close(dp2["grads"], dp1["grads"], atol=1e-6)
    for m2, m1 in zip(dp2["metrics"][:3], dp1["metrics"]):
        for key in ("loss", "kd", "ce", "grad_norm", "lr"):
            assert abs(m2[key] - m1[key]) < 1e-6, (key, m2[key], m1[key])
        assert m2["num_loss_tokens"] == m1["num_loss_tokens"] and m2["num_tokens"] == m1["num_tokens"]
    # Adam's m / sqrt(v) turns ulp-level gradient differences (a different reduction order) on near-zero
    # gradients into differences of ~1e-6 after a few steps of lr 3e-3: compare parameters at 1e-5.
    _assert_grads_close(dp2["params_step3"], dp1["params_step3"], atol=1e-5)
    assert dp1["metrics"][0]["loss"] == pytest.approx(dp1["grad_loss"], abs=1e-6)


def test_metrics_and_schedule(results):
    dp2, _ = results
    metrics = dp2["metrics"]
    assert len(metrics) == NUM_STEPS
    lrs = [m["lr"] for m in metrics]
    assert lrs[0] == pytest.approx(BACKEND_KWARGS["lr"] / 2) and lrs[1] == pytest.approx(BACKEND_KWARGS["lr"])
    assert lrs[2] > lrs[3] > lrs[4] > BACKEND_KWARGS["lr"] * BACKEND_KWARGS["min_lr_ratio"]
    for m in metrics:
        assert m["loss"] == pytest.approx(0.7 * m["kd"] + 0.3 * m["ce"])
        assert m["grad_norm"] > 0 and m["seconds"] > 0


def test_evaluate_matches_train_loss_and_changes_nothing(results):
    dp2, _ = results
    evaluation = dp2["eval_step4"]
    assert evaluation == dp2["eval_step4_again"]
    step4 = dp2["metrics"][3]
    assert evaluation["num_loss_tokens"] == step4["num_loss_tokens"]
    for key in ("loss", "kd", "ce"):
        assert evaluation[key] == pytest.approx(step4[key], abs=1e-6)
    assert evaluation["kl"] > 0


def test_resume_is_exact_and_reshards(results):
    dp2, dp1 = results
    uninterrupted = dp2["metrics"][SAVE_AT_STEP:]
    assert dp2["resumed_step"] == SAVE_AT_STEP and dp1["resharded_step"] == SAVE_AT_STEP
    for resumed, expected in zip(dp2["resumed_metrics"], uninterrupted, strict=True):
        for key in ("loss", "kd", "ce", "grad_norm", "lr"):
            assert abs(resumed[key] - expected[key]) <= 1e-7, (key, resumed[key], expected[key])
    for resharded, expected in zip(dp1["resharded_metrics"], uninterrupted, strict=True):
        assert abs(resharded["loss"] - expected["loss"]) < 1e-5
        assert resharded["lr"] == pytest.approx(expected["lr"])


def test_rank_without_loss_tokens(results):
    dp2, dp1 = results
    (on_dp2,), (on_dp1,) = dp2["empty_metrics"], dp1["empty_metrics"]
    assert on_dp2["num_loss_tokens"] == on_dp1["num_loss_tokens"] > 0
    for key in ("loss", "grad_norm"):
        assert abs(on_dp2[key] - on_dp1[key]) < 1e-5, (key, on_dp2[key], on_dp1[key])


def test_export_hf_logits_match(results):
    dp2, _ = results
    assert dp2["export_error"] < 1e-5
    assert dp2["export_error_again"] < 1e-5


def test_activation_checkpointing_same_loss_and_grads(results):
    dp2, _ = results
    assert dp2["ac_grad_loss"] == pytest.approx(dp2["grad_loss"], abs=1e-7)
    _assert_grads_close(dp2["ac_grads"], dp2["grads"], atol=1e-7)
    for ac, plain in zip(dp2["ac_metrics"], dp2["metrics"][:2]):
        assert ac["loss"] == pytest.approx(plain["loss"], abs=1e-6)


def test_bf16_mixed_precision_runs_close(results):
    dp2, _ = results
    for mixed, plain in zip(dp2["bf16_metrics"], dp2["metrics"][:2]):
        assert torch.isfinite(torch.tensor(mixed["loss"]))
        assert mixed["loss"] == pytest.approx(plain["loss"], rel=3e-2)


def test_tied_embeddings(results):
    dp2, dp1 = results
    assert abs(dp2["tied_grad_loss"] - dp1["plain_tied_loss"]) < 1e-6
    _assert_grads_close(dp2["tied_grads"], dp1["plain_tied_grads"], atol=1e-6)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in dp2["tied_metrics"])
    assert dp2["tied_export_error"] < 1e-5


def test_input_errors_are_clear(results):
    dp2, dp1 = results
    assert "rank(s) [1] got invalid step inputs" in dp2["rank1_error_seen_on_rank0"]
    errors = dp1["errors"]
    assert errors["rows"].startswith("RuntimeError") and "rows but the micro-batch has" in errors["rows"]
    assert errors["total"].startswith("ValueError") and "global_num_loss_tokens" in errors["total"]
    assert errors["count"].startswith("ValueError") and "one teacher output per micro-batch" in errors["count"]


def test_constructor_validates_options():
    from kdscale.student.fsdp2.backend import FSDP2Backend

    head = torch.zeros(10, 4)
    with pytest.raises(ValueError, match="unknown loss options"):
        FSDP2Backend(model_path="x", teacher_head=head, vocab_size=8, loss={"divergnce": "forward_kl"})
    with pytest.raises(ValueError, match="mixed_precision"):
        FSDP2Backend(model_path="x", teacher_head=head, vocab_size=8, mixed_precision="fp16")
    with pytest.raises(ValueError, match="vocab_size"):
        FSDP2Backend(model_path="x", teacher_head=head, vocab_size=11)
    with pytest.raises(ValueError, match="warmup_steps"):
        FSDP2Backend(model_path="x", teacher_head=head, vocab_size=8, warmup_steps=5, total_steps=2)


def test_factory_rejects_unknown_backend():
    from kdscale.student import build_student_backend

    with pytest.raises(ValueError, match="fsdp2"):
        build_student_backend("deepspeed")
