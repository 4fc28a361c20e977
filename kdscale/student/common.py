"""Backend-independent pieces shared by the student backends (FSDP2 and Megatron-Core).

Constructor-argument validation and normalization, dtype parsing, optimizer settings, the checks of a rank's
teacher hidden states against its micro-batches and of the global loss-token count, and the per-token metrics.
Imports no backend: each backend imports this module, never the other backend.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from kdscale.data.batch import MicroBatch

# Keyword arguments of kdscale.losses.chunked_distill_loss that the ``loss`` option may set.
LOSS_KEYS = (
    "divergence",
    "temperature",
    "kd_ratio",
    "jsd_beta",
    "skew_lambda",
    "adaptive_alpha",
    "chunk_size",
    "compute_dtype",
)
MIXED_PRECISION = ("none", "bf16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(value: str | torch.dtype, name: str) -> torch.dtype:
    """``value`` as a torch dtype: a torch.dtype, or one of "float32", "bfloat16", "float16"."""
    if isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"{name} must be one of {sorted(_DTYPES)} or a torch.dtype, got {value!r}")
    return _DTYPES[value]


def validate_student_args(
    *,
    teacher_head: torch.Tensor,
    vocab_size: int,
    loss: dict[str, Any] | None,
    mixed_precision: str,
    device: str,
    grad_clip: float,
    cross_tokenizer: bool = False,
) -> dict[str, Any]:
    """Check the constructor arguments common to every backend; returns the loss keyword arguments (a copy,
    with ``compute_dtype`` parsed). ``cross_tokenizer``: teacher and student vocabularies differ (the teacher head
    need not cover the student's ``vocab_size``)."""
    loss = dict(loss or {})
    unknown = sorted(set(loss) - set(LOSS_KEYS))
    if unknown:
        raise ValueError(f"unknown loss options {unknown}; the loss accepts {list(LOSS_KEYS)}")
    if "compute_dtype" in loss:
        loss["compute_dtype"] = as_dtype(loss["compute_dtype"], "loss.compute_dtype")
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if teacher_head.dim() != 2:
        raise ValueError(f"teacher_head must be [V_teacher, H_teacher], got shape {tuple(teacher_head.shape)}")
    if not 0 < vocab_size <= (float("inf") if cross_tokenizer else teacher_head.shape[0]):
        raise ValueError(
            f"vocab_size ({vocab_size}) must be in [1, teacher head rows = {teacher_head.shape[0]}]: pass the "
            "tokenizer's vocabulary size, and the teacher head that covers it"
        )
    if grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {grad_clip}")
    return loss


def adam_kwargs(*, weight_decay: float, betas: tuple[float, float], eps: float) -> dict[str, Any]:
    """Adam(W) settings other than the learning rate."""
    return {"weight_decay": weight_decay, "betas": tuple(betas), "eps": eps}


def teacher_hidden_error(
    micro_batches: list[MicroBatch], teacher_hidden: list[torch.Tensor], hidden_size: int
) -> RuntimeError | ValueError | None:
    """The first mismatch between the micro-batches and their teacher hidden states, or None."""
    if len(micro_batches) != len(teacher_hidden):
        return ValueError(
            f"{len(micro_batches)} micro-batches but {len(teacher_hidden)} teacher hidden tensors: pass one "
            "teacher output per micro-batch, in the same order"
        )
    for index, (micro_batch, hidden) in enumerate(zip(micro_batches, teacher_hidden)):
        if hidden.dim() != 2 or hidden.shape[1] != hidden_size:
            return ValueError(
                f"teacher hidden of micro-batch {index} has shape {tuple(hidden.shape)}; expected "
                f"[num_loss_tokens, {hidden_size}] (the teacher head's hidden size)"
            )
        if hidden.shape[0] != micro_batch.num_kd_tokens:
            what = "loss tokens (loss_mask" if micro_batch.kd_mask is None else "aligned predictions (kd_mask"
            return RuntimeError(
                f"teacher hidden of micro-batch {index} has {hidden.shape[0]} rows but the micro-batch has "
                f"{micro_batch.num_kd_tokens} {what}[:, 1:].sum()): the teacher output "
                "does not belong to this micro-batch"
            )
    return None


def check_global_loss_tokens(total_loss_tokens: int, global_num_loss_tokens: int) -> None:
    """Raise unless the loss tokens of all ranks add up to ``global_num_loss_tokens`` (and are not zero)."""
    if total_loss_tokens != global_num_loss_tokens:
        raise ValueError(
            f"global_num_loss_tokens={global_num_loss_tokens} but the micro-batches of all ranks hold "
            f"{total_loss_tokens} loss tokens: pass StepLayout.global_num_loss_tokens of this step"
        )
    if total_loss_tokens == 0:
        raise ValueError("the global batch has no loss tokens: every loss_mask is empty")


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum ``values`` over all ranks (on ``device``, the backend's collective device); returns a CPU tensor."""
    values = values.to(device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def per_token_losses(
    loss_kwargs: dict[str, Any], kd_sum: float, ce_sum: float, num_loss_tokens: int, num_kd_tokens: int | None = None
) -> tuple[float, float, float]:
    """(loss, kd, ce) per token from the global sums, ``loss`` mixed with the configured ``kd_ratio``.

    ``kd`` is per KD token: per aligned prediction under cross-tokenizer distillation (``num_kd_tokens``), else
    per loss token; ``ce`` is per loss token."""
    kd_ratio = loss_kwargs.get("kd_ratio", 1.0)
    kd_tokens = num_loss_tokens if num_kd_tokens is None else num_kd_tokens
    kd, ce = kd_sum / max(kd_tokens, 1), ce_sum / num_loss_tokens
    return kd_ratio * kd + (1.0 - kd_ratio) * ce, kd, ce


def eval_metrics(
    loss_kwargs: dict[str, Any],
    kd_sum: float,
    ce_sum: float,
    kl_sum: float,
    num_loss_tokens: int,
    num_kd_tokens: int | None = None,
) -> dict[str, float]:
    """The dictionary ``evaluate`` returns, from the global sums (``kl`` per KD token, see per_token_losses)."""
    loss, kd, ce = per_token_losses(loss_kwargs, kd_sum, ce_sum, num_loss_tokens, num_kd_tokens)
    kd_tokens = num_loss_tokens if num_kd_tokens is None else num_kd_tokens
    out = {"kl": kl_sum / max(kd_tokens, 1), "loss": loss, "kd": kd, "ce": ce, "num_loss_tokens": num_loss_tokens}
    if num_kd_tokens is not None:
        out["num_kd_tokens"] = num_kd_tokens
    return out
