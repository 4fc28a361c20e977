"""``kdscale report RUN_DIR``: where a run's step time went, per stage, from its ``metrics.jsonl``.

Stages (the keys of a train record, see :mod:`kdscale.controller.driver`):

- teacher compute ``time/teacher_s``: the teacher replicas' compute for this step's micro-batches, summed over
  replicas; it may have run during earlier steps, so it is not a slice of this step's wall time.
- teacher wait ``time/teacher_wait_s``: the driver blocked on this step's teacher outputs.
- transfer ``time/transfer_s``: resolving the teacher refs on the student ranks (max over ranks).
- student ``time/student_s``: the train step's compute (max over ranks).
- step ``time/step_s``: the step's wall time in the driver.

Per stage: total, mean, p50 and p90 seconds per step, share of the step time and tokens/s (teacher: teacher
tokens per summed replica second; student and step: train tokens). Also transfer GB and GB/s (bytes summed over
ranks / transfer seconds), the overlap ratio sum(teacher_s + student_s) / sum(step_s) (> 1: teacher work overlapped
the student's), cache hits, resubmissions, and the held-out KL first -> last. A key a run did not record is
reported as ``n/a``; the first ``skip_first`` train records (warm-up) are left out of every figure but the plot.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# (name in the summary, label, metrics key, key of the tokens it processes or None)
STAGES = (
    ("teacher_compute", "teacher compute", "time/teacher_s", "teacher/num_tokens"),
    ("teacher_wait", "teacher wait", "time/teacher_wait_s", None),
    ("transfer", "transfer", "time/transfer_s", None),
    ("student", "student", "time/student_s", "train/num_tokens"),
    ("step", "step", "time/step_s", "train/num_tokens"),
)
NA = "n/a"


class ReportError(ValueError):
    """A run directory the report cannot read (exit code 2 on the command line)."""


@dataclass
class StageStats:
    """Seconds of one stage over the counted steps (None: no counted step recorded it)."""

    key: str
    num_steps: int
    total_s: float | None
    mean_s: float | None
    p50_s: float | None
    p90_s: float | None
    share_of_step: float | None  # stage seconds / step seconds, over the steps that hold both
    tokens_per_s: float | None


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _number(record: dict, key: str) -> float | None:
    """``record[key]`` as a float, or None when it is absent or not a finite number."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _numbers(records: list[dict], key: str) -> list[float]:
    return [v for v in (_number(r, key) for r in records) if v is not None]


def _sum_or_none(records: list[dict], key: str) -> float | None:
    values = _numbers(records, key)
    return sum(values) if values else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def read_records(metrics_path: Path) -> list[dict[str, Any]]:
    """Every JSON object of a metrics.jsonl file; a line that is not one is a :class:`ReportError` (with its number).

    The writer ends every record with a newline, so a last line without one is a record still being written (a
    report on a running run): it is left out, not an error.
    """
    text = Path(metrics_path).read_text()
    lines = text.split("\n")
    if lines and lines[-1].strip():
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines = lines[:-1]
    records, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(f"line {number}: {exc.msg}")
            continue
        if not isinstance(record, dict):
            bad.append(f"line {number}: a JSON {type(record).__name__}, not an object")
            continue
        records.append(record)
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ReportError(
            f"{metrics_path} has {len(bad)} malformed line(s) ({shown}): every line must be one JSON object as "
            "kdscale writes it; remove or repair those lines"
        )
    return records


def _stage(train: list[dict], key: str, tokens_key: str | None) -> StageStats:
    seconds = _numbers(train, key)
    if not seconds:
        return StageStats(key, 0, None, None, None, None, None, None)
    both = [r for r in train if _number(r, key) is not None and _number(r, "time/step_s") is not None]
    share = _ratio(sum(_number(r, key) for r in both), sum(_number(r, "time/step_s") for r in both)) if both else None
    tokens_per_s = None
    if tokens_key is not None:
        paired = [r for r in train if _number(r, key) is not None and _number(r, tokens_key) is not None]
        tokens_per_s = _ratio(sum(_number(r, tokens_key) for r in paired), sum(_number(r, key) for r in paired))
    total = sum(seconds)
    return StageStats(
        key=key,
        num_steps=len(seconds),
        total_s=total,
        mean_s=total / len(seconds),
        p50_s=percentile(seconds, 50),
        p90_s=percentile(seconds, 90),
        share_of_step=share,
        tokens_per_s=tokens_per_s,
    )


