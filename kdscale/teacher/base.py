"""TeacherEngine protocol and TeacherOutput: what every teacher engine takes and returns.

An engine takes token ids (never text) and returns the FINAL-NORM hidden states (the input of the output head)
at the prediction positions of the loss mask only (see ``kdscale.data.batch``), as a numpy array. bf16 travels
as int16 bits so that a Ray object-store read is a zero-copy, read-only view; ``as_tensor`` reinterprets the
bits without copying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from kdscale.data.batch import MicroBatch

_TRANSPORT_DTYPES = {"bfloat16": np.int16, "float32": np.float32}


@dataclass
class TeacherOutput:
    """Teacher hidden states of one micro-batch: [num_loss_tokens, hidden_size] as a numpy array."""

    array: np.ndarray  # int16 (bf16 bits) or float32
    dtype: str  # "bfloat16" | "float32": what the array holds

    @staticmethod
    def from_tensor(hidden: torch.Tensor, dtype: str) -> TeacherOutput:
        """Pack a [n, H] tensor as a numpy array of ``dtype`` ("bfloat16" -> int16 bits, or "float32")."""
        if dtype not in _TRANSPORT_DTYPES:
            raise ValueError(f"transport dtype must be one of {sorted(_TRANSPORT_DTYPES)}, got {dtype!r}")
        hidden = hidden.detach().to("cpu")
        if dtype == "bfloat16":
            array = hidden.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        else:
            array = hidden.to(torch.float32).contiguous().numpy()
        return TeacherOutput(array=array, dtype=dtype)

    @property
    def num_tokens(self) -> int:
        return int(self.array.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def as_tensor(self) -> torch.Tensor:
        """A torch view of the array (no copy). READ-ONLY when it came from the object store: never write."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable array": intended, we never write
            tensor = torch.from_numpy(self.array)
        return tensor.view(torch.bfloat16) if self.dtype == "bfloat16" else tensor


class TeacherEngine(Protocol):
    """A teacher inference engine. Implementations: ``hf`` (transformers), ``sglang`` (SGLang offline engines).

    Optional: ``health() -> dict`` (``{"healthy": bool, ...}``, safe to call from another thread), ``sleep()`` and
    ``wake()`` (release and resume accelerator memory between steps)."""

    def start(self) -> None:
        """Load the model; idempotent."""

    def forward(self, micro_batch: MicroBatch) -> TeacherOutput:
        """Final-norm hidden states at the prediction positions of ``micro_batch`` (length-checked)."""

    @property
    def hidden_size(self) -> int:
        """Hidden size H of the returned rows."""

    def shutdown(self) -> None:
        """Release the model; idempotent."""
