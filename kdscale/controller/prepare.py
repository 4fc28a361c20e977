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
    tokenizer: Any  # transformers PreTrainedTokenizerBase (the student's)
    vocab_size: int  # len(tokenizer): the real vocabulary; head rows beyond it are padding
    teacher_tokenizer: Any = None  # cross-tokenizer distillation only: the teacher's own tokenizer


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
    cross = cfg.cross_tokenizer.enabled
    same_vocab = tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
    if not cross and not same_vocab:
        raise ModelMismatchError(
            f"the student tokenizer ({student_dir}, {len(tokenizer)} tokens) differs from the teacher's "
            f"({teacher_dir}, {len(teacher_tokenizer)} tokens): same-tokenizer distillation needs one tokenizer; "
            "for a student with its own tokenizer set cross_tokenizer.method (shared_vocab or dskd)"
        )
    if cross:
        if same_vocab:
            log.warning("cross_tokenizer.method is set but teacher and student have the same tokenizer: "
                        "cross_tokenizer.method=none distills every target token, not only the aligned ones")
        for label, tok, model_dir in (("student", tokenizer, student_dir), ("teacher", teacher_tokenizer, teacher_dir)):
            if not getattr(tok, "is_fast", False):
                raise ModelMismatchError(
                    f"the {label} tokenizer ({model_dir}) is a slow tokenizer without character offsets: "
                    "cross-tokenizer alignment needs fast tokenizers (a tokenizer.json in the model directory)"
                )
    vocab_size = len(tokenizer)
    sides = (("teacher", teacher_dir, len(teacher_tokenizer) if cross else vocab_size),
             ("student", student_dir, vocab_size))
    for label, model_dir, tokens in sides:
        rows = int(read_model_config(model_dir)["vocab_size"])
        if rows < tokens:
            raise ModelMismatchError(
                f"the {label} model has {rows} vocabulary rows but its tokenizer has {tokens} tokens: "
                "the model cannot score every token; use the model's own tokenizer"
            )
    return PreparedModels(teacher_dir, student_dir, tokenizer, vocab_size,
                          teacher_tokenizer=teacher_tokenizer if cross else None)
