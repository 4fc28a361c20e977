"""Per-step metrics: a JSONL file in the run directory (always), one readable console line, a progress bar.

Metric names are namespaced: ``train/loss``, ``train/kd``, ``time/teacher_wait_s``, ``eval/kl``...
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from kdscale.observability.logging import get_logger


def format_step_line(step: int, total: int, m: dict[str, Any]) -> str:
    """``step 12/40 | loss 1.2345 | kd 1.2345 | ce 2.3456 | lr 1.00e-04 | gnorm 0.53 | 1234 tok/s | ...``"""
    parts = [
        f"step {step}/{total}",
        f"loss {m['train/loss']:.4f}",
        f"kd {m['train/kd']:.4f}",
        f"ce {m['train/ce']:.4f}",
        f"lr {m['train/lr']:.2e}",
        f"gnorm {m['train/grad_norm']:.3f}",
        f"{m['throughput/tokens_per_s']:.0f} tok/s",
        f"teacher wait {m['time/teacher_wait_s']:.2f}s",
        f"step {m['time/step_s']:.2f}s",
    ]
    return " | ".join(parts)


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` and prints step lines every ``log_every``."""

    def __init__(self, run_dir: Path, *, total_steps: int, log_every: int, progress_bar: bool, start_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total_steps = total_steps
        self.log_every = log_every
        self.log = get_logger("kdscale.metrics")
        self._bar = None
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after ``step`` (they belong to the interrupted tail); a fresh start
        (``step`` 0) drops everything an earlier, checkpoint-less attempt wrote."""
        if not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` with the wall-clock ``time`` (Unix seconds) at which it was written."""
        with self.path.open("a") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one training step; print its line when due."""
        self.write({"step": step, **metrics})
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)
        if step % self.log_every == 0 or step == self.total_steps:
            self.info(format_step_line(step, self.total_steps, metrics))

    def info(self, message: str) -> None:
        if self._bar is not None:
            self._bar.clear()
        self.log.info(message)
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
