"""`kdscale report`: per-stage figures from a synthetic metrics.jsonl, missing keys, the plot, user errors."""

from __future__ import annotations

import json

import pytest

from kdscale.cli import main
from kdscale.observability.report import percentile, summarize

# Per step (1..5): teacher compute, teacher wait, transfer, student, step seconds; tokens; teacher tokens; bytes.
STEPS = [
    (9.0, 5.0, 1.0, 9.0, 20.0, 100, 100, 4000),  # warm-up: skipped by default
    (3.0, 0.5, 0.1, 2.0, 3.0, 300, 300, 1000),
    (2.0, 1.0, 0.2, 2.0, 4.0, 200, 0, 2000),
    (4.0, 0.0, 0.3, 3.0, 4.0, 400, 400, 3000),
    (3.0, 1.5, 0.4, 3.0, 5.0, 100, 100, 4000),
]


def _train_record(step: int, teacher_s, wait_s, transfer_s, student_s, step_s, tokens, teacher_tokens, nbytes):
    return {
        "step": step,
        "epoch": 0,
        "train/loss": 2.0,
        "train/kd": 2.0,
        "time/step_s": step_s,
        "time/teacher_s": teacher_s,
        "time/teacher_wait_s": wait_s,
        "time/student_s": student_s,
        "time/transfer_s": transfer_s,
        "transfer/bytes": nbytes,
        "train/num_tokens": tokens,
        "train/num_loss_tokens": tokens // 2,
        "teacher/num_tokens": teacher_tokens,
        "teacher/cache_hits": 1 if teacher_tokens == 0 else 0,
        "teacher/resubmitted": 1 if step == 4 else 0,
        "teacher/replicas_alive": 1 if step == 5 else 2,
        "objectstore/inflight_bytes": 1000 * step,
        "throughput/tokens_per_s": tokens / step_s,
        "throughput/teacher_tokens_per_s": teacher_tokens / teacher_s,
        "throughput/student_tokens_per_s": tokens / student_s,
    }


def _write(run_dir, records, extra_lines=()):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run_dir


def _records():
    return (
        [{"step": 0, "eval/kl": 5.0, "eval/loss": 5.0}]
        + [_train_record(i + 1, *row) for i, row in enumerate(STEPS)]
        + [{"step": 5, "eval/kl": 3.5, "eval/loss": 3.5}]
    )


def test_percentile_interpolates_linearly():
    assert percentile([4.0], 90) == 4.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)


def test_summary_numbers_skip_the_warm_up_step():
    s = summarize(_records(), skip_first=1)
    assert (s["num_train_records"], s["num_steps"], s["first_step"], s["last_step"]) == (5, 4, 2, 5)
    assert s["wall_s"] == pytest.approx(16.0)
    assert s["tokens"] == {"train": 1000, "loss": 500, "teacher": 800}
    assert s["tokens_per_s"] == pytest.approx(1000 / 16)

    step = s["stages"]["step"]
    assert step["total_s"] == pytest.approx(16.0) and step["mean_s"] == pytest.approx(4.0)
    assert step["p50_s"] == pytest.approx(4.0) and step["p90_s"] == pytest.approx(4.7)
    assert step["share_of_step"] == pytest.approx(1.0)
    teacher = s["stages"]["teacher_compute"]
    assert teacher["total_s"] == pytest.approx(12.0) and teacher["p50_s"] == pytest.approx(3.0)
    assert teacher["tokens_per_s"] == pytest.approx(800 / 12)  # teacher tokens per summed replica second
    student = s["stages"]["student"]
    assert student["total_s"] == pytest.approx(10.0) and student["share_of_step"] == pytest.approx(10 / 16)
    assert student["tokens_per_s"] == pytest.approx(100.0)
    wait = s["stages"]["teacher_wait"]
    assert wait["mean_s"] == pytest.approx(0.75) and wait["p90_s"] == pytest.approx(1.35)
    assert wait["tokens_per_s"] is None

    assert s["overlap_ratio"] == pytest.approx((12 + 10) / 16)
    assert s["transfer"]["bytes"] == 10000 and s["transfer"]["gb_per_s"] == pytest.approx(10000 / 1e9 / 1.0)
    assert s["teacher"] == {"cache_hits": 1, "resubmitted": 1, "replicas_alive_min": 1, "replicas_alive_max": 2}
    assert s["objectstore"]["inflight_bytes_max"] == 5000
    assert s["eval_kl"] == {"first": 5.0, "first_step": 0, "last": 3.5, "last_step": 5}


