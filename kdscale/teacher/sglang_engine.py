"""Teacher engine ``sglang``: an offline ``sglang.Engine`` returning final-norm hidden states as numpy arrays.

How the hidden states travel:
- Each sample of a micro-batch is one request of token ids (never text; the engine runs with
  ``skip_tokenizer_init``) with ``max_new_tokens=1``: SGLang 0.5.23 returns NO hidden states for
  ``max_new_tokens=0`` (the request finishes before its prefill output is committed), and with 1 the prefill is
  the only forward (the one sampled token needs no decode step).
- Stock SGLang turns the prefill hidden states into Python float lists in the scheduler process
  (``SchedulerBatchResultProcessor._append_prefill_hidden_states``), which costs about 0.8 s per 4M values and
  pickles floats. The scheduler process runs :func:`run_scheduler_process_with_array_hidden_states`, which
  replaces that one method with :func:`_append_prefill_hidden_states_as_array`: the rows go out as one numpy
  array per request (bf16 as int16 bits, no conversion). The hook is checked before the engine starts
  (:func:`check_sglang`); an SGLang without it is refused with a clear error, never silently converted.
- The actor slices the prediction positions of the loss mask and puts the rows in the Ray object store. The row
  count is checked against the prompt length (a prefix-cache hit or a chunked prefill drops rows): the radix cache
  is off because cached prefixes are not recomputed, and chunked prefill is off because SGLang 0.5.23 returns
  only the last chunk's rows (measured: 8 rows for a 200-token prompt in chunks of 64).

Lifecycle: every wait has a timeout (start, each request, health, shutdown); ``shutdown`` stops the engine's
processes and removes the shared-memory files SGLang leaves in /dev/shm; ``sleep``/``wake`` release and resume
the engine's GPU memory (``release_memory_occupation``) for colocated placement.

CPU: SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) runs Llama/Qwen2 with torch-native kernels. SGLang cannot
be installed as packaged without CUDA; ``tools/dev/install_sglang_cpu.sh`` installs it ``--no-deps`` with the
subset it needs, and ``KDSCALE_SGLANG_SHIMS`` names a directory of import-only stand-ins for two GPU-only
packages (tools/dev/sglang_cpu_shims), put on the engine processes' path only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdscale.checkpoint.hf_io import hidden_size, read_model_config, resolve_model_path
from kdscale.data.batch import MicroBatch, sample_spans
from kdscale.teacher.base import _TRANSPORT_DTYPES, TeacherOutput

logger = logging.getLogger(__name__)

# The SGLang releases this integration is written and tested against (the patched method's signature is checked
# at start, so a release that moved it fails loudly).
SUPPORTED_SGLANG = (">=0.5.23", "<0.6")
_MIN_VERSION, _MAX_VERSION = (0, 5, 23), (0, 6, 0)
_PATCH_TARGET = "sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
_PATCH_METHOD = "_append_prefill_hidden_states"
_PATCH_PARAMS = ("req", "logits_output", "hidden_state_offset", "capture_hidden_mode", "extend_input_len", "store")

# Engine arguments kdscale sets itself: passing them through teacher.engine_args is an error.
_OWNED_ARGS = {
    "model_path": "teacher.model_path", "device": "teacher.device", "dtype": "teacher.dtype",
    "tp_size": "teacher.tp_size", "dp_size": "teacher.dp_size", "ep_size": "teacher.ep_size",
    "mem_fraction_static": "teacher.mem_fraction_static", "quantization": "teacher.quantization",
    "kv_cache_dtype": "teacher.kv_cache_dtype", "enable_return_hidden_states": "(always on)",
    "skip_tokenizer_init": "(always on: requests carry token ids)",
    "disable_radix_cache": "(always on: a cached prefix returns no hidden states)",
    "chunked_prefill_size": "(always off: SGLang 0.5.23 returns the hidden states of a chunked prompt's last chunk only)",
    "enable_memory_saver": "teacher.sleep_between_steps", "trust_remote_code": "(always off)",
}
_DTYPES = ("bfloat16", "float16", "float32")
CPU_DEFAULT_MAX_TOTAL_TOKENS = 32768  # KV-cache tokens of the CPU engine unless configured
_SHM_DIR = Path("/dev/shm")


class SGLangUnavailableError(RuntimeError):
    """SGLang is missing, of an unsupported version, or lacks the hook kdscale patches."""


class TeacherEngineError(RuntimeError):
    """The engine failed or stopped answering; ``dead`` means its processes are gone (restart the replica)."""

    def __init__(self, message: str, *, dead: bool = False) -> None:
        super().__init__(message)
        self.dead = dead


# --------------------------------------------------------------------------------------------- installation


def prepare_cpu_environment() -> None:
    """Environment SGLang's CPU engine needs, set before sglang is imported (inherited by its processes)."""
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    shims = os.environ.get("KDSCALE_SGLANG_SHIMS")
    if shims:
        if not Path(shims).is_dir():
            raise SGLangUnavailableError(
                f"KDSCALE_SGLANG_SHIMS={shims!r} is not a directory: point it at tools/dev/sglang_cpu_shims or unset it"
            )
        if shims not in sys.path:
            sys.path.insert(0, shims)
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if shims not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([shims, *[p for p in paths if p]])


