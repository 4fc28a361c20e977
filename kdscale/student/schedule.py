"""Learning-rate schedule shared by the student backends: linear warmup, then cosine decay to a floor.

The schedule is a multiplier of the peak learning rate, for ``torch.optim.lr_scheduler.LambdaLR``. It is a plain
closure (not a callable object), so ``LambdaLR.state_dict()`` stores only ``last_epoch`` and the learning rates:
the schedule itself is rebuilt from the configuration on resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine_lambda(*, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based: the step about to run).

    - ``step < warmup_steps``: linear warmup ``(step + 1) / warmup_steps`` (the first step already trains).
    - then cosine decay from 1 to ``min_lr_ratio`` over the remaining ``total_steps - warmup_steps`` steps,
      and ``min_lr_ratio`` after ``total_steps``.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    decay_steps = max(1, total_steps - warmup_steps)

    def lr_lambda(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return lr_lambda
