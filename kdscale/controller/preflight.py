"""Cross-checks of a run config against the files on disk, before anything heavy starts.

Reads only metadata (config.json, GGUF headers, file existence) so ``kdscale validate`` answers in seconds.
Every problem found is collected; the caller raises one ``ConfigError`` listing them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kdscale.config.schema import KDConfig


@dataclass
class ModelInfo:
    """What the checks need to know of a model, read from config.json or a GGUF header."""

    path: Path
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    max_positions: int | None


def describe_model(path: Path) -> ModelInfo:
    """Read architecture sizes from an HF directory's config.json or a .gguf file's metadata."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        import gguf

        fields = gguf.GGUFReader(str(path)).fields
        arch = fields["general.architecture"].contents()

        def get(key: str, default=None):
            field = fields.get(f"{arch}.{key}")
            return field.contents() if field is not None else default

        vocab = get("vocab_size") or len(fields["tokenizer.ggml.tokens"].data)
        heads = get("attention.head_count")
        return ModelInfo(path, get("block_count"), get("embedding_length"), vocab, heads,
                         get("attention.head_count_kv", heads), get("context_length"))
    config = json.loads((path / "config.json").read_text())
    config = config.get("text_config", config)
    return ModelInfo(
        path,
        config["num_hidden_layers"],
        config["hidden_size"],
        config["vocab_size"],
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
        config.get("max_position_embeddings"),
    )


def _check_model_path(label: str, spec: str, problems: list[str]) -> Path | None:
    from kdscale.checkpoint.hf_io import resolve_model_path

    try:
        path = resolve_model_path(spec)
    except ValueError as exc:
        problems.append(f"{label}: {exc}")
        return None
    if path.is_dir() and not (path / "config.json").is_file():
        problems.append(f"{label}: {path} has no config.json; expected a Hugging Face model directory")
        return None
    return path