def _overlap_ratio(train: list[dict]) -> float | None:
    """sum(teacher_s + student_s) / sum(step_s) over the steps that hold all three (None if none does)."""
    keys = ("time/teacher_s", "time/student_s", "time/step_s")
    rows = [[_number(r, k) for k in keys] for r in train]
    rows = [row for row in rows if None not in row]
    if not rows:
        return None
    return _ratio(sum(t + s for t, s, _ in rows), sum(step for _, _, step in rows))


def summarize(records: list[dict[str, Any]], *, skip_first: int = 1) -> dict[str, Any]:
    """The report of a run's metrics records, as a JSON-ready dict (None where a key was never recorded)."""
    if skip_first < 0:
        raise ReportError(f"--skip-first must be >= 0, got {skip_first}")
    all_train = [r for r in records if "train/loss" in r]
    if not all_train:
        raise ReportError("no train records (records with 'train/loss'): the run has not completed a step yet")
    if skip_first >= len(all_train):
        raise ReportError(
            f"--skip-first {skip_first} leaves none of the {len(all_train)} train records: pass a smaller value "
            f"(at most {len(all_train) - 1})"
        )
    train = all_train[skip_first:]
    steps = [r.get("step") for r in train]
    wall_s = _sum_or_none(train, "time/step_s")
    train_tokens = _sum_or_none(train, "train/num_tokens")
    transfer_bytes = _sum_or_none(train, "transfer/bytes")
    transfer_gb = transfer_bytes / 1e9 if transfer_bytes is not None else None
    transfer_s = _sum_or_none(train, "time/transfer_s")
    alive = _numbers(train, "teacher/replicas_alive")
    inflight = _numbers(train, "objectstore/inflight_bytes")
    evals = [r for r in records if _number(r, "eval/kl") is not None]
    return {
        "num_train_records": len(all_train),
        "skip_first": skip_first,
        "num_steps": len(train),
        "first_step": steps[0],
        "last_step": steps[-1],
        "wall_s": wall_s,
        "tokens": {
            "train": train_tokens,
            "loss": _sum_or_none(train, "train/num_loss_tokens"),
            "teacher": _sum_or_none(train, "teacher/num_tokens"),
        },
        "tokens_per_s": _ratio(train_tokens, wall_s),
        "stages": {name: asdict(_stage(train, key, tokens_key)) for name, _, key, tokens_key in STAGES},
        "transfer": {
            "bytes": transfer_bytes,
            "gb": transfer_gb,
            "gb_per_s": _ratio(transfer_gb, transfer_s),
        },
        "overlap_ratio": _overlap_ratio(train),
        "teacher": {
            "cache_hits": _sum_or_none(train, "teacher/cache_hits"),
            "resubmitted": _sum_or_none(train, "teacher/resubmitted"),
            "replicas_alive_min": min(alive) if alive else None,
            "replicas_alive_max": max(alive) if alive else None,
        },
        "objectstore": {
            "inflight_bytes_mean": sum(inflight) / len(inflight) if inflight else None,
            "inflight_bytes_max": max(inflight) if inflight else None,
        },
        "eval_kl": _eval_kl(evals),
    }


def _eval_kl(evals: list[dict]) -> dict[str, Any] | None:
    """First and last held-out KL with their steps (None without evaluations)."""
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    return {
        "first": first["eval/kl"],
        "first_step": first.get("step"),
        "last": last["eval/kl"],
        "last_step": last.get("step"),
    }


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return NA if value is None else f"{value:{spec}}{suffix}"


