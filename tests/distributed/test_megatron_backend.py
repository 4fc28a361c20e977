"""Megatron student backend on gloo: layout, input checks, evaluate, exact resume, resharded resume, HF export,
the distributed optimizer's resume (same layout, TP2, and a clear error across optimizer types), PP2 x VPP2,
bf16 at TP2 and activation recomputation.

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
TP2 = {"tensor_parallel_size": 2, "pipeline_parallel_size": 1}
PP2_VPP2 = {"tensor_parallel_size": 1, "pipeline_parallel_size": 2, "virtual_pipeline_parallel_size": 2}
DISTRIBUTED_OPTIMIZER = {"use_distributed_optimizer": True}
SHORT_STEPS = range(1, 4)
SAME_BATCH_STEPS = [1, 1, 1, 1]  # one batch four times: the loss must go down


def _fresh(world: World, layout: dict, model: str = "untied", **overrides):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return world.backend("megatron", model, "forward_kl", layout, **overrides)


def _losses(metrics: list[dict]) -> list[float]:
    return [m["loss"] for m in metrics]


def _extra_layouts(rank: int, root: str, world: World, tp1_ckpt: Path) -> dict:
    """Distributed-optimizer resume, PP2 x VPP2, bf16 and recomputation at TP2 (same spawned group)."""
    import torch.distributed as dist

    results: dict = {}
    ckpt = Path(root) / "ckpt_distopt"
    if rank == 0:
        ckpt.mkdir()
    dist.barrier()
    backend = _fresh(world, TP1_DP2, **DISTRIBUTED_OPTIMIZER)
    metrics = world.train(backend, range(1, SAVE_AT_STEP + 1))
    backend.save(str(ckpt))
    results["distopt_metrics"] = metrics + world.train(backend, range(SAVE_AT_STEP + 1, NUM_STEPS + 1))
    del backend
    resumed = _fresh(world, TP1_DP2, **DISTRIBUTED_OPTIMIZER)
    resumed.load(str(ckpt))
    results["distopt_resumed_step"] = resumed.step
    results["distopt_resumed_metrics"] = world.train(resumed, range(SAVE_AT_STEP + 1, NUM_STEPS + 1))
    # A checkpoint of the non-distributed optimizer cannot feed the distributed one (and vice versa).
    try:
        resumed.load(str(tp1_ckpt))
    except ValueError as error:
        results["cross_optimizer_error"] = str(error)
    del resumed
    resharded = _fresh(world, TP2, **DISTRIBUTED_OPTIMIZER)
    resharded.load(str(ckpt))
    results["distopt_tp2_metrics"] = world.train(resharded, range(SAVE_AT_STEP + 1, NUM_STEPS + 1))
    del resharded
    plain = _fresh(world, TP2)
    try:
        plain.load(str(ckpt))
    except ValueError as error:
        results["cross_optimizer_error_reverse"] = str(error)
    del plain

    # PP2 x VPP2 on a 4-layer student (4 micro-batches per step >= PP) vs TP1 x DP2.
    results["deep_dp2"] = _losses(world.train(_fresh(world, TP1_DP2, "deep"), SHORT_STEPS))
    results["deep_pp2_vpp2"] = _losses(world.train(_fresh(world, PP2_VPP2, "deep"), SHORT_STEPS))

    # TP2: fp32, bf16, fp32 with full activation recomputation.
    results["tp2_fp32"] = _losses(world.train(_fresh(world, TP2), SAME_BATCH_STEPS))
    results["tp2_bf16"] = _losses(world.train(_fresh(world, TP2, mixed_precision="bf16"), SAME_BATCH_STEPS))
    recompute = _fresh(world, TP2, recompute_activations=True)
    results["tp2_recompute"] = _losses(world.train(recompute, SAME_BATCH_STEPS))
    results["recompute_config"] = (recompute.config.recompute_granularity, recompute.config.recompute_method)
    return results


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
    results.update(_extra_layouts(rank, root, world, ckpt))

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
    make_tiny_llama(root / "deep", tokenizer=tokenizer, vocab_size=vocab, num_layers=4, seed=3)
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


def test_distributed_optimizer_resume_same_layout_is_exact(results):
    assert results[0]["distopt_resumed_step"] == SAVE_AT_STEP
    reference = results[0]["distopt_metrics"][SAVE_AT_STEP:]
    for got, want in zip(results[0]["distopt_resumed_metrics"], reference, strict=True):
        for key in ("loss", "kd", "ce", "grad_norm", "lr"):
            assert abs(got[key] - want[key]) <= 1e-7, (key, got[key], want[key])
    # The distributed optimizer trains like the plain one.
    for got, want in zip(results[0]["distopt_metrics"], results[0]["metrics"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_distributed_optimizer_resume_at_tp2_continues(results):
    reference = results[0]["distopt_metrics"][SAVE_AT_STEP:]
    for got, want in zip(results[0]["distopt_tp2_metrics"], reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        assert got["lr"] == pytest.approx(want["lr"])


def test_loading_across_optimizer_types_raises_clear_error(results):
    forward = results[0]["cross_optimizer_error"]
    assert "use_distributed_optimizer=False but this backend has use_distributed_optimizer=True" in forward
    assert "same optimizer type" in forward
    reverse = results[1]["cross_optimizer_error_reverse"]
    assert "use_distributed_optimizer=True but this backend has use_distributed_optimizer=False" in reverse


def test_pp2_vpp2_matches_dp2(results):
    assert results[0]["deep_pp2_vpp2"] == pytest.approx(results[0]["deep_dp2"], rel=1e-5)


def test_bf16_at_tp2_is_close_to_fp32(results):
    bf16, fp32 = results[0]["tp2_bf16"], results[0]["tp2_fp32"]
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16[-1] < bf16[0] and fp32[-1] < fp32[0]  # the same batch four times


def test_recompute_activations_changes_nothing(results):
    assert results[0]["recompute_config"] == ("full", "uniform")
    assert results[0]["tp2_recompute"] == pytest.approx(results[0]["tp2_fp32"], rel=1e-6)


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
