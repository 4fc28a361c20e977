"""Run Megatron-Core's GPTModel, schedules, DDP and optimizer on a CPU-only torch over gloo (development and CI).

Megatron-Core assumes CUDA at a few dozen call sites. On a CPU-only torch each of them raises "Torch not compiled
with CUDA enabled" (or, for ``torch.cuda.manual_seed``, silently queues a seed that is never applied). This module
redirects exactly those sites to the CPU, so that the same backend code runs on a laptop and in CI.

Design
    Nothing global in ``torch`` is replaced. Three kinds of patches, all applied by :func:`activate`:

    1. A ``torch`` stand-in per Megatron module (:data:`PATCHED_MODULES`). Each module listed there gets, as its
       module-level ``torch`` name, a module object whose attributes are the real ``torch``'s, except
       ``torch.cuda`` (a CPU shim: ``current_device()`` is ``"cpu"``; ``get_rng_state``/``set_rng_state``/
       ``manual_seed``/``manual_seed_all`` act on the CPU default generator (``torch.default_generator``, never
       ``torch.manual_seed``, which would call back into ``cuda.manual_seed_all``); ``Stream``/``Event``/
       ``stream``/``current_stream``/``default_stream``/``synchronize`` are no-ops; everything else is the real
       ``torch.cuda``) and the tensor factories (``tensor``, ``zeros``, ``ones``, ``empty``, ``full``, ``arange``,
       ``rand*``), which map ``device="cuda"``/``"cuda:N"``/``torch.device("cuda")`` to the CPU. Other code
       (kdscale's, torch's, transformers') keeps the real ``torch``.
    2. Function replacements in ``megatron.core.tensor_parallel.random``: ``_get_cuda_rng_state`` and
       ``_set_cuda_rng_state`` read/write the CPU default generator (they index ``torch.cuda.default_generators``).
    3. Scoped wrappers (:data:`WRAPPED_FUNCTIONS`) around the few Megatron functions that call tensor methods that
       cannot be redirected per module: ``Tensor.type()`` compared with ``"torch.cuda.FloatTensor"`` (etc.) and
       ``Tensor.cuda()``. While such a function runs (only then), ``Tensor.type()`` without arguments reports the
       CUDA type name of a CPU tensor and ``Tensor.cuda()`` returns the tensor itself.

    Sites by module (megatron-core 0.16.1; the same sites exist in 0.19.x):

    - ``utils``: GlobalMemoryBuffer ``device=torch.cuda.current_device()``; ``torch.cuda.Event`` timers.
    - ``parallel_state``: ``torch.cuda.synchronize()`` (timeouts), ``current_device()`` in NCCL-only barriers.
    - ``tensor_parallel.random``: CUDA RNG (``get_rng_state``, ``manual_seed``, ``default_generators``).
    - ``tensor_parallel.layers`` / ``mappings`` / ``data``: ``current_device()`` buffers (and weights when
      ``use_cpu_initialization=False``), ``device='cuda'`` in ``broadcast_data``.
    - ``pipeline_parallel.p2p_communication``: receive buffers and shape tensors on ``current_device()``,
      ``synchronize()``.
    - ``pipeline_parallel.schedules``: ``total_num_tokens`` on ``device="cuda"``.
    - ``pipeline_parallel.utils``: ``Stream``/``Event``/``stream``/``current_stream``.
    - ``models.common.embeddings.rotary_pos_embedding``: ``inv_freq`` on ``current_device()``.
    - ``models.gpt.gpt_model``, ``transformer.module``, ``transformer.attention``,
      ``transformer.dot_product_attention``, ``transformer.transformer_layer``, ``transformer.multi_token_prediction``:
      ``current_device()`` buffers; ``transformer.utils``: the default causal mask on ``device="cuda"``.
    - ``optimizer.optimizer`` / ``distrib_optimizer`` / ``clip_grads`` / ``grad_scaler``: ``device='cuda'`` scalars,
      ``current_device()`` buffers, ``Tensor.type()`` string checks (wrapped), ``.cuda()`` (wrapped).
    - ``distributed.param_and_grad_buffer`` / ``distributed_data_parallel``: parameter and gradient buffers on
      ``current_device()``, ``Stream``/``default_stream``/``synchronize``.
    - ``models.common.language_module.language_module``: ``weight.data.cuda()`` when the embedding is tied across
      pipeline stages (wrapped).
    - ``dist_checkpointing.strategies.filesystem_async``: ``torch.cuda.synchronize()`` in ``preload_tensors``
      (``non_blocking=True`` hard-coded); ``strategies.state_dict_saver``: ``device='cuda'``, ``current_device()``;
      ``strategies.async_utils`` and ``exchange_utils``: ``"cuda"`` literals, ``current_device()``.

Assumptions
    - Megatron-Core is used with the LOCAL layer spec (``get_gpt_layer_local_spec``): Transformer Engine and Apex do
      not exist on a CPU torch. Sequence parallelism needs TE/Apex norms and is not supported here.
    - Pipeline parallelism with virtual stages on gloo needs ``batch_p2p_comm=False`` (with PP=2 the default gives
      silently wrong results); this module does not change configs.
    - Single-threaded use of the wrapped functions (their scoped ``Tensor`` patches are process-wide while they run).
    - Validated on megatron-core :data:`VALIDATED_VERSIONS`; other versions get a warning, not an error.

Usage
    Call once per process, after ``import torch`` and before building Megatron objects::

        from kdscale.student.megatron import cpu_compat

        cpu_compat.activate()  # no-op when torch.cuda.is_available()
        # ... parallel_state.initialize_model_parallel(...), model_parallel_cuda_manual_seed(...), GPTModel(...)

    Nothing happens at import time. ``activate()`` is idempotent and returns whether patches are in effect.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

VALIDATED_VERSIONS: tuple[str, ...] = ("0.16.1",)
"""megatron-core versions on which the site list below was traced and the tests pass."""

PATCHED_MODULES: tuple[str, ...] = (
    "megatron.core.utils",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.data",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.module",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.multi_token_prediction",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.exchange_utils",
)
"""Megatron modules whose module-level ``torch`` is replaced by the CPU stand-in (see the module docstring)."""

WRAPPED_FUNCTIONS: tuple[tuple[str, str], ...] = (
    # Tensor.type() == 'torch.cuda.FloatTensor' / in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor'].
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    # send_tensor.cuda() when gathering the distributed optimizer's state for a fully reshardable checkpoint.
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero"),
    # weight.data.cuda() for an embedding tied across pipeline stages.
    ("megatron.core.models.common.language_module.language_module", "LanguageModule.setup_embeddings_and_output_layer"),
)
"""(module, qualified name) of Megatron functions run under :func:`cuda_tensor_methods_on_cpu`."""

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}

_lock = threading.Lock()
_active = False
_torch_stand_in: types.ModuleType | None = None


# ----------------------------------------------------------------------------- the torch.cuda shim


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: every method is a no-op; usable as a context manager."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _NullEvent:
    """Stands in for ``torch.cuda.Event``: CPU work is synchronous, so every event has already happened."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.default_generator.set_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _make_cuda_shim() -> types.ModuleType:
    """A ``torch.cuda`` look-alike for Megatron modules: CPU device, CPU default generator, no-op streams."""
    real_cuda = torch.cuda

    class _CudaShim(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(real_cuda, name)

    shim = _CudaShim("torch.cuda", "kdscale CPU stand-in for torch.cuda (see kdscale.student.megatron.cpu_compat)")
    shim.current_device = lambda: "cpu"
    shim.get_rng_state = _cpu_get_rng_state
    shim.set_rng_state = _cpu_set_rng_state
    shim.manual_seed = _cpu_manual_seed
    shim.manual_seed_all = _cpu_manual_seed
    shim.synchronize = lambda device=None: None
    shim.Stream = _NullStream
    shim.Event = _NullEvent
    shim.current_stream = lambda device=None: _NullStream()
    shim.default_stream = lambda device=None: _NullStream()
    shim.stream = lambda stream=None: contextlib.nullcontext(stream)
    random_ns = types.SimpleNamespace(
        get_rng_state=_cpu_get_rng_state,
        set_rng_state=_cpu_set_rng_state,
        manual_seed=_cpu_manual_seed,
        manual_seed_all=_cpu_manual_seed,
    )
    shim.random = random_ns
    return shim


# ----------------------------------------------------------------------------- the torch stand-in


def _cpu_device(device: Any) -> Any:
    """``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")`` and bare ints -> ``"cpu"``; anything else unchanged."""
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    return device


def _device_mapping_factory(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapper


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "as_tensor")


def _make_torch_stand_in() -> types.ModuleType:
    """A module with the real ``torch``'s attributes, except ``cuda`` and the device-mapping factories."""
    real_torch = torch

    class _TorchStandIn(types.ModuleType):
        def __getattr__(self, name: str) -> Any:  # attributes torch creates lazily after this copy
            return getattr(real_torch, name)

    stand_in = _TorchStandIn("torch", "kdscale CPU stand-in for torch (see kdscale.student.megatron.cpu_compat)")
    for name, value in vars(real_torch).items():
        if name not in ("__name__", "__doc__", "__loader__", "__spec__"):
            setattr(stand_in, name, value)
    stand_in.cuda = _make_cuda_shim()
    for name in _FACTORIES:
        setattr(stand_in, name, _device_mapping_factory(getattr(real_torch, name)))
    return stand_in


# ----------------------------------------------------------------------------- scoped tensor-method patches

_scope_depth = 0


@contextlib.contextmanager
def cuda_tensor_methods_on_cpu() -> Iterator[None]:
    """While active: ``Tensor.type()`` (no arguments) reports CUDA type names and ``Tensor.cuda()`` is identity.

    Used only around the Megatron functions in :data:`WRAPPED_FUNCTIONS`; re-entrant.
    """
    global _scope_depth
    real_type, real_cuda = torch.Tensor.type, torch.Tensor.cuda
    if _scope_depth == 0:

        def cpu_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs or self.device.type != "cpu" or self.dtype not in _CUDA_TYPE_NAMES:
                return real_type(self, *args, **kwargs)
            return _CUDA_TYPE_NAMES[self.dtype]

        def cpu_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self

        torch.Tensor.type = cpu_type
        torch.Tensor.cuda = cpu_cuda
    _scope_depth += 1
    try:
        yield
    finally:
        _scope_depth -= 1
        if _scope_depth == 0:
            torch.Tensor.type = real_type
            torch.Tensor.cuda = real_cuda


def _scoped(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cuda_tensor_methods_on_cpu():
            return fn(*args, **kwargs)

    wrapper.__kdscale_cpu_compat__ = True  # type: ignore[attr-defined]
    return wrapper


def _wrap_function(module: types.ModuleType, qualname: str) -> bool:
    """Wrap ``module.<qualname>`` (a function, method, staticmethod or classmethod) in :func:`_scoped`."""
    *owner_path, attr = qualname.split(".")
    owner: Any = module
    for part in owner_path:
        owner = getattr(owner, part, None)
        if owner is None:
            return False
    raw = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
    if raw is None:
        return False
    if getattr(getattr(raw, "__func__", raw), "__kdscale_cpu_compat__", False):
        return True  # already wrapped
    if isinstance(raw, staticmethod):
        setattr(owner, attr, staticmethod(_scoped(raw.__func__)))
    elif isinstance(raw, classmethod):
        setattr(owner, attr, classmethod(_scoped(raw.__func__)))
    elif callable(raw):
        wrapped = _scoped(raw)
        setattr(owner, attr, wrapped)
        if owner is module:  # e.g. optimizer.py binds clip_grads.clip_grad_by_total_norm_fp32 by name
            _rebind_everywhere(raw, wrapped)
    return True


def _rebind_everywhere(original: Any, replacement: Any) -> None:
    """Replace ``original`` with ``replacement`` in every loaded ``megatron`` module that imported it by name."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("megatron."):
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, replacement)


# ----------------------------------------------------------------------------- RNG functions


def _get_cuda_rng_state_cpu(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """CPU replacement for ``megatron.core.tensor_parallel.random._get_cuda_rng_state``."""
    return torch.default_generator.get_state()


def _set_cuda_rng_state_cpu(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """CPU replacement for ``megatron.core.tensor_parallel.random._set_cuda_rng_state``."""
    torch.default_generator.set_state(new_state)


# ----------------------------------------------------------------------------- activation


def megatron_core_version() -> str:
    """The installed megatron-core version (``megatron.core.package_info.__version__``)."""
    from megatron.core import package_info

    return str(package_info.__version__)


def is_active() -> bool:
    """Whether :func:`activate` has applied the CPU patches in this process."""
    return _active


def activate() -> bool:
    """Apply the CPU patches to Megatron-Core (idempotent). Returns True when patches are in effect.

    A no-op returning False when ``torch.cuda.is_available()``. Imports the Megatron modules it patches
    (``import megatron.core`` costs ~8 s). Warns when the installed megatron-core version was not validated.
    """
    global _active, _torch_stand_in
    if torch.cuda.is_available():
        return False
    with _lock:
        if _active:
            return True
        version = megatron_core_version()
        if version not in VALIDATED_VERSIONS:
            warnings.warn(
                f"kdscale's Megatron CPU compatibility layer was validated on megatron-core {VALIDATED_VERSIONS}, "
                f"found {version}: CPU runs may hit an unpatched CUDA call site. Install megatron-core=="
                f"{VALIDATED_VERSIONS[-1]} if they do.",
                stacklevel=2,
            )
        _torch_stand_in = _make_torch_stand_in()
        missing = []
        for name in PATCHED_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                missing.append(name)
                continue
            if getattr(module, "torch", None) is torch:
                module.torch = _torch_stand_in
        random_module = importlib.import_module("megatron.core.tensor_parallel.random")
        _rebind_everywhere(random_module._get_cuda_rng_state, _get_cuda_rng_state_cpu)
        _rebind_everywhere(random_module._set_cuda_rng_state, _set_cuda_rng_state_cpu)
        for module_name, qualname in WRAPPED_FUNCTIONS:
            try:
                found = _wrap_function(importlib.import_module(module_name), qualname)
            except ImportError:
                found = False
            if not found:
                missing.append(f"{module_name}.{qualname}")
        if missing:
            logger.warning("cpu_compat: not found in megatron-core %s (skipped): %s", version, ", ".join(missing))
        _active = True
        logger.info("cpu_compat: Megatron-Core %s patched for a CPU-only torch", version)
        return True