def _version_tuple(version: str) -> tuple[int, ...]:
    import re

    parts = []
    for piece in version.split(".")[:3]:
        digits = re.match(r"\d*", piece).group()  # leading digits: "0rc1" -> 0
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_sglang(*, device: str = "cuda") -> str:
    """Import SGLang and check its version and the patched hook; returns the version. Raises
    :class:`SGLangUnavailableError` naming the problem and the fix."""
    if device == "cpu":
        prepare_cpu_environment()
    try:
        import importlib.metadata

        version = importlib.metadata.version("sglang")
    except Exception as exc:  # noqa: BLE001 - PackageNotFoundError and broken metadata alike
        raise SGLangUnavailableError(
            "teacher.engine=sglang needs SGLang "
            f"{','.join(SUPPORTED_SGLANG)}: on a GPU machine `pip install 'sglang{','.join(SUPPORTED_SGLANG)}'`; on a "
            "CPU-only machine run tools/dev/install_sglang_cpu.sh (see README)"
        ) from exc
    if not _MIN_VERSION <= _version_tuple(version) < _MAX_VERSION:
        raise SGLangUnavailableError(
            f"SGLang {version} is installed; kdscale supports {','.join(SUPPORTED_SGLANG)} (it patches SGLang's "
            f"prefill result path, {_PATCH_TARGET}.{_PATCH_METHOD}): install a supported version"
        )
    try:
        processor = _import_attr(_PATCH_TARGET)
        from sglang.srt.entrypoints.engine import Engine  # noqa: F401
    except ImportError as exc:
        hint = (
            " (CPU: run tools/dev/install_sglang_cpu.sh and export KDSCALE_SGLANG_SHIMS=<repo>/tools/dev/sglang_cpu_shims)"
            if device == "cpu" else ""
        )
        raise SGLangUnavailableError(f"SGLang {version} does not import: {exc}{hint}") from exc
    method = getattr(processor, _PATCH_METHOD, None)
    params = tuple(inspect.signature(method).parameters) if method is not None else ()
    if method is None or any(name not in params for name in _PATCH_PARAMS):
        raise SGLangUnavailableError(
            f"SGLang {version} has no {_PATCH_TARGET}.{_PATCH_METHOD}({', '.join(_PATCH_PARAMS)}), the prefill result "
            f"hook kdscale patches to return hidden states as arrays: install SGLang {','.join(SUPPORTED_SGLANG)}"
        )
    return version


def _import_attr(dotted: str) -> Any:
    import importlib

    module_name, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


