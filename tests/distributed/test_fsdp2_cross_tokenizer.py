"""FSDP2 student with cross-tokenizer distillation on gloo: the aligned-row loss against a full-logit reference,
DP invariance (the DSKD projector's gradient is summed across ranks like the model's), and the projector in the
optimizer and the checkpoint (a DP=2 checkpoint resumes at DP=1 with the same projector and the same next step).

Synthetic data: the student's targets are ``loss_mask``; a random subset of them (``kd_mask``) has an aligned
teacher row. The teacher has its own vocabulary and hidden size; a fixed id map stands for the shared vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.test_fsdp2 import _full_params, _shard, _spawn

pytestmark = pytest.mark.distributed

TEACHER_HIDDEN = 48  # the student's is 64
TEACHER_VOCAB = 200
NUM_SHARED = 90
NUM_MICRO_BATCHES = 4
LOSS = {"divergence": "forward_kl", "kd_ratio": 0.7, "temperature": 1.0, "chunk_size": 7}
BACKEND_KWARGS = {"loss": LOSS, "lr": 3e-3, "grad_clip": 0.0, "warmup_steps": 0, "total_steps": 8,
                  "teacher_head_dtype": "float32", "seed": 99}  # fmt: skip
METHODS = ("shared_vocab", "dskd")


def _shared_ids(vocab_size: int) -> tuple[list[int], list[int]]:
    generator = torch.Generator().manual_seed(5)
    student_ids = torch.randperm(vocab_size - 10, generator=generator)[:NUM_SHARED] + 5
    teacher_ids = torch.randperm(TEACHER_VOCAB, generator=generator)[:NUM_SHARED]
    return student_ids.tolist(), teacher_ids.tolist()


def _step_data(step: int, vocab_size: int, pad_token_id: int):
    """Micro-batches with a kd_mask (a random subset of the targets), teacher rows for the kd rows only."""
    from kdscale.data.batch import MicroBatch

    generator = torch.Generator().manual_seed(500 + step)
    micro_batches, hidden = [], []
    for index in range(NUM_MICRO_BATCHES):
        batch_size, seq_len = 2, 14
        input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
        attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.int64)
        loss_mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
        for row in range(batch_size):
            length = int(torch.randint(seq_len - 5, seq_len + 1, (1,), generator=generator))
            attention_mask[row, :length] = 1
            loss_mask[row, (2 if index < 2 else length // 2) : length] = True
            input_ids[row, length:] = pad_token_id
        kd_mask = loss_mask & (torch.rand(batch_size, seq_len, generator=generator) < 0.6)
        micro_batch = MicroBatch(input_ids, attention_mask, loss_mask, kd_mask=kd_mask)
        micro_batches.append(micro_batch)
        hidden.append(torch.randn(micro_batch.num_kd_tokens, TEACHER_HIDDEN, generator=generator))
    num_loss = sum(mb.num_loss_tokens for mb in micro_batches)
    num_kd = sum(mb.num_kd_tokens for mb in micro_batches)
    return micro_batches, hidden, num_loss, num_kd


class _World:
    def __init__(self, root: Path) -> None:
        from transformers import AutoTokenizer

        self.root = root
        tokenizer = AutoTokenizer.from_pretrained(root / "student")
        self.vocab_size, self.pad_token_id = len(tokenizer), tokenizer.pad_token_id
        self.teacher_head = torch.randn(TEACHER_VOCAB, TEACHER_HIDDEN, generator=torch.Generator().manual_seed(3))
        self.student_ids, self.teacher_ids = _shared_ids(self.vocab_size)

    def cross(self, method: str) -> dict:
        return {"method": method, "projector_ce_weight": 0.5, "student_ids": self.student_ids,
                "teacher_ids": self.teacher_ids}  # fmt: skip

    def backend(self, method: str):
        from kdscale.student import build_student_backend

        backend = build_student_backend(
            "fsdp2", model_path=str(self.root / "student"), teacher_head=self.teacher_head,
            vocab_size=self.vocab_size, cross_tokenizer=self.cross(method), **BACKEND_KWARGS,
        )  # fmt: skip
        backend.setup()
        return backend

    def data(self, step: int, dp_rank: int, dp_size: int):
        micro_batches, hidden, num_loss, num_kd = _step_data(step, self.vocab_size, self.pad_token_id)
        return _shard(micro_batches, dp_rank, dp_size), _shard(hidden, dp_rank, dp_size), num_loss, num_kd

    def train(self, backend, steps) -> list[dict]:
        out = []
        for step in steps:
            micro_batches, hidden, num_loss, num_kd = self.data(step, backend.dp_rank, backend.dp_size)
            metrics = backend.train_step(micro_batches, hidden, global_num_loss_tokens=num_loss,
                                         global_num_kd_tokens=num_kd)  # fmt: skip
            out.append(metrics.as_dict())
        return out

    def evaluate(self, backend, step: int) -> dict:
        micro_batches, hidden, num_loss, num_kd = self.data(step, backend.dp_rank, backend.dp_size)
        return backend.evaluate(micro_batches, hidden, global_num_loss_tokens=num_loss, global_num_kd_tokens=num_kd)


def _dp2_group(rank: int, world_size: int, root: str) -> None:
    import torch.distributed as dist

    world = _World(Path(root))
    results: dict = {}
    for method in METHODS:
        backend = world.backend(method)
        results[f"{method}_init"] = _full_params(backend)
        checkpoint = Path(root) / f"ckpt_{method}"
        if rank == 0:
            checkpoint.mkdir()
        dist.barrier()
        metrics = world.train(backend, [1, 2])
        backend.save(str(checkpoint))
        results[f"{method}_params_step2"] = _full_params(backend)
        metrics += world.train(backend, [3])
        results[f"{method}_metrics"] = metrics
        results[f"{method}_params_step3"] = _full_params(backend)
        results[f"{method}_eval"] = world.evaluate(backend, 4)
        results["eval_counts"] = world.data(4, 0, 1)[2:]
        del backend
    if rank == 0:
        torch.save(results, Path(root) / "results_dp2.pt")


def _reference_step1_loss(world: _World) -> float:
    """shared_vocab, step 1 from the initial weights: full logits, log_softmax over the shared ids on both sides."""
    from transformers import AutoModelForCausalLM

    from kdscale.data.batch import gather_labels, gather_prediction_rows

    model = AutoModelForCausalLM.from_pretrained(world.root / "student", dtype=torch.float32,
                                                 attn_implementation="eager")  # fmt: skip
    micro_batches, hidden, num_loss, num_kd = world.data(1, 0, 1)
    kd_sum = ce_sum = 0.0
    with torch.no_grad():
        for micro_batch, rows in zip(micro_batches, hidden):
            logits = model(input_ids=micro_batch.input_ids, attention_mask=micro_batch.attention_mask).logits
            student = gather_prediction_rows(logits, micro_batch.kd_mask)[:, world.student_ids].log_softmax(-1)
            teacher = (rows @ world.teacher_head[world.teacher_ids].T).log_softmax(-1)
            kd_sum += float((teacher.exp() * (teacher - student)).sum())
            all_logits = gather_prediction_rows(logits, micro_batch.loss_mask)[:, : world.vocab_size]
            labels = gather_labels(micro_batch.input_ids, micro_batch.loss_mask)
            ce_sum += float(torch.nn.functional.cross_entropy(all_logits, labels, reduction="sum"))
    return LOSS["kd_ratio"] * kd_sum / num_kd + (1 - LOSS["kd_ratio"]) * ce_sum / num_loss


def _dp1_group(rank: int, world_size: int, root: str) -> None:
    world = _World(Path(root))
    results: dict = {"reference_step1_loss": _reference_step1_loss(world)}
    for method in METHODS:
        backend = world.backend(method)
        results[f"{method}_metrics"] = world.train(backend, [1, 2, 3])
        results[f"{method}_params_step3"] = _full_params(backend)
        del backend
        resumed = world.backend(method)  # the DP=2 checkpoint of step 2, at DP=1
        resumed.load(str(Path(root) / f"ckpt_{method}"))
        results[f"{method}_resumed_params"] = _full_params(resumed)
        results[f"{method}_resumed_metrics"] = world.train(resumed, [3])
        del resumed
    backend = world.backend("shared_vocab")
    micro_batches, hidden, num_loss, _ = world.data(1, 0, 1)
    try:
        backend.train_step(micro_batches, hidden, global_num_loss_tokens=num_loss)
    except ValueError as error:
        results["missing_kd_tokens_error"] = str(error)
    torch.save(results, Path(root) / "results_dp1.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.fixtures import make_tiny_llama, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("fsdp2_cross")
    tokenizer = make_tiny_tokenizer()
    make_tiny_llama(root / "student", tokenizer=tokenizer, vocab_size=len(tokenizer) + 4, seed=11)
    _spawn(_dp2_group, 2, str(root))
    _spawn(_dp1_group, 1, str(root))
    return torch.load(root / "results_dp2.pt"), torch.load(root / "results_dp1.pt")


def test_shared_vocab_step_matches_full_logit_reference(results):
    dp2, dp1 = results
    assert dp1["shared_vocab_metrics"][0]["loss"] == pytest.approx(dp1["reference_step1_loss"], rel=1e-5)
    assert dp2["shared_vocab_metrics"][0]["loss"] == pytest.approx(dp1["reference_step1_loss"], rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_dp2_matches_dp1(results, method):
    dp2, dp1 = results
    for a, b in zip(dp2[f"{method}_metrics"], dp1[f"{method}_metrics"]):
        for key in ("loss", "kd", "ce", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for name, value in dp1[f"{method}_params_step3"].items():
        torch.testing.assert_close(dp2[f"{method}_params_step3"][name], value, rtol=1e-4, atol=1e-5)


def test_dskd_projector_is_trained_and_checkpointed(results):
    dp2, dp1 = results
    names = [name for name in dp2["dskd_init"] if "projector" in name]
    assert names == ["projector.weight"], names
    assert dp2["dskd_init"]["projector.weight"].shape == (64, TEACHER_HIDDEN)
    assert not any("projector" in name for name in dp2["shared_vocab_init"])
    moved = (dp2["dskd_params_step3"]["projector.weight"] - dp2["dskd_init"]["projector.weight"]).abs().max()
    assert moved > 1e-4  # the projector CE term trains it
    # Resumed at DP=1 from the DP=2 checkpoint of step 2: the same projector, and the same step 3.
    torch.testing.assert_close(dp1["dskd_resumed_params"]["projector.weight"],
                               dp2["dskd_params_step2"]["projector.weight"])  # fmt: skip
    for key in ("loss", "kd", "ce"):
        assert dp1["dskd_resumed_metrics"][0][key] == pytest.approx(dp2["dskd_metrics"][2][key], rel=1e-4), key


@pytest.mark.parametrize("method", METHODS)
def test_evaluate_reports_aligned_kl(results, method):
    dp2, _ = results
    evaluation = dp2[f"{method}_eval"]
    num_loss, num_kd = dp2["eval_counts"]
    assert evaluation["num_kd_tokens"] == num_kd and evaluation["num_loss_tokens"] == num_loss
    assert 0 < num_kd < num_loss
    assert evaluation["kl"] > 0 and evaluation["ce"] > 0


def test_missing_kd_token_count_is_a_clear_error(results):
    _, dp1 = results
    assert "global_num_kd_tokens" in dp1["missing_kd_tokens_error"]
