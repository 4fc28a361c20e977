"""HiddenStateChannel: how teacher outputs reach the student ranks that consume them.

Design: a teacher replica ``put``s each ``TeacherOutput`` (a numpy array: bf16 as int16 bits, or float32) into the
Ray object store itself (``ray.put`` always uses shared memory, whereas a small actor return value would be inlined
and copied) and hands back the ref. The driver never touches the data: it routes the *refs* to the ranks that
consume that data-parallel shard. A consuming rank calls ``get``: on the same node
``ray.get`` maps the object store's shared memory and returns a read-only numpy view, and ``as_tensor`` views it
as a torch tensor, so no byte is copied on the consumer side. The tensors are READ-ONLY: never write into them.

With the teacher-output cache (``kdscale.teacher.cache``), a ref may instead be a ``CachedOutputRef``: the consuming
rank reads it from the cache directory (a memory map of the entry file, or a concatenation of several). ``get``
takes any mix of the two kinds, keeps their order, and fetches all Ray refs with one ``ray.get``.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from kdscale.teacher.base import TeacherOutput
from kdscale.teacher.cache import CachedOutputRef


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
        """Resolve Ray ObjectRefs (one ``ray.get``) and CachedOutputRefs (read from disk), in order."""
        import ray

        start = time.perf_counter()
        refs = list(refs)
        outputs: list[TeacherOutput | None] = [_load_cached(r) for r in refs]
        remote = [i for i, o in enumerate(outputs) if o is None]
        if remote:
            fetched = ray.get([refs[i] for i in remote], timeout=self.timeout_s)
            for i, output in zip(remote, fetched):
                outputs[i] = output
        self.last_get_seconds = time.perf_counter() - start
        self.last_get_bytes = sum(o.nbytes for o in outputs)
        return [o.as_tensor() for o in outputs]


class InProcessChannel:
    """No transport: the reference is the output itself (single-process tests and tools)."""

    last_get_seconds = 0.0
    last_get_bytes = 0

    def put(self, output: TeacherOutput) -> TeacherOutput:
        return output

    def get(self, refs: list[TeacherOutput | CachedOutputRef]) -> list[torch.Tensor]:
        start = time.perf_counter()
        outputs = [o if isinstance(o, TeacherOutput) else o.load() for o in refs]
        self.last_get_seconds = time.perf_counter() - start
        self.last_get_bytes = sum(o.nbytes for o in outputs)
        return [o.as_tensor() for o in outputs]


def _load_cached(ref: Any) -> TeacherOutput | None:
    """The output of a CachedOutputRef read from the cache; None for any other ref (a Ray ObjectRef)."""
    return ref.load() if isinstance(ref, CachedOutputRef) else None