# ---------------------------------------------------------------------------- the scheduler-process patch


def _tensor_to_array(rows: torch.Tensor) -> np.ndarray:
    """[n, H] tensor -> numpy on the CPU without a float conversion: bf16 as int16 bits, others as they are."""
    rows = rows.detach().to("cpu").contiguous()
    if rows.dtype == torch.bfloat16:
        return rows.view(torch.int16).numpy().copy()
    return rows.numpy().copy()


def _append_prefill_hidden_states_as_array(
    self: Any,
    *,
    req: Any,
    logits_output: Any,
    hidden_state_offset: int,
    capture_hidden_mode: Any,
    extend_input_len: int,
    store: bool = True,
) -> int:
    """Replacement of ``SchedulerBatchResultProcessor._append_prefill_hidden_states`` (SGLang 0.5.23): the
    full-prefill rows of a request are appended as ONE numpy array (not a nested float list). Other capture modes
    ("last") keep SGLang's own behaviour."""
    if not capture_hidden_mode.is_full() or req.return_hidden_states is not True:
        return _ORIGINAL_APPEND(
            self, req=req, logits_output=logits_output, hidden_state_offset=hidden_state_offset,
            capture_hidden_mode=capture_hidden_mode, extend_input_len=extend_input_len, store=store,
        )
    start, stop = hidden_state_offset, hidden_state_offset + extend_input_len
    if store:
        req.hidden_states.append(_tensor_to_array(logits_output.hidden_states[start:stop]))
    return stop


_ORIGINAL_APPEND: Any = None


def install_array_hidden_states_patch() -> None:
    """Patch the prefill result path in THIS process (the scheduler's); idempotent."""
    global _ORIGINAL_APPEND
    processor = _import_attr(_PATCH_TARGET)
    current = getattr(processor, _PATCH_METHOD)
    if current is _append_prefill_hidden_states_as_array:
        return
    _ORIGINAL_APPEND = current
    setattr(processor, _PATCH_METHOD, _append_prefill_hidden_states_as_array)


def run_scheduler_process_with_array_hidden_states(*args: Any, **kwargs: Any) -> Any:
    """SGLang's scheduler process entry point, with the array patch installed first (runs in the child)."""
    if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
        prepare_cpu_environment()
    install_array_hidden_states_patch()
    from sglang.srt.managers.scheduler import run_scheduler_process

    return run_scheduler_process(*args, **kwargs)


def prefill_rows(hidden_states: Any, prompt_len: int) -> np.ndarray:
    """The [prompt_len, H] prefill rows of one request's ``meta_info["hidden_states"]`` (as patched).

    The prefill comes as one array (or, if SGLang ever prefills a request in chunks, one array per chunk, in
    order); decode steps would follow as lists and are ignored. Raises if the rows do not cover the prompt.
    """
    if not hidden_states:
        raise TeacherEngineError(
            "SGLang returned no hidden states for a request: was it sent with max_new_tokens=0 (SGLang 0.5.23 "
            "returns none then), or does the server lack enable_return_hidden_states?"
        )
    pieces = []
    for piece in hidden_states:
        if not isinstance(piece, np.ndarray):
            if not pieces:
                raise TeacherEngineError(
                    "SGLang returned hidden states as Python lists: the array patch of the scheduler process is not "
                    f"active ({_PATCH_TARGET}.{_PATCH_METHOD}); start the engine through SGLangTeacherEngine"
                )
            break  # decode-step rows follow the prefill
        pieces.append(piece)
    rows = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    if rows.ndim != 2 or rows.shape[0] != prompt_len:
        raise TeacherEngineError(
            f"SGLang returned {rows.shape[0] if rows.ndim == 2 else rows.shape} prefill hidden-state rows for a "
            f"prompt of {prompt_len} tokens: every prompt position is needed (is a prefix cache on? kdscale turns "
            "SGLang's radix cache off; do not re-enable it through teacher.engine_args)"
        )
    return rows


