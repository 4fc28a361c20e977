"""The data plane through the real controller on tiny models: prefetch bounds the object store, a teacher replica
killed mid-run loses and duplicates nothing, a dead student rank stops the run with the last checkpoint named."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from kdscale.cli_errors import RunFailed
from kdscale.config.load import load_config
from kdscale.observability.metrics import read_metrics
from tests.e2e.test_train import _overrides, _write_data


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return _write_data(root / "train.jsonl", 48, 0), _write_data(root / "eval.jsonl", 8, 1)


def _config(tmp_path: Path, tiny_pair, tiny_data, name: str, **extra):
    values = {
        "run.output_dir": str(tmp_path / name), "run.max_steps": 6, "run.save_every": 0, "run.export_hf": False,
        "run.plot": False, "teacher.num_replicas": 2, "teacher.num_threads": 1, "student.num_threads_per_rank": 1,
        "controller.prefetch_steps": 2, "loss.divergence": "forward_kl", "loss.kd_ratio": 1.0,
    }
    values.update(extra)
    return load_config(None, _overrides(tmp_path, tiny_pair, tiny_data, **values))


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


def _ledger(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]


def _kill(handle) -> None:
    import ray

    os.kill(ray.get(handle.pid.remote()), signal.SIGKILL)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_pair, tiny_data, ray_session):
    """An uninterrupted run: the ledger and loss trajectory every faulty run must reproduce."""
    import ray

    from kdscale.controller.driver import train

    tmp_path = tmp_path_factory.mktemp("reference")
    cfg = _config(tmp_path, tiny_pair, tiny_data, "reference")
    pids = []

    def remember_pids(step, view):
        if step == 1:
            pids.extend(ray.get([h.pid.remote() for h in view.student_handles + view.pool.handles()]))

    train(cfg, on_step_end=remember_pids)
    run_dir = Path(cfg.run_dir)
    run_dir.joinpath("actor_pids.json").write_text(json.dumps(pids))
    return run_dir


def test_a_finished_run_leaves_no_actor_process_in_a_shared_cluster(reference_run):
    pids = json.loads((reference_run / "actor_pids.json").read_text())
    assert len(pids) == 4  # 2 student ranks, 2 teacher replicas
    deadline = time.monotonic() + 30
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(pids)


def test_prefetch_bounds_the_object_store_and_accounts_every_stage(reference_run, tiny_pair, tiny_data, tmp_path):
    records = _train_records(reference_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        for key in ("time/teacher_s", "time/teacher_wait_s", "time/student_s", "time/transfer_s", "time/step_s",
                    "transfer/bytes", "teacher/num_tokens", "throughput/teacher_tokens_per_s",
                    "throughput/student_tokens_per_s", "objectstore/inflight_bytes"):
            assert key in r, key
        assert r["time/teacher_s"] > 0 and r["teacher/num_tokens"] == r["train/num_tokens"]
        assert r["teacher/replicas_alive"] == 2 and r["teacher/resubmitted"] == 0
    # The object store never holds more than the prefetched steps plus the current one (plus the held-out set).
    step_bytes = [r["transfer/bytes"] for r in records]  # each shard is read by exactly one rank (FSDP2, DP=2)
    eval_bytes = 8 * 64 * 96 * 4  # an upper bound: 8 held-out samples x 64 tokens x H=96 x float32
    bound = 3 * max(step_bytes) + eval_bytes
    assert max(r["objectstore/inflight_bytes"] for r in records) <= bound
    # With prefetch, later steps' outputs are already waiting when a step starts: the teacher ran ahead.
    assert max(r["objectstore/inflight_bytes"] for r in records[:-2]) > 0
    # The ledger holds every step's 8 samples, none twice within an epoch (46 usable rows: 5 steps an epoch).
    ledger = _ledger(reference_run)
    assert [rec["step"] for rec in ledger] == [1, 2, 3, 4, 5, 6]
    assert [rec["epoch"] for rec in ledger] == [0, 0, 0, 0, 0, 1]
    for epoch in (0, 1):
        trained = [i for rec in ledger if rec["epoch"] == epoch for shard in rec["sample_ids"] for i in shard]
        assert len(trained) == len(set(trained)) == 8 * sum(rec["epoch"] == epoch for rec in ledger)


def test_sequential_run_without_prefetch_trains_the_same(reference_run, tiny_pair, tiny_data, tmp_path):
    from kdscale.controller.driver import train

    cfg = _config(tmp_path, tiny_pair, tiny_data, "sequential", **{"controller.prefetch_steps": 0})
    train(cfg)
    run = Path(cfg.run_dir)
    assert _ledger(run) == _ledger(reference_run)
    for a, b in zip(_train_records(reference_run), _train_records(run)):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)


def test_killed_teacher_replica_is_restarted_and_nothing_is_lost_or_repeated(reference_run, tiny_pair, tiny_data,
                                                                            tmp_path, caplog):
    from kdscale.controller.driver import train

    killed = []

    def kill_replica_0(step, view):
        if step == 2:  # replica 0 holds finished outputs of steps 3-4 and of the held-out set, and queued work
            killed.append(view.pool.handles()[0])
            _kill(view.pool.handles()[0])

    cfg = _config(tmp_path, tiny_pair, tiny_data, "killed")
    train(cfg, on_step_end=kill_replica_0)
    run = Path(cfg.run_dir)
    assert killed
    assert _ledger(run) == _ledger(reference_run)
    records, reference = _train_records(run), _train_records(reference_run)
    for a, b in zip(reference, records):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)
    assert sum(r["teacher/resubmitted"] for r in records) > 0
    assert all(r["teacher/replicas_alive"] == 2 for r in records)  # restarted
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval/kl" in r]
    reference_evals = [r for r in read_metrics(reference_run / "metrics.jsonl") if "eval/kl" in r]
    assert [e["eval/kl"] for e in evals] == pytest.approx([e["eval/kl"] for e in reference_evals], rel=1e-6)


def test_replica_past_its_restarts_is_dropped_and_the_run_goes_on(reference_run, tiny_pair, tiny_data, tmp_path):
    from kdscale.controller.driver import train

    def kill_replica_1(step, view):
        if step == 3:
            _kill(view.pool.handles()[1])

    cfg = _config(tmp_path, tiny_pair, tiny_data, "dropped", **{"controller.max_teacher_restarts": 0})
    train(cfg, on_step_end=kill_replica_1)
    run = Path(cfg.run_dir)
    records = _train_records(run)
    assert _ledger(run) == _ledger(reference_run)
    alive = [r["teacher/replicas_alive"] for r in records]
    # A death is noticed when the dead replica's outputs are needed (here: step 4, 5 or 6, prefetched earlier).
    assert alive[:3] == [2, 2, 2] and alive[-1] == 1 and sorted(alive, reverse=True) == alive
    for a, b in zip(_train_records(reference_run), records):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)


def test_dead_student_rank_stops_the_run_naming_the_last_checkpoint(tiny_pair, tiny_data, tmp_path, ray_session):
    import ray

    from kdscale.controller.driver import train

    pids = []

    def kill_rank_1(step, view):
        if step == 3:
            pids.extend(ray.get([h.pid.remote() for h in view.student_handles + view.pool.handles()]))
            _kill(view.student_handles[1])

    cfg = _config(tmp_path, tiny_pair, tiny_data, "student_dies", **{"run.save_every": 2})
    with pytest.raises(RunFailed) as info:
        train(cfg, on_step_end=kill_rank_1)
    message = str(info.value)
    assert "a student rank died" in message
    assert "step_000002" in message and "resumes from it" in message
    # Nothing of the run is left running in the shared cluster (the surviving rank was blocked in a collective).
    deadline = time.monotonic() + 30
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(pids)


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            out.append(pid)
        except ProcessLookupError:
            pass
    return out


def test_packed_run_trains_like_the_padded_run(reference_run, tiny_pair, tiny_data, tmp_path):
    from kdscale.controller.driver import train

    cfg = _config(tmp_path, tiny_pair, tiny_data, "packed", **{"data.packing": True})
    train(cfg)
    run = Path(cfg.run_dir)
    reference = _ledger(reference_run)
    packed = _ledger(run)
    assert [[sorted(s) for s in r["sample_ids"]] for r in packed] == [[sorted(s) for s in r["sample_ids"]]
                                                                     for r in reference]
    for a, b in zip(_train_records(reference_run), _train_records(run)):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["train/num_tokens"] == a["train/num_tokens"]  # real tokens only, in both layouts


def test_teacher_output_cache_serves_a_rerun_without_the_teacher(reference_run, tiny_pair, tiny_data, tmp_path):
    from kdscale.controller.driver import train

    extra = {"teacher_cache.enabled": True, "teacher_cache.dir": str(tmp_path / "teacher_cache"),
             "teacher.num_replicas": 1}
    first = _config(tmp_path, tiny_pair, tiny_data, "cache_first", **extra)
    train(first)
    second = _config(tmp_path, tiny_pair, tiny_data, "cache_second", **extra)
    train(second)
    cold, warm = _train_records(Path(first.run_dir)), _train_records(Path(second.run_dir))
    assert cold[0]["teacher/num_tokens"] > 0 and cold[0]["teacher/cache_hits"] == 0
    assert all(r["teacher/num_tokens"] == 0 and r["teacher/cache_hits"] > 0 for r in warm)
    for a, b, ref in zip(cold, warm, _train_records(reference_run)):
        assert b["train/loss"] == a["train/loss"]  # the very bits the first run trained on
        assert a["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-6)
    manifests = list((tmp_path / "teacher_cache").glob("*/manifest.json"))
    assert len(manifests) == 1
    assert json.loads(manifests[0].read_text())["transport_dtype"] == "float32"
