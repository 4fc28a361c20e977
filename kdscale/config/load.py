"""Load a run config: YAML file + ``a.b=c`` overrides -> validated ``KDConfig``, or one ``ConfigError`` listing
every problem (with "did you mean" for misspelt keys)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kdscale.config.schema import KDConfig

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A user error in the configuration; ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the config {source}:\n{lines}")


# Keys that belong to another backend's section: say which, instead of a generic list.
_KEY_HINTS = {
    ("MegatronStudentConfig", "num_ranks"): "the megatron backend sets data_parallel_size "
    "(world size = tensor_parallel_size x pipeline_parallel_size x data_parallel_size)",
    ("MegatronStudentConfig", "activation_checkpointing"): "the megatron backend calls it recompute_activations",
    ("MegatronStudentConfig", "attn_implementation"): "the megatron backend runs Megatron's own attention",
    **{
        ("FSDP2StudentConfig", key): "tensor/pipeline parallelism needs student.backend=megatron"
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "virtual_pipeline_parallel_size")
    },
}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=3e-4'`` -> (['optim', 'lr'], 3e-4). The value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError("overrides", [f"override {text!r} is not of the form key.subkey=value"])
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError("overrides", [f"override {text!r} has an empty key part"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        value = float(value)  # YAML 1.1 reads '3e-4' as a string
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each dotted key in the nested dict (creating sections as needed)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError("overrides", [f"override {text!r}: '{part}' is a value, not a section"])
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> KDConfig:
    """Read ``path`` (YAML), apply overrides, validate. Raises ConfigError with every problem found."""
    raw: dict = {}
    source = str(path) if path is not None else "<overrides>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(source, [f"config file {str(path)!r} does not exist (see configs/ for examples)"])
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
        if not isinstance(raw, dict):
            raise ConfigError(source, ["the top level must be a mapping of sections (run, teacher, student, ...)"])
    raw = apply_overrides(raw, overrides or [])
    try:
        return KDConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, format_validation_errors(exc, raw)) from None


def _section_model(root: type[BaseModel], loc: tuple, raw: dict) -> tuple[type[BaseModel] | None, list[str]]:
    """Walk ``loc`` (with discriminator tags) from ``root``; return the model owning the last key and the
    dotted path without tags."""
    model: type[BaseModel] | None = root
    names: list[str] = []
    node: Any = raw
    for part in loc[:-1]:
        if model is None:
            break
        field = model.model_fields.get(str(part))
        if field is None:
            # a discriminator tag ('hf', 'fsdp2'): the union member whose tag matches
            continue
        names.append(str(part))
        node = node.get(part, {}) if isinstance(node, dict) else {}
        model = _resolve_model(field.annotation, node)
    names.append(str(loc[-1]))
    return model, names


def _resolve_model(annotation: Any, node: Any) -> type[BaseModel] | None:
    from typing import get_args

    candidates = [annotation, *get_args(annotation)]
    for arg in list(candidates):
        candidates.extend(get_args(arg))
    models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    for model in models:
        for name in ("engine", "backend"):
            field = model.model_fields.get(name)
            if field is not None and isinstance(node, dict) and node.get(name) in get_args(field.annotation):
                return model
    return models[0] if models else None


def format_validation_errors(exc: ValidationError, raw: dict) -> list[str]:
    """One readable line per pydantic error, naming the dotted key, the value and the fix."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        model, names = _section_model(KDConfig, loc, raw) if loc else (None, [])
        kind = err["type"]
        if names and model is not None and kind != "extra_forbidden" and names[-1] not in model.model_fields:
            names = names[:-1]  # the last loc part is a discriminator tag, not a key
        key = ".".join(names) or "<top level>"
        if kind == "extra_forbidden":
            options = sorted(model.model_fields) if model else []
            close = difflib.get_close_matches(str(loc[-1]), options, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(options)}"
            hint = _KEY_HINTS.get((model.__name__ if model else "", str(loc[-1])), hint)
            problems.append(f"{key}: unknown key; {hint}")
        elif kind == "missing":
            problems.append(f"{key}: required, but missing")
        elif kind == "union_tag_invalid":
            ctx = err.get("ctx", {})
            tag = ctx.get("tag")
            expected = ctx.get("expected_tags", "")
            options = [t.strip(" '") for t in expected.split(",")]
            close = difflib.get_close_matches(str(tag), options, n=1)
            hint = f" did you mean '{close[0]}'?" if close else ""
            field = ctx.get("discriminator", "").strip("'")
            problems.append(f"{key}.{field}: {tag!r} is not one of {expected}.{hint}")
        elif kind == "union_tag_not_found":
            field = err.get("ctx", {}).get("discriminator", "").strip("'")
            problems.append(f"{key}.{field}: required, names the section's schema")
        else:
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            problems.append(f"{key}: {err['msg']}{shown}")
    return problems


def dump_config(cfg: KDConfig) -> str:
    """The resolved config as YAML (every default filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