def test_skip_first_zero_counts_every_step():
    s = summarize(_records(), skip_first=0)
    assert s["num_steps"] == 5 and s["stages"]["step"]["total_s"] == pytest.approx(36.0)
    assert s["overlap_ratio"] == pytest.approx((21 + 19) / 36)


def test_missing_keys_are_reported_as_na(tmp_path, capsys):
    """A record of the older driver: no teacher compute, teacher tokens, cache or object-store keys."""
    old_keys = ("step", "train/loss", "train/num_tokens", "time/teacher_wait_s", "time/student_s", "time/step_s",
                "time/transfer_s", "transfer/bytes", "throughput/tokens_per_s")  # fmt: skip
    records = [{k: v for k, v in _train_record(i + 1, *row).items() if k in old_keys} for i, row in enumerate(STEPS)]
    run_dir = _write(tmp_path / "old", records)
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    teacher_line = next(line for line in out.splitlines() if line.startswith("teacher compute"))
    assert teacher_line.split()[2:] == ["n/a"] * 6
    assert "overlap (teacher compute + student) / step: n/a" in out
    assert "student" in out and "held-out KL" not in out
    assert (run_dir / "stages.png").stat().st_size > 1000

    s = summarize(records)
    assert s["stages"]["teacher_compute"]["total_s"] is None and s["overlap_ratio"] is None
    assert s["tokens"]["teacher"] is None and s["teacher"]["cache_hits"] is None and s["eval_kl"] is None
    assert s["stages"]["student"]["total_s"] == pytest.approx(10.0)


def test_cli_prints_json_and_writes_the_plot(tmp_path, capsys):
    run_dir = _write(tmp_path / "run", _records(), extra_lines=['{"step": 5, "info": "checkpoint saved"}', ""])
    assert main(["report", str(run_dir), "--json", "--skip-first", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_steps"] == 3 and summary["run_dir"] == str(run_dir)
    assert summary["plot"] == str(run_dir / "stages.png")
    png = (run_dir / "stages.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_cli_text_report(tmp_path, capsys):
    run_dir = _write(tmp_path / "run", _records())
    assert main(["report", str(run_dir), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "4 steps counted (steps 2..5 of 5 train records, first 1 skipped as warm-up)" in out
    assert "overlap (teacher compute + student) / step: 1.38 (> 1: teacher work overlapped" in out
    assert "1 micro-batches from the teacher cache, 1 resubmitted" in out
    assert "5.0000 (step 0) -> 3.5000 (step 5)" in out
    assert not (run_dir / "stages.png").exists()


def test_a_record_still_being_written_is_left_out(tmp_path):
    """A last line without its newline is a record being appended by a running run, not an error."""
    from kdscale.observability.report import read_records

    run_dir = _write(tmp_path / "run", _records())
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "train/loss": 1.')
    assert read_records(run_dir / "metrics.jsonl") == _records()


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("missing_dir", "not found"),
        ("no_metrics", "holds no metrics.jsonl"),
        ("no_train", "no train records"),
        ("malformed", "1 malformed line(s) (line 3:"),
        ("skip_all", "--skip-first 5 leaves none of the 5 train records"),
    ],
)
def test_bad_input_is_one_message_and_exit_2(tmp_path, capsys, setup, expected):
    run_dir = tmp_path / "run"
    argv = ["report", str(run_dir)]
    if setup == "no_metrics":
        run_dir.mkdir()
    elif setup == "no_train":
        _write(run_dir, [{"step": 0, "eval/kl": 5.0}])
    elif setup == "malformed":
        _write(run_dir, _records()[:2], extra_lines=['{"step": 2, "train/loss": 1.'])
    elif setup == "skip_all":
        _write(run_dir, _records())
        argv += ["--skip-first", "5"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("kdscale report: error: ") and expected in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
