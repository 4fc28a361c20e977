"""Ray actors: teacher replicas and student ranks.

``TeacherReplica`` wraps a TeacherEngine; its ``forward`` puts the ``TeacherOutput`` into the object store (always
shared memory: a plain return value under ~100 KiB would be inlined and copied) and returns the ref to route. ``StudentRank`` wraps one rank of a StudentBackend: the ranks of a run form one torch.distributed
group (gloo on CPU, NCCL on GPU), and each resolves the refs of the data-parallel shard it consumes itself, through
the channel, so the hidden states are mapped from shared memory where they were produced.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import ray

from kdscale.data.batch import kd_token_kwargs


def _set_threads(num_threads: int | None) -> None:
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
        os.environ["OMP_NUM_THREADS"] = str(num_threads)


@ray.remote(num_cpus=0, concurrency_groups={"health": 1})
class TeacherReplica:
    """One teacher engine in its own process. ``ping`` runs in its own thread (concurrency group "health"), so a
    health check answers while a forward is running."""

    def __init__(self, engine: str, engine_kwargs: dict[str, Any], num_threads: int | None = None):
        from kdscale.observability.logging import quiet_third_party

        quiet_third_party()
        _set_threads(num_threads)
        from kdscale.teacher import build_teacher_engine
        from kdscale.transport.channel import RayObjectStoreChannel

        self.engine = build_teacher_engine(engine, **engine_kwargs)
        self.channel = RayObjectStoreChannel()

    def start(self) -> dict[str, Any]:
        """Load the model; returns the hidden size, this actor's node id and pid."""
        self.engine.start()
        return {"hidden_size": self.engine.hidden_size, "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid()}

    def forward(self, micro_batch, cache_spec=None) -> dict[str, Any]:
        """Hidden states of one micro-batch's prediction positions, put in the object store (and written to the
        teacher-output cache when ``cache_spec`` is given); returns the ref and what it cost."""
        start = time.perf_counter()
        try:
            output = self.engine.forward(micro_batch)
        except Exception as exc:
            if getattr(exc, "dead", False):  # the engine's processes are gone: let the pool restart this replica
                import sys

                print(f"teacher engine died: {exc}; exiting so that the replica is restarted", file=sys.stderr)
                self.engine.shutdown()
                os._exit(1)
            raise
        seconds = time.perf_counter() - start
        cache_bytes = 0
        if cache_spec is not None:
            from kdscale.teacher.cache import store_output

            cache_bytes = store_output(cache_spec, micro_batch, output)
        return {"ref": self.channel.put(output), "seconds": seconds, "num_tokens": micro_batch.num_tokens,
                "nbytes": output.nbytes, "cache_bytes": cache_bytes}

    @ray.method(concurrency_group="health")
    def ping(self) -> dict[str, Any]:
        """The engine's health (``{"healthy": bool, ...}``); engines without a check are healthy while alive."""
        health = getattr(self.engine, "health", None)
        return health() if callable(health) else {"healthy": True}

    def sleep(self) -> None:
        """Release the engine's accelerator memory until ``wake`` (engines without it: nothing to do)."""
        if hasattr(self.engine, "sleep"):
            self.engine.sleep()

    def wake(self) -> None:
        if hasattr(self.engine, "wake"):
            self.engine.wake()

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        self.engine.shutdown()


@ray.remote(num_cpus=0)
class StudentRank:
    """One rank of the student backend; all ranks form one torch.distributed process group."""

    def __init__(self, rank: int, world_size: int, num_threads: int | None = None, device: str = "cpu"):
        from kdscale.observability.logging import quiet_third_party

        quiet_third_party()
        _set_threads(num_threads)
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.backend = None
        self.channel = None
        self.record_digests = False  # on-policy runs record what each sample trained on (ledger.jsonl)

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port (rank 0 hosts the process-group rendezvous)."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind(("", 0))
            return ip, sock.getsockname()[1]

    def setup(
        self,
        *,
        master_addr: str,
        master_port: int,
        backend: str,
        backend_kwargs: dict[str, Any],
        teacher_model_dir: str,
        timeout_s: float,
        record_digests: bool = False,
    ) -> dict[str, Any]:
        """Join the process group, read the teacher head from its checkpoint files, build the backend."""
        import datetime

        import torch
        import torch.distributed as dist

        from kdscale.checkpoint.hf_io import read_output_head
        from kdscale.student import build_student_backend
        from kdscale.transport.channel import RayObjectStoreChannel

        self.record_digests = record_digests
        os.environ["MASTER_ADDR"] = master_addr
        os.environ["MASTER_PORT"] = str(master_port)
        if self.device == "cuda":
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        dist.init_process_group(
            backend="nccl" if self.device == "cuda" else "gloo",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        teacher_head = read_output_head(teacher_model_dir, dtype=torch.float32)  # the backend casts it
        self.backend = build_student_backend(backend, teacher_head=teacher_head, device=self.device, **backend_kwargs)
        self.backend.setup()
        self.channel = RayObjectStoreChannel(timeout_s=timeout_s)
        return {
            "layout": self.backend.layout(),
            "dp_rank": self.backend.dp_rank,
            "consumes_teacher_outputs": getattr(self.backend, "consumes_teacher_outputs", True),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def train_step(self, micro_batches: list, teacher_refs: list, global_num_loss_tokens: int,
                   global_num_kd_tokens: int | None = None) -> dict[str, Any]:
        """Resolve this shard's teacher refs (zero-copy), run one optimizer step, return its metrics.

        If any rank of the group cannot resolve its refs (a teacher replica died after producing them), no rank
        trains: each returns ``{"lost": [indices of its unreadable refs]}`` and the driver re-sends that work."""
        teacher_hidden, lost = self._resolve(teacher_refs)
        if teacher_hidden is None:
            return {"lost": lost}
        start = time.perf_counter()
        metrics = self.backend.train_step(
            micro_batches, teacher_hidden, global_num_loss_tokens=global_num_loss_tokens,
            **kd_token_kwargs(global_num_kd_tokens),
        )
        out = _as_dict(metrics)
        out["student_s"] = time.perf_counter() - start
        out["transfer_s"] = self.channel.last_get_seconds
        out["transfer_bytes"] = self.channel.last_get_bytes
        out["sample_ids"] = [i for mb in micro_batches for i in mb.sample_ids]
        if self.record_digests:
            from kdscale.data.batch import sample_digests

            out["sample_digests"] = [d for mb in micro_batches for d in sample_digests(mb)]
        return out

    def hf_state_dict(self) -> Any:
        """The student's full weights by Hugging Face name on rank 0 (None elsewhere); every rank must call."""
        return self.backend.hf_state_dict()

    def evaluate(self, micro_batches: list, teacher_refs: list, global_num_loss_tokens: int,
                 global_num_kd_tokens: int | None = None) -> dict[str, Any]:
        """Held-out loss and KL; ``{"lost": [...]}`` as in ``train_step`` when refs are unreadable."""
        teacher_hidden, lost = self._resolve(teacher_refs)
        if teacher_hidden is None:
            return {"lost": lost}
        return self.backend.evaluate(micro_batches, teacher_hidden, global_num_loss_tokens=global_num_loss_tokens,
                                     **kd_token_kwargs(global_num_kd_tokens))

    def _resolve(self, refs: list) -> tuple[list | None, list[int]]:
        """The refs' tensors, or (None, indices of the unreadable refs) if ANY rank of the group failed (all ranks
        agree through one all-reduce, so that none enters the step's collectives alone)."""
        import torch
        import torch.distributed as dist

        hidden, lost = None, []
        try:
            hidden = self.channel.get(refs)
        except Exception:  # noqa: BLE001 - a lost object (RayError) or an unreadable cache entry
            for index, ref in enumerate(refs):
                try:
                    self.channel.get([ref])
                except Exception:  # noqa: BLE001
                    lost.append(index)
        ok = torch.tensor([0 if hidden is None else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return (hidden, []) if int(ok.item()) == 1 else (None, lost)

    def save(self, path: str) -> None:
        self.backend.save(path)

    def load(self, path: str) -> None:
        self.backend.load(path)

    def export_hf(self, path: str) -> None:
        self.backend.export_hf(path)

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _as_dict(metrics: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(metrics) if is_dataclass(metrics) else dict(metrics)


@ray.remote(num_cpus=0)
class RolloutWorker:
    """A rollout engine (``kdscale.algorithms.rollout``) holding the student's current weights: on-policy samples."""

    def __init__(self, engine: str, engine_kwargs: dict[str, Any], num_threads: int | None = None):
        from kdscale.observability.logging import quiet_third_party

        quiet_third_party()
        _set_threads(num_threads)
        from kdscale.algorithms import rollout

        engines = {"hf": rollout.HFRolloutEngine, "sglang": rollout.SGLangRolloutEngine}
        if engine not in engines:
            raise ValueError(f"unknown rollout engine {engine!r}; choose one of {sorted(engines)}")
        self.engine = engines[engine](**engine_kwargs)

    def start(self) -> dict[str, Any]:
        self.engine.start()
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def update_weights(self, state: dict, version: int, bucket_bytes: int) -> float:
        """Load ``state`` (HF names -> tensors); returns the seconds it took."""
        start = time.perf_counter()
        self.engine.update_weights(state.items(), version=version, bucket_bytes=bucket_bytes)
        return time.perf_counter() - start

    def generate(self, prompts: list, params: dict[str, Any]) -> dict[str, Any]:
        from kdscale.algorithms.rollout import SamplingConfig

        start = time.perf_counter()
        rollouts = self.engine.generate(prompts, SamplingConfig(**params))
        return {"rollouts": rollouts, "seconds": time.perf_counter() - start}

    def state_dict(self) -> dict:
        """The engine's current weights by HF name (tests compare them with the student's; hf engine)."""
        return self.engine.state_dict()

    def weight_version(self) -> int | None:
        return self.engine.weight_version

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        self.engine.shutdown()
