"""The PNGs of a run (matplotlib, Agg backend, no display needed): the loss curve written at the end of a run, and
the per-step stage timings written by ``kdscale report``."""

from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_atomically(fig, out_path: Path) -> Path:
    """Write ``fig`` to ``out_path`` through a temporary file in the same directory, then close it."""
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp)
    finally:
        _pyplot().close(fig)
    tmp.replace(out_path)
    return out_path


def plot_loss_curve(records: list[dict], out_path: Path, *, title: str = "") -> Path:
    """Plot train/loss and train/kd per step, and eval/kl points; write atomically to ``out_path``."""
    plt = _pyplot()
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/kl" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["train/loss"] for r in train], label="train loss", lw=1.2)
        if any(r["train/kd"] != r["train/loss"] for r in train):
            ax.plot(steps, [r["train/kd"] for r in train], label="train divergence", lw=1.0, alpha=0.8)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval/kl"] for r in evals], "o--", label="held-out KL(teacher||student)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_title(title or "kdscale distillation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save_atomically(fig, out_path)


# (metrics key, label, colour) of the stages drawn as stacked bars: the driver's critical path within a step.
_STACKED_STAGES = (
    ("time/teacher_wait_s", "teacher wait", "tab:orange"),
    ("time/transfer_s", "transfer", "tab:green"),
    ("time/student_s", "student", "tab:blue"),
)
_THROUGHPUTS = (
    ("throughput/tokens_per_s", "train (step)", "black"),
    ("throughput/student_tokens_per_s", "student", "tab:blue"),
    ("throughput/teacher_tokens_per_s", "teacher", "tab:red"),
)


def _series(train: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records that hold a number under ``key``."""
    points = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_stages(train: list[dict], out_path: Path, *, skip_first: int = 0, title: str = "") -> Path:
    """Per-step stage seconds of the train records ``train`` (top) and tokens/s (bottom); write to ``out_path``.

    Top: teacher wait + transfer + student as stacked bars (what the driver waited for, in order), the step's wall
    time as a line, and the teacher replicas' compute seconds as a dashed line (that work may have run earlier,
    overlapped with previous steps, so it is not stacked). The first ``skip_first`` steps (warm-up) are shaded.
    Series whose key is missing are left out.
    """
    plt = _pyplot()
    fig, (ax_time, ax_rate) = plt.subplots(
        2, 1, figsize=(10, 6), dpi=110, sharex=True, gridspec_kw={"height_ratios": (3, 2)}
    )
    bottoms: dict = {}
    for key, label, colour in _STACKED_STAGES:
        steps, values = _series(train, key)
        if not steps:
            continue
        base = [bottoms.get(s, 0.0) for s in steps]
        ax_time.bar(steps, values, bottom=base, width=0.8, label=label, color=colour, alpha=0.8)
        for s, v, b in zip(steps, values, base):
            bottoms[s] = b + v
    steps, values = _series(train, "time/step_s")
    if steps:
        ax_time.plot(steps, values, "k-", lw=1.2, label="step (wall)")
    steps, values = _series(train, "time/teacher_s")
    if steps:
        ax_time.plot(steps, values, "--", color="tab:red", lw=1.2, label="teacher compute")
    ax_time.set_ylabel("seconds")
    ax_time.set_title(title or "kdscale: seconds per stage and step")

    for key, label, colour in _THROUGHPUTS:
        steps, values = _series(train, key)
        if steps:
            ax_rate.plot(steps, values, lw=1.2, color=colour, label=label)
    ax_rate.set_ylabel("tokens/s")
    ax_rate.set_xlabel("step")

    warmup = [r["step"] for r in train[:skip_first] if "step" in r]
    for ax in (ax_time, ax_rate):
        if warmup:
            ax.axvspan(min(warmup) - 0.5, max(warmup) + 0.5, color="0.85", zorder=0, label="warm-up (skipped)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save_atomically(fig, out_path)