def preflight(cfg: KDConfig) -> list[str]:
    """Every problem of ``cfg`` that can be seen without loading a model; empty when all is well."""
    problems: list[str] = []
    if cfg.run.max_steps is not None and cfg.optim.warmup_steps > cfg.run.max_steps:
        problems.append(f"optim.warmup_steps ({cfg.optim.warmup_steps}) exceeds run.max_steps ({cfg.run.max_steps}): "
                        f"lower optim.warmup_steps to at most {cfg.run.max_steps}")
    for label, value in (("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path)):
        if value is not None and not Path(value).is_file():
            problems.append(f"{label}: file {value!r} does not exist")

    teacher_path = _check_model_path("teacher.model_path", cfg.teacher.model_path, problems)
    teacher = describe_model(teacher_path) if teacher_path else None
    student = None
    student_layers = None
    if cfg.student.model_path is not None:
        student_path = _check_model_path("student.model_path", cfg.student.model_path, problems)
        student = describe_model(student_path) if student_path else None
        student_layers = student.num_layers if student else None
    elif teacher is not None:
        layers = cfg.student.init_from_teacher_layers or []
        bad = [i for i in layers if not 0 <= i < teacher.num_layers]
        if bad or not layers or len(set(layers)) != len(layers) or sorted(layers) != layers:
            problems.append(
                f"student.init_from_teacher_layers: {layers} must be distinct, increasing teacher layer indices "
                f"in [0, {teacher.num_layers - 1}] (the teacher has {teacher.num_layers} layers)"
            )
        student = teacher
        student_layers = len(layers)

    same_tokenizer = not cfg.cross_tokenizer.enabled
    if teacher is not None and student is not None and cfg.student.model_path is not None and same_tokenizer:
        if teacher.vocab_size != student.vocab_size:
            # Different padding is fine (the loss slices both heads to the tokenizer's size, checked at start-up);
            # different tokenizers are not (cross-tokenizer distillation is a separate algorithm).
            pad_only = min(teacher.vocab_size, student.vocab_size) >= 0.9 * max(teacher.vocab_size, student.vocab_size)
            if not pad_only:
                problems.append(
                    f"teacher vocab_size {teacher.vocab_size} and student vocab_size {student.vocab_size} differ by "
                    "more than padding: same-tokenizer distillation needs the same tokenizer (for a student with its "
                    "own tokenizer set cross_tokenizer.method: shared_vocab or dskd)"
                )
    if student is not None and student.max_positions and cfg.data.max_seq_len > student.max_positions:
        problems.append(
            f"data.max_seq_len {cfg.data.max_seq_len} exceeds the student's max_position_embeddings "
            f"{student.max_positions}; lower data.max_seq_len"
        )

    dp_key = "student.num_ranks" if cfg.student.backend == "fsdp2" else "student.data_parallel_size"
    ranks = cfg.student.world_size
    if cfg.data.global_batch_size % cfg.student.dp_size:
        problems.append(
            f"data.global_batch_size {cfg.data.global_batch_size} is not divisible by {dp_key} "
            f"{cfg.student.dp_size}: use a multiple of {cfg.student.dp_size}"
        )
    if cfg.student.backend == "megatron" and student is not None:
        problems.extend(_megatron_layout_problems(cfg.student, student, student_layers))
    if cfg.student.device == "cuda" and cfg.ray.address is None:
        import torch

        gpus = torch.cuda.device_count()
        if gpus < ranks:
            problems.append(f"student.device=cuda with {ranks} student rank(s) needs {ranks} GPUs; {gpus} found")
    if cfg.run.resume not in ("auto", "never") and not Path(cfg.run.resume).is_dir():
        problems.append(f"run.resume: checkpoint directory {cfg.run.resume!r} does not exist ('auto', 'never' or a path)")
    if cfg.teacher.engine == "sglang":
        problems.extend(_sglang_problems(cfg))
    return problems


def _sglang_problems(cfg: KDConfig) -> list[str]:
    """SGLang installed in the supported range (package metadata only: importing SGLang takes ~15 s), and on CPU
    the import shims named."""
    import importlib.metadata
    import os

    from kdscale.teacher.sglang_engine import _MAX_VERSION, _MIN_VERSION, SUPPORTED_SGLANG, _version_tuple

    supported = ",".join(SUPPORTED_SGLANG)
    cpu = cfg.teacher.device == "cpu" or (cfg.teacher.device == "auto" and not _cuda_available())
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        fix = ("run tools/dev/install_sglang_cpu.sh (CPU-only machine)" if cpu
               else f"pip install 'sglang{supported}' (or pip install -e '.[sglang]')")
        return [f"teacher.engine=sglang but SGLang is not installed: {fix}, or use teacher.engine=hf"]
    if not _MIN_VERSION <= _version_tuple(version) < _MAX_VERSION:
        return [f"teacher.engine=sglang: SGLang {version} is installed; kdscale supports {supported}"]
    shims = os.environ.get("KDSCALE_SGLANG_SHIMS")
    if cpu and cfg.ray.address is None and not (shims and Path(shims).is_dir()):
        return ["teacher.engine=sglang on CPU needs SGLang's CPU import shims: export "
                "KDSCALE_SGLANG_SHIMS=<kdscale checkout>/tools/dev/sglang_cpu_shims (see README, SGLang teacher)"]
    return []


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _megatron_layout_problems(student_cfg, student: ModelInfo, num_layers: int | None) -> list[str]:
    """TP must divide the heads and KV heads, PP (x VPP) the layers."""
    problems = []
    tp, pp = student_cfg.tensor_parallel_size, student_cfg.pipeline_parallel_size
    vpp = student_cfg.virtual_pipeline_parallel_size or 1
    for what, count in (("num_attention_heads", student.num_heads), ("num_key_value_heads", student.num_kv_heads)):
        if count % tp:
            problems.append(
                f"student.tensor_parallel_size {tp} must divide the student's {what} ({count}): "
                f"use one of {[d for d in range(1, count + 1) if count % d == 0 and student.num_heads % d == 0]}"
            )
    if num_layers is not None and num_layers % (pp * vpp):
        problems.append(
            f"the student's {num_layers} layers are not divisible by pipeline_parallel_size x "
            f"virtual_pipeline_parallel_size = {pp} x {vpp}: choose sizes whose product divides {num_layers}"
        )
    return problems