# ------------------------------------------------------------------------------------------------ the engine


class SGLangTeacherEngine:
    """A TeacherEngine running ``sglang.Engine`` in this process (its scheduler/detokenizer in child processes).

    Args:
        model_path: an HF model directory (config.json + safetensors).
        dtype: weights and compute dtype ("bfloat16", "float16" or "float32").
        transport_dtype: dtype of the returned rows, "bfloat16" (int16 bits) or "float32".
        device: "cuda" or "cpu" (SGLang's CPU engine).
        tp_size, dp_size, ep_size: SGLang's parallel sizes inside this engine.
        mem_fraction_static, quantization, kv_cache_dtype: SGLang's arguments of those names.
        engine_args: any other ``sglang.srt.server_args.ServerArgs`` field (checked at start).
        enable_memory_saver: needed on GPUs for :meth:`sleep` / :meth:`wake` to free memory.
        num_threads: CPU engine: OpenMP threads of the scheduler (bound to cores 0..n-1).
        startup_timeout_s: longest wait for the engine to start.
        request_timeout_s: longest wait for one micro-batch's hidden states.
        seed: SGLang's random seed.
    """

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str],
        dtype: str = "bfloat16",
        transport_dtype: str = "bfloat16",
        device: str = "cuda",
        tp_size: int = 1,
        dp_size: int = 1,
        ep_size: int = 1,
        mem_fraction_static: float | None = None,
        quantization: str | None = None,
        kv_cache_dtype: str = "auto",
        engine_args: dict[str, Any] | None = None,
        enable_memory_saver: bool = False,
        num_threads: int | None = None,
        startup_timeout_s: float = 900.0,
        request_timeout_s: float = 600.0,
        seed: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"sglang teacher dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        if transport_dtype not in _TRANSPORT_DTYPES:
            raise ValueError(f"transport_dtype must be one of {sorted(_TRANSPORT_DTYPES)}, got {transport_dtype!r}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"sglang teacher device must be 'cpu' or 'cuda', got {device!r}")
        engine_args = dict(engine_args or {})
        owned = sorted(set(engine_args) & set(_OWNED_ARGS))
        if owned:
            raise ValueError(
                "teacher.engine_args sets " + ", ".join(f"{k} (use {_OWNED_ARGS[k]})" for k in owned)
                + ": kdscale sets these itself; remove them from engine_args"
            )
        path = resolve_model_path(model_path)
        if not path.is_dir():
            raise ValueError(f"sglang teacher model_path {os.fspath(model_path)!r} must be an HF model directory")
        self.model_path = path
        self.dtype = dtype
        self.transport_dtype = transport_dtype
        self.device = device
        self.num_threads = num_threads
        self.startup_timeout_s = startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self._hidden_size = hidden_size(read_model_config(path))
        self._kwargs: dict[str, Any] = {
            "model_path": str(path), "device": device, "dtype": dtype, "tp_size": tp_size, "dp_size": dp_size,
            "ep_size": ep_size, "kv_cache_dtype": kv_cache_dtype, "enable_return_hidden_states": True,
            "skip_tokenizer_init": True, "disable_radix_cache": True, "trust_remote_code": False,
            "random_seed": seed, "log_level": "error", "chunked_prefill_size": -1,
        }
        if device == "cpu":
            # The CPU engine would size its KV cache from the machine's RAM (16 GB on a 24 GB machine for a 135M
            # model) and its scheduler would spin a core while idle, i.e. while the student trains.
            # Its own default fraction goes negative without chunked prefill, hence an explicit one; the KV cache
            # is then capped by max_total_tokens.
            self._kwargs["sleep_on_idle"] = True
            if mem_fraction_static is None:
                self._kwargs["mem_fraction_static"] = 0.5
                if "max_total_tokens" not in engine_args:
                    self._kwargs["max_total_tokens"] = CPU_DEFAULT_MAX_TOTAL_TOKENS
        if mem_fraction_static is not None:
            self._kwargs["mem_fraction_static"] = mem_fraction_static
        if quantization is not None:
            self._kwargs["quantization"] = quantization
        if enable_memory_saver:
            self._kwargs["enable_memory_saver"] = True
        self._kwargs.update(engine_args)
        self._engine: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._shm_paths: list[Path] = []
        self._start_semaphores: set[str] = set()  # sem.mp-* files that appeared while the engine started
        self._marker: Path | None = None  # lists those files for sweep_dead_engine_files if this process dies
        self._children: list[Any] = []  # psutil.Process of the engine's processes
        self.version: str | None = None
        self.asleep = False

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def started(self) -> bool:
        return self._engine is not None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the engine (idempotent); raises if it is not up within ``startup_timeout_s``."""
        if self._engine is not None:
            return
        self.version = check_sglang(device=self.device)
        from sglang.srt.entrypoints.engine import Engine
        from sglang.srt.server_args import ServerArgs

        known = {f.name for f in dataclasses.fields(ServerArgs)} if dataclasses.is_dataclass(ServerArgs) else None
        if known is None:
            known = set(getattr(ServerArgs, "__struct_fields__", ()))  # msgspec.Struct in 0.5.23
        unknown = sorted(k for k in self._kwargs if known and k not in known)
        if unknown:
            raise ValueError(
                f"teacher.engine_args has {unknown}, not arguments of SGLang {self.version}'s ServerArgs: check the "
                "names against `python -m sglang.launch_server --help`"
            )
        if self.device == "cpu" and self.num_threads:
            os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", f"0-{self.num_threads - 1}"
                                  if self.num_threads > 1 else "0")
        engine_cls = type(
            "KDScaleSGLangEngine", (Engine,),
            {"run_scheduler_process_func": staticmethod(run_scheduler_process_with_array_hidden_states)},
        )
        # The engine's processes register their named semaphores with THIS process's resource tracker only if it
        # runs before they spawn; otherwise each starts its own, SGLang's teardown SIGKILLs it, and the semaphores
        # stay in /dev/shm. Started here and spared at shutdown, it unlinks them when this process exits.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        sweep_dead_engine_files()
        before = {p.pid for p in _engine_children()}
        shm_before = _shm_names()
        # SGLang's child processes die with the THREAD that started them (PR_SET_PDEATHSIG), so one long-lived
        # thread owns the engine: it starts it, runs every call on the engine's event loop, and shuts it down.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sglang-engine")
        started = time.monotonic()
        future = self._executor.submit(engine_cls, **self._kwargs)
        try:
            engine = future.result(timeout=self.startup_timeout_s)
        except FutureTimeout as exc:
            self._abandon(before)
            raise TeacherEngineError(
                f"SGLang engine not up after teacher.startup_timeout_s={self.startup_timeout_s:.0f}s: raise it for big "
                "models, or look for the scheduler's error above"
            ) from exc
        except Exception as exc:
            self._abandon(before)
            raise TeacherEngineError(f"SGLang engine failed to start: {exc}") from exc
        self._engine = engine
        self._children = [p for p in _engine_children() if p.pid not in before]
        self._start_semaphores = {n for n in _shm_names() - shm_before if n.startswith("sem.mp-")}
        instance_id = getattr(getattr(self._engine, "port_args", None), "instance_id", "")
        if instance_id:
            from sglang.srt.managers.load_snapshot import shm_path_for

            self._shm_paths.append(Path(shm_path_for(instance_id)))
        self._marker = _write_marker(self._shm_paths, self._start_semaphores)
        logger.info(f"sglang {self.version} teacher up in {time.monotonic() - started:.0f}s: {self.model_path} "
                    f"({self.dtype}, {self.device}, tp={self._kwargs['tp_size']} dp={self._kwargs['dp_size']})")

    def shutdown(self) -> None:
        """Stop the engine's processes and remove its /dev/shm files (idempotent, bounded in time)."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        future = self._executor.submit(_shutdown_engine, engine, list(self._children))
        try:
            future.result(timeout=90)
        except FutureTimeout:
            logger.warning("SGLang engine shutdown did not finish within 90s; killing its processes")
        except Exception as exc:  # noqa: BLE001 - teardown goes on: the processes are killed below
            logger.warning(f"SGLang engine shutdown failed ({exc!r}); killing its processes")
        self._finish_teardown()

    def _abandon(self, before: set[int]) -> None:
        """Kill the processes of an engine that failed to start."""
        self._children = [p for p in _engine_children() if p.pid not in before and p.pid != _tracker_pid()]
        self._finish_teardown()

    def _finish_teardown(self) -> None:
        for proc in self._children:  # anything SGLang's own teardown missed
            _kill(proc)
        for path in self._shm_paths:
            path.unlink(missing_ok=True)
        _remove_dead_semaphores(self._start_semaphores)
        if self._marker is not None:
            self._marker.unlink(missing_ok=True)
        self._children, self._shm_paths, self._start_semaphores, self._marker = [], [], set(), None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ------------------------------------------------------------------ health, sleep, wake

    def health(self) -> dict[str, Any]:
        """Whether the engine's processes are alive and its tokenizer manager reports healthy (no request sent:
        safe to call from another thread while a forward runs)."""
        if self._engine is None:
            return {"healthy": False, "reason": "not started"}
        dead = [p.pid for p in self._children if not _alive(p)]
        if dead:
            return {"healthy": False, "reason": f"engine process(es) {dead} exited"}
        manager = getattr(self._engine, "tokenizer_manager", None)
        # The offline Engine never marks itself "Up" (the HTTP server's warm-up does), so only an exit or an
        # "UnHealthy" mark counts.
        status = str(getattr(manager, "server_status", ""))
        if getattr(manager, "gracefully_exit", False) or status.lower().endswith("unhealthy"):
            return {"healthy": False, "reason": f"SGLang reports the engine shutting down or unhealthy ({status})"}
        return {"healthy": True, "asleep": self.asleep, "processes": len(self._children)}

    def sleep(self) -> None:
        """Release the weights and KV cache (GPU memory) until :meth:`wake` (a no-op in SGLang's CPU engine)."""
        self._require_started("sleep")
        if not self.asleep:
            self._run(lambda e: e.tokenizer_manager.release_memory_occupation(_memory_req(release=True), None),
                      what="release_memory_occupation")
            self.asleep = True

    def wake(self) -> None:
        """Resume what :meth:`sleep` released."""
        self._require_started("wake")
        if self.asleep:
            self._run(lambda e: e.tokenizer_manager.resume_memory_occupation(_memory_req(release=False), None),
                      what="resume_memory_occupation")
            self.asleep = False

    # ------------------------------------------------------------------ forward

    def forward(self, micro_batch: MicroBatch) -> TeacherOutput:
        """Final-norm hidden states at the prediction positions: [micro_batch.num_loss_tokens, H]."""
        self._require_started("forward")
        if self.asleep:
            self.wake()
        input_ids = micro_batch.input_ids.to(torch.long)
        loss_mask = micro_batch.loss_mask.bool()
        prompts, targets = [], []
        for row, start, stop in sample_spans(micro_batch):
            target = loss_mask[row, start + 1 : stop]
            if bool(target.any()):
                prompts.append(input_ids[row, start:stop].tolist())
                targets.append(target.numpy())
        expected = micro_batch.num_loss_tokens
        if not prompts:
            if expected:
                raise ValueError(f"micro-batch has {expected} loss tokens outside every sample span")
            return TeacherOutput.from_tensor(torch.empty(0, self._hidden_size), self.transport_dtype)
        outputs = self.generate_hidden_states(prompts)
        parts = [rows[:-1][target] for rows, target in zip(outputs, targets)]
        array = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if array.shape != (expected, self._hidden_size):
            raise TeacherEngineError(
                f"sglang teacher produced {array.shape[0]} rows of size {array.shape[1]} but the loss mask has "
                f"{expected} prediction positions of hidden size {self._hidden_size}"
            )
        return self._to_output(array)

    def generate_hidden_states(self, prompts: list[list[int]]) -> list[np.ndarray]:
        """Prefill hidden states [len(prompt), H] of each prompt (int16 bf16 bits, float16 or float32)."""
        obj = _generate_request(prompts)
        out = self._run(lambda e: e.tokenizer_manager.generate_request(obj, None).__anext__(), what="generate")
        if isinstance(out, dict):
            out = [out]
        if len(out) != len(prompts):
            raise TeacherEngineError(f"SGLang answered {len(out)} of {len(prompts)} requests")
        return [prefill_rows(o["meta_info"].get("hidden_states"), len(p)) for o, p in zip(out, prompts)]

    def _to_output(self, array: np.ndarray) -> TeacherOutput:
        if array.dtype == np.int16:  # bf16 bits
            if self.transport_dtype == "bfloat16":
                return TeacherOutput(array=np.ascontiguousarray(array), dtype="bfloat16")
            tensor = torch.from_numpy(array).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(array)
        return TeacherOutput.from_tensor(tensor, self.transport_dtype)

    # ------------------------------------------------------------------ internals

    def _require_started(self, what: str) -> None:
        if self._engine is None:
            raise RuntimeError(f"SGLangTeacherEngine.{what} called before start(); call engine.start() first")

    def _run(self, make_coroutine: Any, *, what: str) -> Any:
        """Run one engine call on the engine's thread and event loop, bounded by ``request_timeout_s``."""
        engine, timeout = self._engine, self.request_timeout_s

        def call() -> Any:
            return engine.loop.run_until_complete(asyncio.wait_for(make_coroutine(engine), timeout))

        future = self._executor.submit(call)
        try:
            return future.result(timeout=timeout + 10)
        except (FutureTimeout, asyncio.TimeoutError) as exc:
            status = self.health()
            raise TeacherEngineError(
                f"SGLang {what} did not answer within teacher.request_timeout_s={timeout:.0f}s "
                f"({'engine healthy: raise the timeout' if status['healthy'] else status['reason']})",
                dead=not status["healthy"],
            ) from exc
        except TeacherEngineError:
            raise
        except Exception as exc:
            status = self.health()
            raise TeacherEngineError(f"SGLang {what} failed: {exc!r}", dead=not status["healthy"]) from exc


def _generate_request(prompts: list[list[int]]) -> Any:
    from sglang.srt.managers.io_struct import GenerateReqInput

    params = {"max_new_tokens": 1, "temperature": 0.0}  # 0 returns no hidden states in SGLang 0.5.23
    return GenerateReqInput(
        input_ids=prompts, sampling_params=[dict(params) for _ in prompts], return_hidden_states=True,
    )


def _memory_req(*, release: bool) -> Any:
    from sglang.srt.managers.io_struct import ReleaseMemoryOccupationReqInput, ResumeMemoryOccupationReqInput

    return ReleaseMemoryOccupationReqInput(tags=None) if release else ResumeMemoryOccupationReqInput(tags=None)


def _engine_children() -> list[Any]:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill(proc: Any) -> None:
    import psutil

    try:
        proc.kill()
        proc.wait(timeout=10)
    except (psutil.Error, psutil.TimeoutExpired):
        pass


def _shm_names() -> set[str]:
    try:
        return set(os.listdir(_SHM_DIR))
    except OSError:
        return set()


def _remove_dead_semaphores(names: set[str]) -> None:
    """Unlink the named semaphores that appeared while the engine started, except those still held by this process
    (their own finalizers unlink them): the rest belonged to the engine's processes, which SGLang kills with
    SIGKILL, so nothing else would ever remove them from /dev/shm."""
    import gc
    from multiprocessing.synchronize import SemLock

    held = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on lazily deprecated module attributes warns
        locks = [obj for obj in gc.get_objects() if isinstance(obj, SemLock)]
    for lock in locks:
        name = getattr(lock._semlock, "name", None)
        if name:
            held.add("sem." + name.lstrip("/"))
    for name in names - held:
        (_SHM_DIR / name).unlink(missing_ok=True)


def _marker_dir() -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / "kdscale-sglang-engines"


def _write_marker(shm_paths: list[Path], semaphores: set[str]) -> Path:
    """Record this engine's /dev/shm files under the owning process's pid (removed at a clean shutdown)."""
    import json

    directory = _marker_dir()
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / f"{os.getpid()}-{time.time_ns()}.json"
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "files": [str(p) for p in shm_paths]
                               + [str(_SHM_DIR / n) for n in sorted(semaphores)]}))
    tmp.replace(marker)
    return marker