def format_report(summary: dict[str, Any], *, title: str = "") -> str:
    """The summary as a few readable lines: totals, the per-stage table, transfer, overlap, teacher, eval."""
    s = summary
    tokens = s["tokens"]
    skipped = f", first {s['skip_first']} skipped as warm-up" if s["skip_first"] else ""
    lines = [
        f"{title}{': ' if title else ''}{s['num_steps']} steps counted (steps {s['first_step']}..{s['last_step']} of "
        f"{s['num_train_records']} train records{skipped})",
        f"tokens: train {_fmt(tokens['train'], ',.0f')}, loss {_fmt(tokens['loss'], ',.0f')}, teacher "
        f"{_fmt(tokens['teacher'], ',.0f')} | step wall {_fmt(s['wall_s'], '.1f', ' s')} | "
        f"{_fmt(s['tokens_per_s'], ',.0f')} train tokens/s",
        "",
        f"{'stage':<16}{'total s':>10}{'mean s/step':>13}{'p50 s':>9}{'p90 s':>9}{'share of step':>15}{'tokens/s':>11}",
    ]
    for name, label, _, tokens_key in STAGES:
        st = s["stages"][name]
        share = None if st["share_of_step"] is None else 100 * st["share_of_step"]
        rate = "-" if tokens_key is None else _fmt(st["tokens_per_s"], ",.0f")
        lines.append(
            f"{label:<16}{_fmt(st['total_s'], '.2f'):>10}{_fmt(st['mean_s'], '.3f'):>13}{_fmt(st['p50_s'], '.3f'):>9}"
            f"{_fmt(st['p90_s'], '.3f'):>9}{_fmt(share, '.1f', '%'):>15}{rate:>11}"
        )
    lines.append("(teacher compute: summed over replicas, may overlap earlier steps; its tokens/s is per replica)")
    transfer = s["transfer"]
    lines.append(
        f"transfer: {_fmt(transfer['gb'], '.3f', ' GB')} at {_fmt(transfer['gb_per_s'], '.3f', ' GB/s')} "
        "(bytes summed over ranks / transfer seconds)"
    )
    overlap = s["overlap_ratio"]
    note = "" if overlap is None else (" (> 1: teacher work overlapped the student's)" if overlap > 1 else "")
    lines.append(f"overlap (teacher compute + student) / step: {_fmt(overlap, '.2f')}{note}")
    teacher = s["teacher"]
    extras = []
    if teacher["cache_hits"]:
        extras.append(f"{teacher['cache_hits']:.0f} micro-batches from the teacher cache")
    if teacher["resubmitted"]:
        extras.append(f"{teacher['resubmitted']:.0f} resubmitted after a replica failure")
    if teacher["replicas_alive_min"] is not None and teacher["replicas_alive_min"] != teacher["replicas_alive_max"]:
        extras.append(f"replicas alive {teacher['replicas_alive_min']:.0f}..{teacher['replicas_alive_max']:.0f}")
    if extras:
        lines.append("teacher: " + ", ".join(extras))
    store = s["objectstore"]
    if store["inflight_bytes_max"] is not None:
        lines.append(
            f"object store at step start: mean {store['inflight_bytes_mean'] / 2**20:.1f} MiB, "
            f"max {store['inflight_bytes_max'] / 2**20:.1f} MiB of teacher outputs"
        )
    kl = s["eval_kl"]
    if kl is not None:
        lines.append(
            f"held-out KL(teacher||student): {kl['first']:.4f} (step {kl['first_step']}) -> {kl['last']:.4f} "
            f"(step {kl['last_step']}) nats/token"
        )
    return "\n".join(lines)


def _metrics_path(run_dir: Path) -> Path:
    if not run_dir.exists():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} not found: pass a kdscale run directory (runs/NAME)")
    metrics = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} holds no metrics.jsonl: pass the run directory of a started kdscale run (runs/NAME)"
        )
    return metrics


def report(run_dir: str | Path, *, skip_first: int = 1, plot: bool = True, as_json: bool = False) -> dict[str, Any]:
    """Summarize ``run_dir/metrics.jsonl`` (``run_dir`` may also be the file), write ``stages.png`` next to it
    when ``plot``, print the report (JSON when ``as_json``) and return the summary."""
    metrics = _metrics_path(Path(run_dir))
    records = read_records(metrics)
    summary = {"run_dir": str(metrics.parent), **summarize(records, skip_first=skip_first), "plot": None}
    if plot:
        from kdscale.observability.plot import plot_stages

        train = [r for r in records if "train/loss" in r]
        out = plot_stages(
            train,
            metrics.parent / "stages.png",
            skip_first=skip_first,
            title=f"kdscale: {metrics.parent.name}, seconds per stage and step",
        )
        summary["plot"] = str(out)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_report(summary, title=str(metrics.parent)))
        if summary["plot"]:
            print(f"plot: {summary['plot']}")
    return summary
