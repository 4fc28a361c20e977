"""HiddenStateChannel: how teacher outputs reach the student ranks that consume them.

Design: a teacher replica ``put``s each ``TeacherOutput`` (a numpy array: bf16 as int16 bits, or float32) into the
Ray object store itself (``ray.put`` always uses shared memory, whereas a small actor return value would be inlined
and copied) and hands back the ref. The driver never touches the data: it routes the *refs* to the ranks that
consume that data-parallel shard. A consuming rank calls ``get``: on the same node
``ray.get`` maps the object store's shared memory and returns a read-only numpy view, and ``as_tensor`` views it
as a torch tensor, so no byte is copied on the consumer side. The tensors are READ-ONLY: never write into them.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from kdscale.teacher.base import TeacherOutput


class HiddenStateChannel(Protocol):
    """Moves teacher outputs to student ranks by reference."""

    def put(self, output: TeacherOutput) -> Any:
        """Publish one micro-batch's teacher output; returns a reference to route."""

    def get(self, refs: list[Any]) -> list[torch.Tensor]:
        """Resolve references on the consuming rank into (read-only) tensors."""


class RayObjectStoreChannel:
    """The Ray object store as the channel (zero-copy reads on the same node)."""

    def __init__(self, *, timeout_s: float = 1800.0):
        self.timeout_s = timeout_s
        self.last_get_seconds = 0.0
        self.last_get_bytes = 0

    def put(self, output: TeacherOutput) -> Any:
        import ray

        return ray.put(output)

    def get(self, refs: list[Any]) -> list[torch.Tensor]:
        import ray

        start = time.perf_counter()
        outputs: list[TeacherOutput] = ray.get(list(refs), timeout=self.timeout_s)
        self.last_get_seconds = time.perf_counter() - start
        self.last_get_bytes = sum(o.nbytes for o in outputs)
        return [o.as_tensor() for o in outputs]


class InProcessChannel:
    """No transport: the reference is the output itself (single-process tests and tools)."""

    last_get_seconds = 0.0
    last_get_bytes = 0

    def put(self, output: TeacherOutput) -> TeacherOutput:
        return output

    def get(self, refs: list[TeacherOutput]) -> list[torch.Tensor]:
        self.last_get_bytes = sum(o.nbytes for o in refs)
        return [o.as_tensor() for o in refs]