def sweep_dead_engine_files() -> int:
    """Remove the /dev/shm files of kdscale SGLang engines whose owning process died without a clean shutdown
    (a replica killed by SIGKILL, or ended by SGLang's watchdog when its scheduler crashed). Only files recorded by
    such an engine are touched; returns how many were removed. Runs when an engine starts (so a restarted replica
    cleans up after the one it replaces) and at the end of a run."""
    import json

    import psutil

    removed = 0
    for marker in sorted(_marker_dir().glob("*.json")) if _marker_dir().is_dir() else []:
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if psutil.pid_exists(int(record.get("pid", -1))):
            continue
        for name in record.get("files", []):
            path = Path(name)
            if path.parent == _SHM_DIR and path.exists():
                path.unlink(missing_ok=True)
                removed += 1
        marker.unlink(missing_ok=True)
    return removed


def _tracker_pid() -> int | None:
    """Pid of this process's multiprocessing resource tracker (it must outlive the engine: it unlinks the named
    semaphores SGLang's processes created, which SIGKILL would otherwise leak in /dev/shm)."""
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)


def _shutdown_engine(engine: Any, children: list[Any]) -> None:
    """``engine.shutdown()``, but its final "kill every child of this process" kills only the engine's own
    processes (``children``): in a process that has other children (a Ray driver, a test session, the resource
    tracker, which unlinks the engine's named semaphores at exit) SGLang's teardown would kill those too."""
    import sglang.srt.entrypoints.engine as engine_module

    original = engine_module.kill_process_tree

    def kill_engine_processes(parent_pid: int, *args: Any, **kwargs: Any) -> Any:
        if parent_pid != os.getpid():
            return original(parent_pid, *args, **kwargs)
        for proc in children:
            _kill(proc)
        return None

    engine_module.kill_process_tree = kill_engine_processes
    try:
        engine.shutdown()
    finally:
        engine_module.kill_process_tree = original
        _cancel_loop_tasks(getattr(engine, "loop", None))
        # The load-snapshot reader of this process can re-create its /dev/shm file from a late message of the
        # dying scheduler (it opens writers with O_CREAT): close it before that file is removed.
        reader = getattr(getattr(engine, "tokenizer_manager", None), "load_snapshot_reader", None)
        close = getattr(reader, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001 - best effort: the file is removed next either way
                pass


def _cancel_loop_tasks(loop: Any, timeout_s: float = 5.0) -> None:
    """Cancel the tasks SGLang's tokenizer manager left on the engine's event loop (its receive loop), so that they
    do not log "Task was destroyed but it is pending" when the interpreter exits. Runs on the engine's thread."""
    if loop is None or loop.is_closed() or loop.is_running():
        return
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        try:
            loop.run_until_complete(asyncio.wait(tasks, timeout=timeout_s))
        except Exception:  # noqa: BLE001 - best effort: only log noise is at stake
            pass
