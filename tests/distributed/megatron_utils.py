"""Run a function in N spawned gloo processes with Megatron-Core's ``parallel_state`` initialized (CPU tests).

``run_spawned(fn, world_size, tp=..., pp=..., vpp=...)`` starts ``world_size`` processes (spawn, free port), calls
``cpu_compat.activate()``, ``initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp)`` and
``model_parallel_cuda_manual_seed(seed)``, runs ``fn(rank, *args)`` and returns every rank's (picklable) result,
in rank order. A failure on any rank raises ``RuntimeError`` carrying that rank's traceback. Importing
``megatron.core`` costs ~8 s per process: put many checks in one spawned group.

``fn`` must be importable by the children (a module-level function of a test module or of this file).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 300.0
ERROR_GRACE_S = 10.0


def _any_error(result_dir: Path, world_size: int) -> bool:
    for rank in range(world_size):
        path = result_dir / f"rank{rank}.pkl"
        if path.exists() and pickle.loads(path.read_bytes())[0] == "error":
            return True
    return False


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(
    rank: int,
    world_size: int,
    port: int,
    result_dir: str,
    fn: Callable[..., Any],
    args: tuple,
    tp: int,
    pp: int,
    vpp: int | None,
    seed: int,
) -> None:
    result_path = Path(result_dir) / f"rank{rank}.pkl"
    try:
        import torch
        import torch.distributed as dist

        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.set_num_threads(1)
        from kdscale.student.megatron import cpu_compat

        cpu_compat.activate()
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                virtual_pipeline_model_parallel_size=vpp,
            )
            model_parallel_cuda_manual_seed(seed)
            result = ("ok", fn(rank, *args))
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
    except BaseException as exc:  # report everything, including KeyboardInterrupt/SystemExit in the child
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    try:
        payload = pickle.dumps(result)
    except Exception as exc:
        payload = pickle.dumps(("error", f"rank {rank}: result is not picklable: {exc!r}"))
    tmp = result_path.with_suffix(".tmp")
    tmp.write_bytes(payload)
    tmp.rename(result_path)


def run_spawned(
    fn: Callable[..., Any],
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    args: tuple = (),
    seed: int = 1234,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world_size`` gloo ranks with Megatron model parallelism; results in rank order."""
    import torch.multiprocessing as mp

    if world_size % (tp * pp):
        raise ValueError(f"world_size ({world_size}) must be a multiple of tp ({tp}) x pp ({pp})")
    with tempfile.TemporaryDirectory(prefix="kd-megatron-") as result_dir:
        context = mp.start_processes(
            _child,
            args=(world_size, free_port(), result_dir, fn, args, tp, pp, vpp, seed),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        failed_at = None
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"spawned Megatron ranks did not finish within {timeout_s:.0f} s")
                # A failed rank leaves the others blocked in collectives: give them a grace period, then stop.
                if failed_at is None and _any_error(Path(result_dir), world_size):
                    failed_at = time.monotonic()
                if failed_at is not None and time.monotonic() - failed_at > ERROR_GRACE_S:
                    break
        except mp.ProcessRaisedException as exc:  # pragma: no cover - _child catches everything
            raise RuntimeError(str(exc)) from None
        except mp.ProcessExitedException:
            pass  # a rank died without writing a result (e.g. killed): reported below
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            for process in context.processes:
                process.join(5)
        results, errors = [], []
        for rank in range(world_size):
            path = Path(result_dir) / f"rank{rank}.pkl"
            if not path.exists():
                errors.append(f"rank {rank}: exited without a result (exit code {context.processes[rank].exitcode})")
                results.append(None)
                continue
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                errors.append(value)
                results.append(None)
            else:
                results.append(value)
        if errors:
            raise RuntimeError("spawned Megatron ranks failed:\n" + "\n".join(errors))
        return results
