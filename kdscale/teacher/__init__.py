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
    "sglang": "kdscale.teacher.sglang_engine:SGLangTeacherEngine",
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


def engine_kwargs(
    teacher: Any, *, model_dir: str, transport_dtype: str, device: str, num_threads: int | None = None,
    seed: int = 0, sleep_between_steps: bool = False,
) -> dict[str, Any]:
    """Keyword arguments of :func:`build_teacher_engine` for the ``teacher`` config section.

    ``model_dir`` is the prepared HF directory (a GGUF already converted), ``device`` the resolved device
    ("cpu"/"cuda"), ``sleep_between_steps`` the resolved sleep setting (sglang: enables its memory saver).
    """
    kwargs: dict[str, Any] = {
        "model_path": str(model_dir), "dtype": teacher.dtype, "transport_dtype": transport_dtype, "device": device,
    }
    if teacher.engine == "hf":
        kwargs.update(attn_implementation=teacher.attn_implementation,
                      max_tokens_per_forward=teacher.max_tokens_per_forward)
    elif teacher.engine == "sglang":
        kwargs.update(
            tp_size=teacher.tp_size, dp_size=teacher.dp_size, ep_size=teacher.ep_size,
            mem_fraction_static=teacher.mem_fraction_static, quantization=teacher.quantization,
            kv_cache_dtype=teacher.kv_cache_dtype, engine_args=dict(teacher.engine_args),
            enable_memory_saver=sleep_between_steps and device == "cuda", num_threads=num_threads,
            startup_timeout_s=teacher.startup_timeout_s, request_timeout_s=teacher.request_timeout_s, seed=seed,
        )
    return kwargs


def numerics_settings(teacher: Any) -> dict[str, Any]:
    """The teacher settings that change its hidden states (part of the teacher-output cache's fingerprint)."""
    if teacher.engine == "hf":
        return {"dtype": teacher.dtype, "attn_implementation": teacher.attn_implementation}
    return {"dtype": teacher.dtype, "tp_size": teacher.tp_size, "ep_size": teacher.ep_size,
            "quantization": teacher.quantization, "kv_cache_dtype": teacher.kv_cache_dtype,
            "engine_args": dict(sorted(teacher.engine_args.items()))}


__all__ = ["TeacherEngine", "TeacherOutput", "available_engines", "build_teacher_engine", "engine_kwargs",
           "numerics_settings"]
