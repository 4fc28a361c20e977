"""Model preparation before the cluster starts: a Hugging Face teacher directory (a GGUF teacher is converted
once and cached), the student directory (derived from teacher layers once and cached, if so configured), and the
shared tokenizer, checked to be the same on both sides."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdscale.config.schema import KDConfig
from kdscale.observability.logging import get_logger


class ModelMismatchError(ValueError):
    """Teacher and student cannot be distilled together as configured."""


@dataclass
class PreparedModels:
    teacher_dir: Path
    student_dir: Path
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    vocab_size: int  # len(tokenizer): the real vocabulary; head rows beyond it are padding


def prepare_models(cfg: KDConfig) -> PreparedModels:
    """Resolve, convert and derive the models the run needs; check their tokenizers agree."""
    from transformers import AutoTokenizer

    from kdscale.checkpoint.hf_io import materialize_hf_dir, read_model_config, resolve_model_path
    from kdscale.student.init_from_teacher import derive_student_from_teacher

    log = get_logger("kdscale.prepare")
    cache_dir = Path(cfg.run.cache_dir)
    teacher_dir = materialize_hf_dir(cfg.teacher.model_path, cache_dir=cache_dir)
    if cfg.student.model_path is not None:
        student_dir = resolve_model_path(cfg.student.model_path)
    else:
        layers = list(cfg.student.init_from_teacher_layers or [])
        key = hashlib.sha256(f"{teacher_dir.resolve()}|{layers}".encode()).hexdigest()[:10]
        student_dir = cache_dir / f"student-{len(layers)}layers-{key}"
        if not (student_dir / "config.json").is_file():
            log.info(f"deriving the student from teacher layers {layers} -> {student_dir}")
            derive_student_from_teacher(teacher_dir, student_dir, layers=layers)

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ModelMismatchError(
            f"the student tokenizer ({student_dir}, {len(tokenizer)} tokens) differs from the teacher's "
            f"({teacher_dir}, {len(teacher_tokenizer)} tokens): same-tokenizer distillation needs one tokenizer"
        )
    vocab_size = len(tokenizer)
    for label, model_dir in (("teacher", teacher_dir), ("student", student_dir)):
        rows = int(read_model_config(model_dir)["vocab_size"])
        if rows < vocab_size:
            raise ModelMismatchError(
                f"the {label} model has {rows} vocabulary rows but the tokenizer has {vocab_size} tokens: "
                "the model cannot score every token; use the model's own tokenizer"
            )
    return PreparedModels(teacher_dir, student_dir, tokenizer, vocab_size)
