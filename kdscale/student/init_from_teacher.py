"""Derive a student from a subset of the teacher's decoder layers (same architecture, tokenizer and head).

Design:
- The student keeps the teacher's embedding, final norm and output head and the decoder layers listed in
  ``layers`` (sorted, unique teacher indices); teacher layer ``layers[j]`` becomes student layer ``j``.
- Tensors are copied one by one from the teacher's safetensors files (``model.layers.{i}.*`` ->
  ``model.layers.{j}.*``); no model is instantiated with real weights, and at most one output shard is in memory.
- Per-layer config entries follow the selection: lists with one entry per layer (``layer_types``, ...), layer
  index lists (``mlp_only_layers``) and "first k layers" counts (``max_window_layers``, ``first_k_dense_replace``).
  When transformers knows the architecture, ``layer_types`` is made explicit and the student's layers are checked
  on the meta device to have the same parameter shapes as the teacher layers they copy.
- The output directory is written atomically (see ``kdscale.checkpoint.hf_io.atomic_output_dir``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kdscale.checkpoint.hf_io import (
    atomic_output_dir,
    copy_tokenizer_files,
    num_hidden_layers,
    read_model_config,
    safetensors_key_index,
    write_config_json,
    write_safetensors_sharded,
)

logger = logging.getLogger(__name__)

_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*?\.)?layers\.)(?P<index>\d+)\.(?P<rest>.+)$")
_PREFERRED_PREFIXES = ("model.layers.", "model.language_model.layers.", "language_model.model.layers.")
_LAYER_INDEX_LISTS = ("mlp_only_layers",)  # values are teacher layer indices
_FIRST_K_COUNTS = ("max_window_layers", "first_k_dense_replace")  # "layers below k are special"
_NOT_PER_LAYER = ("architectures",)


def validate_layer_selection(layers: list[int], num_layers: int) -> list[int]:
    """Check ``layers`` are unique, increasing teacher layer indices in ``[0, num_layers)``; returns a copy."""
    layers = list(layers)
    hint = f"e.g. layers=[0, {num_layers - 1}] (the teacher has {num_layers} layers, indices 0..{num_layers - 1})"
    if not layers:
        raise ValueError(f"layers is empty: keep at least one teacher layer, {hint}")
    not_int = [x for x in layers if not isinstance(x, int) or isinstance(x, bool)]
    if not_int:
        raise ValueError(f"layers must be integers, got {not_int!r} in {layers}")
    out_of_range = [i for i in layers if not 0 <= i < num_layers]
    if out_of_range:
        raise ValueError(f"layers {out_of_range} out of range in {layers}: {hint}")
    duplicates = sorted({i for i in layers if layers.count(i) > 1})
    if duplicates:
        raise ValueError(f"layers {duplicates} repeated in {layers}: each teacher layer can be kept once")
    if layers != sorted(layers):
        raise ValueError(f"layers {layers} must be increasing (teacher order), e.g. {sorted(layers)}")
    return layers


def _layer_section(config: dict[str, Any]) -> dict[str, Any]:
    """The (sub-)dict that holds ``num_hidden_layers``: the config itself or its ``text_config``."""
    if "num_hidden_layers" in config:
        return config
    nested = config.get("text_config")
    if isinstance(nested, dict) and "num_hidden_layers" in nested:
        return nested
    raise ValueError(f"config.json has no num_hidden_layers (keys: {sorted(config)[:20]}); cannot select layers")


def student_config(config: dict[str, Any], layers: list[int]) -> dict[str, Any]:
    """The teacher's config dict with ``num_hidden_layers`` and every per-layer entry reduced to ``layers``."""
    out = copy.deepcopy(config)
    section = _layer_section(out)
    num_layers = section["num_hidden_layers"]
    section["num_hidden_layers"] = len(layers)
    kept = set(layers)
    for key, value in list(section.items()):
        if key in _LAYER_INDEX_LISTS and isinstance(value, list):
            section[key] = [j for j, i in enumerate(layers) if i in set(value)]
        elif key in _FIRST_K_COUNTS and isinstance(value, int) and not isinstance(value, bool):
            section[key] = sum(1 for i in layers if i < value)  # layers are sorted: the kept ones below k stay first
        elif isinstance(value, list) and len(value) == num_layers and key not in _NOT_PER_LAYER:
            section[key] = [value[i] for i in layers]
        else:
            continue
        logger.info(f"student config: {key} {value!r} -> {section[key]!r} (kept teacher layers {sorted(kept)})")
    return out


def _decoder_prefix(keys: list[str], num_layers: int, teacher_dir: Path) -> str:
    """The checkpoint key prefix of the decoder layers (``model.layers.`` for Llama-style models)."""
    indices: dict[str, set[int]] = defaultdict(set)
    for key in keys:
        match = _LAYER_KEY.match(key)
        if match:
            indices[match["prefix"]].add(int(match["index"]))
    candidates = [prefix for prefix, found in indices.items() if set(range(num_layers)) <= found]
    if len(candidates) > 1:
        candidates = [prefix for prefix in _PREFERRED_PREFIXES if prefix in candidates][:1] or candidates
    if len(candidates) != 1:
        found = {prefix: len(found) for prefix, found in indices.items()}
        raise ValueError(
            f"{teacher_dir}: cannot tell which checkpoint keys are the {num_layers} decoder layers "
            f"(layer prefixes found, with their layer counts: {found})"
        )
    extra = sorted(i for i in indices[candidates[0]] if i >= num_layers)
    if extra:
        logger.warning(f"dropping checkpoint layers {extra} beyond num_hidden_layers={num_layers} (e.g. MTP layers)")
    return candidates[0]


