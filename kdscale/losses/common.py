"""What the chunked loss and the full-logit reference share: the output type and the argument checks.

Both paths validate their arguments here so that a bad setting fails with the same message whichever path runs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from kdscale.losses.divergences import DIVERGENCES

# Common shorthands from papers and other toolkits, to turn "fkl" into a helpful "did you mean 'forward_kl'".
_ALIASES = {
    "kl": "forward_kl",
    "fkl": "forward_kl",
    "rkl": "reverse_kl",
    "js": "jsd",
    "gkd": "jsd",
    "sfkl": "skew_forward_kl",
    "srkl": "skew_reverse_kl",
    "tv": "tvd",
    "akl": "adaptive_kl",
}


@dataclass
class DistillLossOutput:
    """Result of one distillation loss call on N tokens.

    ``loss`` is ``(kd_ratio * kd_sum + (1 - kd_ratio) * ce_sum) / normalizer``: a scalar that is differentiable
    with respect to the student inputs. ``kd_sum`` and ``ce_sum`` are detached sums over the N tokens (for
    logging: summed over micro-batches and ranks, then divided by the global token count).
    """

    loss: torch.Tensor
    kd_sum: float
    ce_sum: float
    num_tokens: int


def check_divergence_args(
    *,
    divergence: str,
    temperature: float,
    kd_ratio: float,
    jsd_beta: float,
    skew_lambda: float,
    adaptive_alpha: float,
    normalizer: float | None,
    compute_dtype: torch.dtype,
) -> None:
    """Raise ``ValueError`` naming the argument, its value and the fix for any out-of-range setting.

    Every hyper-parameter is checked whichever divergence is selected: a bad value is a bad config.
    """
    if divergence not in DIVERGENCES:
        guess = _ALIASES.get(str(divergence).lower()) or next(
            iter(difflib.get_close_matches(str(divergence), DIVERGENCES, n=1, cutoff=0.5)), None
        )
        hint = f" Did you mean {guess!r}?" if guess else ""
        raise ValueError(
            f"divergence={divergence!r} is not a known divergence; valid ones: {', '.join(DIVERGENCES)}.{hint}"
        )
    if not temperature > 0:
        raise ValueError(
            f"temperature must be > 0, got {temperature!r}: set a positive temperature "
            "(1.0 leaves the logits unscaled)."
        )
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(
            f"kd_ratio must be in [0, 1] (loss = kd_ratio * KD + (1 - kd_ratio) * CE), got {kd_ratio!r}: "
            "use 1.0 for pure distillation, 0.0 for pure cross-entropy."
        )
    if not 0.0 < jsd_beta < 1.0:
        raise ValueError(
            f"jsd_beta must be in the open interval (0, 1), got {jsd_beta!r}: the mixture JSD is identically 0 at the "
            "end points (TRL's GKD special-cases beta=0 as forward KL and beta=1 as reverse KL); use "
            "divergence='forward_kl' or divergence='reverse_kl' for those."
        )
    if not 0.0 <= skew_lambda <= 1.0:
        raise ValueError(
            f"skew_lambda must be in [0, 1], got {skew_lambda!r}: it is the weight of the reference distribution in "
            "the skewed mixture (DistiLLM uses 0.1)."
        )
    if not 0.0 <= adaptive_alpha <= 1.0:
        raise ValueError(
            f"adaptive_alpha must be in [0, 1], got {adaptive_alpha!r}: it is the teacher cumulative probability "
            "that splits the vocabulary into head and tail (Wu et al. use 0.5)."
        )
    if normalizer is not None and not normalizer > 0:
        raise ValueError(
            f"normalizer must be > 0, got {normalizer!r}: pass the global number of loss tokens, or None to use N."
        )
    if not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise ValueError(f"compute_dtype must be a floating torch.dtype, got {compute_dtype!r}: use torch.float32.")


def check_vocab_and_labels(labels: torch.Tensor, num_rows: int, vocab_size: int) -> None:
    """Check ``vocab_size`` and that ``labels`` is [num_rows] of ids in [0, vocab_size). One host sync."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size!r}: pass the tokenizer's vocabulary size.")
    if labels.dim() != 1 or labels.shape[0] != num_rows:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but there are {num_rows} prediction rows: pass the [N] labels "
            "from kdscale.data.batch.gather_labels, aligned with the hidden rows."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of token ids, got dtype {labels.dtype}.")
    if num_rows > 0:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"labels contain token id {bad} outside [0, vocab_size={vocab_size}): labels must be real token ids "
                "(no ignore index such as -100: gather only the loss-masked rows) and vocab_size must be the "
                "tokenizer's vocabulary size."
            )


def resolve_normalizer(normalizer: float | None, num_tokens: int) -> float:
    """The divisor of the summed losses: ``normalizer`` or, by default, the local token count (at least 1)."""
    return float(normalizer) if normalizer is not None else float(max(num_tokens, 1))
