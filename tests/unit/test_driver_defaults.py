"""Defaults the driver derives from the config: prefetch depth and torch threads per actor."""

from __future__ import annotations

import pytest

from kdscale.config.load import load_config
from kdscale.controller import driver

BASE = ["teacher.engine=hf", "teacher.model_path=t", "student.backend=fsdp2", "student.model_path=s",
        "data.train_path=d.jsonl"]


@pytest.mark.parametrize(
    "overrides, cores, prefetch, teacher_threads, student_threads",
    [
        ([], 2, 0, 2, 2),  # CPU: one after the other, each side takes every core
        (["student.num_ranks=2"], 8, 0, 8, 4),
        (["controller.prefetch_steps=2"], 2, 2, 1, 1),  # overlapped: an equal share each
        (["controller.prefetch_steps=2", "teacher.num_replicas=2", "student.num_ranks=2"], 16, 2, 4, 4),
        (["student.device=cuda"], 16, 2, 8, 8),  # a GPU side: prefetch by default
    ],
)
def test_prefetch_and_thread_defaults(monkeypatch, overrides, cores, prefetch, teacher_threads, student_threads):
    monkeypatch.setattr(driver.os, "cpu_count", lambda: cores)
    cfg = load_config(None, BASE + overrides)
    assert driver._prefetch_steps(cfg) == prefetch
    assert driver._default_threads(cfg, "teacher") == teacher_threads
    assert driver._default_threads(cfg, "student") == student_threads
