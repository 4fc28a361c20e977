"""The loss-curve PNG written at the end of a run (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path


def plot_loss_curve(records: list[dict], out_path: Path, *, title: str = "") -> Path:
    """Plot train/loss and train/kd per step, and eval/kl points; write atomically to ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
