"""Teacher engine ``hf``: a transformers causal LM run in-process (the CPU default and the reference engine).

Design:
- Only the BASE model runs (``get_decoder()``: embeddings, decoder layers, final norm); the output head is never
  applied, so no [B, L, V] logits are ever made. For Llama/Qwen2/Qwen3/Mistral the base model's
  ``last_hidden_state`` is the final-norm output, i.e. exactly what ``lm_head`` consumes (tested).
- The CausalLM wrapper is dropped after loading, so an untied output head is freed.
- Micro-batches are right-padded (checked): with a causal mask real tokens never attend to padding, so default
  position ids are right and each sample's hidden states equal running it alone (tested).
- ``max_tokens_per_forward`` splits a micro-batch into consecutive row groups (each trimmed to its longest row),
  bounding activation memory; rows stay in (sample, position) order, as ``gather_prediction_rows`` defines.
- Packed micro-batches (:mod:`kdscale.data.batch`) run packed, with their restarting ``position_ids`` and no
  attention mask: transformers then keeps attention within each sample (as in the FSDP2 student). Running them
  packed, rather than unpacking them into a padded batch, keeps the teacher forward (usually the most expensive
  one) free of padding too, and is no more code: ``max_tokens_per_forward`` splits a packed row at sample
  boundaries into pieces of whole samples, and since no sample's first token is a target, the rows of the pieces
  concatenated are the rows of the whole row.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

import torch

from kdscale.checkpoint.hf_io import (
    ModelPathError,
    dtype_kwarg,
    hidden_size,
    read_model_config,
    resolve_model_path,
)
from kdscale.data.batch import MicroBatch, gather_prediction_rows, require_packed_sequence_support, sample_spans
from kdscale.teacher.base import _TRANSPORT_DTYPES, TeacherOutput

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


class HFTeacherEngine:
    """A transformers teacher returning final-norm hidden states at the prediction positions.

    Args:
        model_path: an HF model directory (config.json + safetensors). Convert a GGUF first with
            ``kdscale.checkpoint.hf_io.materialize_hf_dir``.
        dtype: weights and compute dtype, "float32" or "bfloat16".
        transport_dtype: dtype of the returned rows, "bfloat16" (int16 bits) or "float32".
        num_threads: if set, ``torch.set_num_threads`` at start (process-wide).
        attn_implementation: "sdpa" (default), "eager" or "flash_attention_2" (CUDA only).
        max_tokens_per_forward: if set, forward at most this many (padded) tokens at a time.
        device: torch device for the model, "cpu" by default.
    """

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str],
        dtype: str = "float32",
        transport_dtype: str = "bfloat16",
        num_threads: int | None = None,
        attn_implementation: str = "sdpa",
        max_tokens_per_forward: int | None = None,
        device: str = "cpu",
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"teacher dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if transport_dtype not in _TRANSPORT_DTYPES:
            raise ValueError(f"transport_dtype must be one of {sorted(_TRANSPORT_DTYPES)}, got {transport_dtype!r}")
        if attn_implementation not in _ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {list(_ATTN_IMPLEMENTATIONS)}, got {attn_implementation!r}"
            )
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        if max_tokens_per_forward is not None and max_tokens_per_forward < 1:
            raise ValueError(f"max_tokens_per_forward must be >= 1 or None, got {max_tokens_per_forward}")
        path = resolve_model_path(model_path)
        if not path.is_dir():
            raise ModelPathError(
                f"teacher model_path {os.fspath(model_path)!r} is a GGUF file; the hf engine loads an HF directory: "
                "convert it once with kdscale.checkpoint.hf_io.materialize_hf_dir(spec, cache_dir=...)"
            )
        self.model_path = path
        self.dtype = dtype
        self.transport_dtype = transport_dtype
        self.num_threads = num_threads
        self.attn_implementation = attn_implementation
        self.max_tokens_per_forward = max_tokens_per_forward
        self.device = torch.device(device)
        self._hidden_size = hidden_size(read_model_config(path))
        self._base: Any = None  # the base (decoder) model once started

    @property
    def hidden_size(self) -> int:
        """Hidden size H of the returned rows (from config.json; known before ``start``)."""
        return self._hidden_size

    @property
    def started(self) -> bool:
        """Whether the model is loaded."""
        return self._base is not None

    def start(self) -> None:
        """Load the model in eval mode (idempotent). Only safetensors; ``trust_remote_code`` stays off."""
        if self._base is not None:
            return
        from transformers import AutoModelForCausalLM

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        model = AutoModelForCausalLM.from_pretrained(
            self.model_path,
            trust_remote_code=False,
            use_safetensors=True,
            attn_implementation=self.attn_implementation,
            **dtype_kwarg(_DTYPES[self.dtype]),
        )
        base = model.get_decoder()
        if base is model:
            raise RuntimeError(f"{self.model_path}: cannot find the base model of {type(model).__name__}")
        base.config.use_cache = False
        self._base = base.to(self.device).eval()
        del model  # drops the wrapper and, when untied, the output head
        gc.collect()
        logger.info(f"hf teacher loaded {self.model_path} ({self.dtype}, {self.attn_implementation}, {self.device})")

    def forward(self, micro_batch: MicroBatch) -> TeacherOutput:
        """Final-norm hidden states at the prediction positions: [micro_batch.num_loss_tokens, H]."""
        if self._base is None:
            raise RuntimeError("HFTeacherEngine.forward called before start(); call engine.start() first")
        input_ids, attention_mask, loss_mask = _check_batch(micro_batch)
        expected = micro_batch.num_loss_tokens
        if expected == 0:  # e.g. a filler micro-batch: nothing to predict, no forward needed
            return TeacherOutput.from_tensor(torch.empty(0, self._hidden_size), self.transport_dtype)
        if micro_batch.is_packed:
            rows = self._forward_packed(micro_batch, input_ids, loss_mask)
        else:
            rows = self._forward_padded(input_ids, attention_mask, loss_mask)
        if rows.shape[0] != expected or rows.shape[1] != self._hidden_size:
            raise RuntimeError(
                f"hf teacher returned {rows.shape[0]} rows of size {rows.shape[1]} but the loss mask has {expected} "
                f"prediction positions of hidden size {self._hidden_size}"
            )
        return TeacherOutput.from_tensor(rows, self.transport_dtype)

    def _forward_padded(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> torch.Tensor:
        pieces = []
        with torch.inference_mode():
            for start, stop in _row_groups(attention_mask, loss_mask, self.max_tokens_per_forward):
                if not bool(loss_mask[start:stop, 1:].any()):
                    continue  # no prediction position in these rows
                group_len = _used_length(attention_mask[start:stop], loss_mask[start:stop])
                ids = input_ids[start:stop, :group_len].to(self.device)
                mask = attention_mask[start:stop, :group_len].to(self.device)
                out = self._base(input_ids=ids, attention_mask=mask, use_cache=False)
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                pieces.append(gather_prediction_rows(hidden, loss_mask[start:stop, :group_len].to(self.device)))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _forward_packed(
        self, micro_batch: MicroBatch, input_ids: torch.Tensor, loss_mask: torch.Tensor
    ) -> torch.Tensor:
        require_packed_sequence_support()
        position_ids = micro_batch.position_ids.to(torch.long)
        pieces = []
        with torch.inference_mode():
            for row, start, stop in _packed_pieces(sample_spans(micro_batch), self.max_tokens_per_forward):
                piece_loss_mask = loss_mask[row : row + 1, start:stop].to(self.device)
                if not bool(piece_loss_mask[:, 1:].any()):
                    continue  # no prediction position in these samples
                out = self._base(
                    input_ids=input_ids[row : row + 1, start:stop].to(self.device),
                    position_ids=position_ids[row : row + 1, start:stop].to(self.device),
                    use_cache=False,  # transformers skips packed-sequence detection when a cache exists
                )
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                pieces.append(gather_prediction_rows(hidden, piece_loss_mask))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def shutdown(self) -> None:
        """Release the model (idempotent)."""
        if self._base is not None:
            self._base = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def _check_batch(micro_batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    input_ids, attention_mask, loss_mask = micro_batch.input_ids, micro_batch.attention_mask, micro_batch.loss_mask
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape or input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"micro-batch shapes disagree: input_ids {tuple(input_ids.shape)}, attention_mask "
            f"{tuple(attention_mask.shape)}, loss_mask {tuple(loss_mask.shape)}; all must be [B, L]"
        )
    attention_mask = attention_mask.to(torch.long)
    if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ValueError(
            "micro-batch must be right-padded (attention_mask 1...1 0...0 per row); got a left pad or hole"
        )
    if bool((loss_mask.bool() & (attention_mask == 0)).any()):
        raise ValueError("loss_mask marks padding positions as targets; targets must be real tokens")
    return input_ids.to(torch.long), attention_mask, loss_mask.bool()


def _used_length(attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> int:
    """Columns up to the last real token (right padding beyond it is cut: it changes no real token's state)."""
    used = (attention_mask.bool() | loss_mask).any(dim=0).nonzero()
    return int(used[-1]) + 1 if used.numel() else 1


def _packed_pieces(spans: list[tuple[int, int, int]], max_tokens: int | None) -> list[tuple[int, int, int]]:
    """``(row, start, stop)`` pieces of consecutive whole samples of one row, each within ``max_tokens`` tokens.

    A sample longer than ``max_tokens`` is a piece of its own; without ``max_tokens`` a piece is a whole row's
    samples (the pad tail is cut).
    """
    pieces: list[tuple[int, int, int]] = []
    for row, start, stop in spans:
        if pieces:
            last_row, last_start, _ = pieces[-1]
            if last_row == row and (max_tokens is None or stop - last_start <= max_tokens):
                pieces[-1] = (row, last_start, stop)
                continue
        pieces.append((row, start, stop))
    return pieces


def _row_groups(attention_mask: torch.Tensor, loss_mask: torch.Tensor, max_tokens: int | None) -> list[tuple[int, int]]:
    """Consecutive [start, stop) row ranges whose padded size (rows x longest row) stays within ``max_tokens``.

    A single row longer than ``max_tokens`` forms its own group (it cannot be split without a KV cache).
    """
    num_rows = attention_mask.shape[0]
    if max_tokens is None:
        return [(0, num_rows)]
    lengths = [_used_length(attention_mask[i : i + 1], loss_mask[i : i + 1]) for i in range(num_rows)]
    groups, start, longest = [], 0, 0
    for i, length in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, length) > max_tokens:
            groups.append((start, i))
            start, longest = i, 0
        longest = max(longest, length)
    groups.append((start, num_rows))
    return groups