def _copy_plan(index: dict[str, Path], prefix: str, layers: list[int]) -> dict[Path, list[tuple[str, str]]]:
    """Per teacher file, the (teacher key, student key) pairs to copy."""
    new_index = {teacher: student for student, teacher in enumerate(layers)}
    plan: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for key, file in index.items():
        match = _LAYER_KEY.match(key)
        if match and match["prefix"] == prefix:
            teacher_layer = int(match["index"])
            if teacher_layer not in new_index:
                continue
            plan[file].append((key, f"{prefix}{new_index[teacher_layer]}.{match['rest']}"))
        else:
            plan[file].append((key, key))
    return plan


def _stream(plan: dict[Path, list[tuple[str, str]]]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in sorted(plan):
        with safe_open(str(file), framework="pt") as handle:
            for teacher_key, student_key in plan[file]:
                yield student_key, handle.get_tensor(teacher_key)


def _check_structure(teacher_dir: Path, config: dict[str, Any], layers: list[int]) -> None:
    """Make ``layer_types`` explicit and check (on the meta device) that student layer j has the parameter shapes
    of teacher layer ``layers[j]``. Skipped with a warning when transformers cannot build the architecture."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        teacher_cfg = AutoConfig.from_pretrained(teacher_dir, trust_remote_code=False)
        teacher_text = getattr(teacher_cfg, "text_config", None) or teacher_cfg
        layer_types = getattr(teacher_text, "layer_types", None)
        section = _layer_section(config)
        if isinstance(layer_types, list) and len(layer_types) == teacher_text.num_hidden_layers:
            section["layer_types"] = [layer_types[i] for i in layers]
        student_cfg = type(teacher_cfg).from_dict(config)
        with torch.device("meta"):
            teacher = AutoModelForCausalLM.from_config(teacher_cfg, trust_remote_code=False)
            student = AutoModelForCausalLM.from_config(student_cfg, trust_remote_code=False)
        teacher_layers, student_layers = teacher.get_decoder().layers, student.get_decoder().layers
    except Exception as exc:  # an architecture transformers cannot build here: the copy itself is still exact
        logger.warning(f"skipping the student structure check ({type(exc).__name__}: {exc})")
        return

    def shapes(module: torch.nn.Module, skip: set[int] | None = None) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in module.named_parameters() if id(p) not in (skip or set())}

    for j, i in enumerate(layers):
        if shapes(teacher_layers[i]) != shapes(student_layers[j]):
            raise ValueError(
                f"student layer {j} would not have the structure of teacher layer {i} (its config cannot express "
                "this selection, e.g. decoder_sparse_step or dense/MoE layer patterns); choose other layers"
            )
    teacher_rest = shapes(teacher, {id(p) for p in teacher_layers.parameters()})
    student_rest = shapes(student, {id(p) for p in student_layers.parameters()})
    if teacher_rest != student_rest:
        raise ValueError(f"student non-layer parameters differ from the teacher's: {teacher_rest} vs {student_rest}")


def derive_student_from_teacher(
    teacher_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    layers: list[int],
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write an HF student made of the teacher's decoder ``layers`` (plus embedding, final norm, head, tokenizer).

    Args:
        teacher_dir: the teacher's HF directory (config.json + safetensors).
        out_dir: the student directory to create (atomically).
        layers: unique, increasing teacher layer indices; teacher layer ``layers[j]`` becomes student layer ``j``.
        overwrite: replace an existing ``out_dir``.
        max_shard_size: safetensors shard limit of the student checkpoint.
    Returns:
        ``out_dir`` as an absolute path.
    """
    teacher_dir = Path(teacher_dir)
    config = read_model_config(teacher_dir)
    num_layers = num_hidden_layers(_layer_section(config))
    layers = validate_layer_selection(layers, num_layers)
    index = safetensors_key_index(teacher_dir)
    prefix = _decoder_prefix(list(index), num_layers, teacher_dir)
    new_config = student_config(config, layers)
    _check_structure(teacher_dir, new_config, layers)
    plan = _copy_plan(index, prefix, layers)
    provenance = {"teacher_dir": str(teacher_dir.resolve()), "layers": layers, "teacher_num_layers": num_layers}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_safetensors_sharded(_stream(plan), tmp, max_shard_size=max_shard_size)
        write_config_json(new_config, tmp)
        copy_tokenizer_files(teacher_dir, tmp)
        (tmp / "kdscale_student_init.json").write_text(json.dumps(provenance, indent=2) + "\n")
    out = Path(out_dir).expanduser().absolute()
    logger.info(f"derived a {len(layers)}-layer student from {num_layers}-layer teacher {teacher_dir} -> {out}")
    return out
