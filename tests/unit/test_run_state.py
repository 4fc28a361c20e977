"""Run-directory bookkeeping: atomic checkpoint directories, pruning, resume points, metrics truncation, plot."""

from __future__ import annotations

import json

import pytest

from kdscale.checkpoint import run_checkpoints as rc
from kdscale.observability.metrics import MetricsWriter, format_step_line, read_metrics
from kdscale.observability.plot import plot_loss_curve


def _save(run, step, keep=2):
    tmp = rc.begin(run, step)
    (tmp / "shard.bin").write_bytes(b"x")
    return rc.commit(run, tmp, step, {"sampler": {"epoch": 0, "step_in_epoch": step}}, keep=keep)


def test_checkpoints_are_renamed_when_complete_and_pruned(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step)
    assert [p.name for p in rc.list_checkpoints(tmp_path)] == ["step_000004", "step_000006"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000006"
    assert rc.read_state(rc.latest_checkpoint(tmp_path)) == {"step": 6, "sampler": {"epoch": 0, "step_in_epoch": 6}}
    # a crash mid-save leaves only a .tmp directory, which is never taken for a checkpoint
    tmp = rc.begin(tmp_path, 8)
    (tmp / "shard.bin").write_bytes(b"half")
    assert rc.latest_checkpoint(tmp_path).name == "step_000006"
    assert not any(p.name.endswith(".tmp") for p in tmp_path.joinpath("checkpoints").iterdir() if p.name != tmp.name)


def test_incomplete_checkpoint_is_refused_with_the_options(tmp_path):
    _save(tmp_path, 2)
    broken = tmp_path / "checkpoints" / "step_000003"
    broken.mkdir()
    with pytest.raises(rc.CheckpointError, match=r"not a complete kdscale checkpoint.*step_000002"):
        rc.read_state(broken)


def test_metrics_truncate_after_resume_point(tmp_path):
    writer = MetricsWriter(tmp_path, total_steps=4, log_every=1, progress_bar=False)
    for step in (1, 2, 3):
        writer.step(step, _metrics(step))
    writer.write({"step": 3, "eval/kl": 1.5})
    writer.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    writer.truncate_after(0)  # a fresh start after a crash before any checkpoint
    assert not (tmp_path / "metrics.jsonl").exists()


def test_step_line_and_plot(tmp_path):
    line = format_step_line(3, 40, _metrics(3))
    assert line.startswith("step 3/40 | loss 3.0000 | kd 2.5000 | ce 4.0000 | lr 1.00e-04")
    assert "teacher wait 0.50s" in line and "tok/s" in line
    records = [{"step": s, **_metrics(s)} for s in (1, 2, 3)] + [{"step": 0, "eval/kl": 5.0}, {"step": 3, "eval/kl": 2.0}]
    out = plot_loss_curve(records, tmp_path / "loss_curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["loss_curve.png"]  # no temporary file left behind
    json.dumps(records)  # metrics stay JSON-serializable


def _metrics(step: int) -> dict:
    return {"train/loss": float(step), "train/kd": step - 0.5, "train/ce": step + 1.0, "train/lr": 1e-4,
            "train/grad_norm": 0.5, "throughput/tokens_per_s": 100.0, "time/teacher_wait_s": 0.5, "time/step_s": 1.0}
