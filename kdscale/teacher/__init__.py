"""Teacher engines: token ids in, final-norm hidden states at the prediction positions out.

``build_teacher_engine(name, **kwargs)`` picks an engine by name (``teacher.engine`` in the config); engines are
imported only when built, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from kdscale.teacher.base import TeacherEngine, TeacherOutput

# name -> "module:Class"; add an engine here (its config section lives in kdscale.config.schema).
_ENGINES: dict[str, str] = {
    "hf": "kdscale.teacher.hf:HFTeacherEngine",
}


def available_engines() -> list[str]:
    """Names accepted by :func:`build_teacher_engine`."""
    return sorted(_ENGINES)


def build_teacher_engine(engine: str, **kwargs: Any) -> TeacherEngine:
    """Construct the teacher engine called ``engine`` with its keyword arguments (it is not started)."""
    if engine not in _ENGINES:
        raise ValueError(f"unknown teacher engine {engine!r}; choose one of {available_engines()}")
    module_name, class_name = _ENGINES[engine].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**kwargs)


__all__ = ["TeacherEngine", "TeacherOutput", "available_engines", "build_teacher_engine"]
