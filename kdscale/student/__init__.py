"""Student training backends behind one protocol; :func:`build_student_backend` picks one by name.

Backends are imported lazily, so choosing ``fsdp2`` never imports Megatron (and vice versa).
"""

from __future__ import annotations

import importlib
from typing import Any

from kdscale.student.base import StepMetrics, StudentBackend

# name -> (module, class). Add a backend here; its module is imported only when chosen.
_BACKENDS: dict[str, tuple[str, str]] = {
    "fsdp2": ("kdscale.student.fsdp2.backend", "FSDP2Backend"),
    "megatron": ("kdscale.student.megatron.backend", "MegatronBackend"),
}


def build_student_backend(backend: str, **kwargs: Any) -> StudentBackend:
    """Construct the student backend named ``backend`` with its keyword arguments (call ``setup()`` next)."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown student backend {backend!r}; choose one of {sorted(_BACKENDS)}")
    module_name, class_name = _BACKENDS[backend]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**kwargs)


__all__ = ["StepMetrics", "StudentBackend", "build_student_backend"]
