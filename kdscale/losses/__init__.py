"""Distillation losses: per-token divergences, the chunked hidden-state loss, and the full-logit reference.

- :mod:`~kdscale.losses.divergences`: the one definition of each divergence (:data:`DIVERGENCES`).
- :mod:`~kdscale.losses.chunked`: :func:`chunked_distill_loss`, "linear + divergence" over token chunks with
  recomputation in backward; never materializes [tokens, vocab].
- :mod:`~kdscale.losses.reference`: :func:`naive_distill_loss` on full logits, the reference for tests.
- :mod:`~kdscale.losses.vocab_parallel`: :func:`vocab_parallel_chunked_distill_loss`, the chunked loss with both
  heads sharded by vocabulary across tensor-parallel ranks.
"""

from kdscale.losses.chunked import chunked_distill_loss
from kdscale.losses.common import DistillLossOutput
from kdscale.losses.divergences import DIVERGENCES, per_token_divergence
from kdscale.losses.reference import naive_distill_loss
from kdscale.losses.vocab_parallel import vocab_parallel_chunked_distill_loss

__all__ = [
    "DIVERGENCES",
    "DistillLossOutput",
    "chunked_distill_loss",
    "naive_distill_loss",
    "per_token_divergence",
    "vocab_parallel_chunked_distill_loss",
]
