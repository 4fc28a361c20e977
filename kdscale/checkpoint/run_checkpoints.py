"""Checkpoint directories of a run: ``<run>/checkpoints/step_000020/`` written atomically, plus ``latest``.

A checkpoint is written into ``step_XXXXXX.tmp`` (the backend's shards, then ``trainer_state.json`` with the step,
the data position and the run's fingerprint) and renamed to ``step_XXXXXX`` only when complete, so a crash never
leaves a checkpoint that looks whole. ``latest`` names the newest complete one; older ones beyond ``keep`` are
removed after the new one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, incomplete, or from another run)."""


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def begin(run_dir: Path, step: int) -> Path:
    """Create (afresh) the temporary directory for the checkpoint of ``step``; returns it."""
    tmp = checkpoints_root(run_dir) / f"{step_dir_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(run_dir: Path, tmp: Path, step: int, state: dict[str, Any], *, keep: int) -> Path:
    """Write the trainer state into ``tmp``, rename it to its final name, point ``latest`` at it, prune."""
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
    final = checkpoints_root(run_dir) / step_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    latest_tmp = checkpoints_root(run_dir) / f".latest.tmp-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    latest_tmp.replace(checkpoints_root(run_dir) / "latest")
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint directory; CheckpointError if it is not a complete checkpoint."""
    checkpoint = Path(checkpoint)
    state_file = checkpoint / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(
            f"{checkpoint} is not a complete kdscale checkpoint (no {STATE_FILE}); "
            f"pick one of {[p.name for p in list_checkpoints(checkpoint.parent.parent)] or 'none found'} "
            "or set run.resume=never"
        )
    return json.loads(state_file.read_text())
