"""Megatron student backend on gloo: layout, input checks, evaluate, exact resume, resharded resume, HF export.

One 2-rank spawned group runs everything (Megatron's parallel state is re-initialized between layouts) and
returns its results; the tests only compare them. Loss trajectories vs FSDP2 are in test_backend_conformance.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from tests.distributed.megatron_utils import run_spawned  # noqa: E402
from tests.distributed.test_backend_conformance import STUDENT_VOCAB_PAD, World  # noqa: E402

pytestmark = pytest.mark.distributed

NUM_STEPS = 5
SAVE_AT_STEP = 2
TP1_DP2 = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1}
PP2 = {"tensor_parallel_size": 1, "pipeline_parallel_size": 2}


def _fresh(world: World, layout: dict, **overrides):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return world.backend("megatron", "untied", "forward_kl", layout, **overrides)


def _group(rank: int, root: str) -> dict:
    import torch.distributed as dist

    world = World(Path(root))
    results: dict = {}
    backend = _fresh(world, TP1_DP2)
    results["layout"] = backend.layout()
    results["consumes"] = backend.consumes_teacher_outputs
    micro_batches, hidden, total = world.data(1, backend.dp_rank, backend.dp_size)
    try:
        backend.train_step(
            micro_batches, [rows[1:] for rows in hidden] if rank == 1 else hidden, global_num_loss_tokens=total
        )
    except (RuntimeError, ValueError) as error:
        results["bad_rows_error"] = f"{type(error).__name__}: {error}"
    try:
        backend.train_step(micro_batches, hidden, global_num_loss_tokens=total + 1)
    except ValueError as error:
        results["bad_total_error"] = str(error)

    ckpt = Path(root) / "ckpt_tp1_dp2"
    if rank == 0:
        ckpt.mkdir()
    dist.barrier()
    metrics = world.train(backend, range(1, SAVE_AT_STEP + 1))
    backend.save(str(ckpt))
    metrics += world.train(backend, [3])
    micro_batches, hidden, total = world.data(4, backend.dp_rank, backend.dp_size)
    results["eval4"] = backend.evaluate(micro_batches, hidden, global_num_loss_tokens=total)
    results["eval4_again"] = backend.evaluate(micro_batches, hidden, global_num_loss_tokens=total)
    metrics += world.train(backend, range(4, NUM_STEPS + 1))
    results["metrics"] = metrics
    micro_batches, hidden, total = world.data(NUM_STEPS + 1, backend.dp_rank, backend.dp_size)
    results["eval_final"] = backend.evaluate(micro_batches, hidden, global_num_loss_tokens=total)
    backend.export_hf(str(Path(root) / "export"))
    del backend

    resumed = _fresh(world, TP1_DP2)
    resumed.load(str(ckpt))
    results["resumed_step"] = resumed.step
    results["resumed_metrics"] = world.train(resumed, range(SAVE_AT_STEP + 1, NUM_STEPS + 1))
    del resumed

    resharded = _fresh(world, PP2)
    resharded.load(str(ckpt))
    results["pp2_layout"] = resharded.layout()
    results["pp2_consumes"] = resharded.consumes_teacher_outputs
    results["resharded_metrics"] = world.train(resharded, range(SAVE_AT_STEP + 1, NUM_STEPS + 1))
    del resharded

    # The exported HF directory is the trained student: a backend built from it evaluates the same.
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    from kdscale.student import build_student_backend

    exported = build_student_backend(
        "megatron",
        model_path=str(Path(root) / "export"),
        teacher_head=world.teacher_head,
        vocab_size=world.vocab_size,
        loss={"divergence": "forward_kl", "kd_ratio": 0.7, "temperature": 1.5, "chunk_size": 7},
        teacher_head_dtype="float32",
        **TP1_DP2,
    )
    exported.setup()
    micro_batches, hidden, total = world.data(NUM_STEPS + 1, exported.dp_rank, exported.dp_size)
    results["eval_exported"] = exported.evaluate(micro_batches, hidden, global_num_loss_tokens=total)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.fixtures import make_tiny_llama, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("megatron_backend")
    tokenizer = make_tiny_tokenizer()
    vocab = len(tokenizer) + STUDENT_VOCAB_PAD
    make_tiny_llama(root / "untied", tokenizer=tokenizer, vocab_size=vocab, seed=1)
    return run_spawned(_group, 2, args=(str(root),), timeout_s=600)


def test_layout_and_consumers(results):
    assert results[0]["layout"] == {0: [0], 1: [1]}
    assert results[0]["consumes"] and results[1]["consumes"]
    # PP=2: one DP shard, consumed by the last stage only.
    assert results[0]["pp2_layout"] == {0: [1]}
    assert not results[0]["pp2_consumes"] and results[1]["pp2_consumes"]


def test_input_errors_raise_on_every_rank(results):
    assert "rows but the micro-batch has" in results[1]["bad_rows_error"]
    assert "rank(s) [1] got invalid step inputs" in results[0]["bad_rows_error"]
    assert "global_num_loss_tokens" in results[0]["bad_total_error"]


def test_metrics_identical_on_ranks_and_schedule(results):
    def without_time(metrics):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]

    assert without_time(results[0]["metrics"]) == without_time(results[1]["metrics"])
    lrs = [m["lr"] for m in results[0]["metrics"]]
    assert lrs[0] == pytest.approx(3e-3 / 2) and lrs[1] == pytest.approx(3e-3)


def test_evaluate_matches_train_loss_and_changes_nothing(results):
    evaluation, step4 = results[0]["eval4"], results[0]["metrics"][3]
    assert evaluation == results[0]["eval4_again"]
    for key in ("loss", "kd", "ce"):
        assert evaluation[key] == pytest.approx(step4[key], abs=1e-6)
    assert evaluation["kl"] > 0 and evaluation["num_loss_tokens"] == step4["num_loss_tokens"]


def test_resume_same_layout_is_exact(results):
    assert results[0]["resumed_step"] == SAVE_AT_STEP
    for got, want in zip(results[0]["resumed_metrics"], results[0]["metrics"][SAVE_AT_STEP:], strict=True):
        for key in ("loss", "kd", "ce", "grad_norm", "lr"):
            assert abs(got[key] - want[key]) <= 1e-7, (key, got[key], want[key])


def test_resume_at_pp2_continues(results):
    for got, want in zip(results[0]["resharded_metrics"], results[0]["metrics"][SAVE_AT_STEP:], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["lr"] == pytest.approx(want["lr"])


def test_export_hf_round_trip(results):
    for key in ("loss", "kd", "ce", "kl"):
        assert results[0]["eval_exported"][key] == pytest.approx(results[0]["eval_final"][key], rel=1e-6)


def test_constructor_validates_options():
    from kdscale.student.megatron.backend import MegatronBackend

    head = torch.zeros(10, 4)
    with pytest.raises(ValueError, match="unknown loss options"):
        MegatronBackend(model_path="x", teacher_head=head, vocab_size=8, loss={"divergnce": "forward_kl"})
    with pytest.raises(ValueError, match="virtual_pipeline_parallel_size"):
        MegatronBackend(model_path="x", teacher_head=head, vocab_size=8, virtual_pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="vocab_size"):
        MegatronBackend(model_path="x", teacher_head=head, vocab_size=11)
