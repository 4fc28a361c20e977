"""Megatron student checkpoints: ``dist_checkpointing`` (torch_dist) model + optimizer, reshardable across layouts,
and Hugging Face export.

Layout of a checkpoint directory written by :func:`save_checkpoint` (all ranks write into the same, shared,
EXISTING directory; the caller renames it atomically once ``save`` returned everywhere):

- ``model/``: the model alone, torch_dist (``metadata.json`` + ``*.distcp``): loads at any TP/PP/VPP and converts
  with ``kdscale convert mcore-to-hf --hf-config-dir <student HF dir>``.
- ``optim/``: the optimizer state, torch_dist, keyed by the model's global parameter names (the distributed
  optimizer saves in its ``fully_reshardable`` format), so it reshards too.
- ``rank_{r}.pt``: per-rank step counter, layout at save time and RNG states (CPU, CUDA when used, and Megatron's
  tensor-parallel RNG tracker).

Workarounds (megatron-core 0.16.1, see docs/notes): the optimizer state is created (zeros / one dummy step for
the distributed optimizer) before loading so that its sharded state dict has every tensor; loading runs under
``torch.no_grad()``; and each parameter's Adam ``step`` is re-created as its own tensor after loading (Megatron
restores one shared ``common_step`` tensor, which torch's Adam would increment once per parameter).
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from kdscale.student.megatron.backend import MegatronBackend

MODEL_SUBDIR = "model"
OPTIM_SUBDIR = "optim"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank}.pt"


def _model_sharded_state_dict(backend: MegatronBackend) -> dict[str, Any]:
    if len(backend.models) == 1:
        return backend.models[0].sharded_state_dict()
    return {f"model{i}": model.sharded_state_dict() for i, model in enumerate(backend.models)}


def _inner_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _rng_state(device: torch.device) -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state: dict[str, Any] = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _layout(backend: MegatronBackend) -> dict[str, Any]:
    return {"tp": backend.tp_size, "pp": backend.pp_size, "vpp": backend.vpp_size, "dp": backend.dp_size}


def save_checkpoint(backend: MegatronBackend, path: str | Path) -> None:
    """Write ``model/``, ``optim/`` and this rank's ``rank_{r}.pt`` into the existing directory ``path``."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {str(path)!r} does not exist: create it (empty) before save")
    if dist.get_rank() == 0:
        (path / MODEL_SUBDIR).mkdir(exist_ok=False)
        (path / OPTIM_SUBDIR).mkdir(exist_ok=False)
    dist.barrier()
    model_sd = _model_sharded_state_dict(backend)
    dist_checkpointing.save(model_sd, str(path / MODEL_SUBDIR))
    optim_sd = backend.optimizer.sharded_state_dict(
        _model_sharded_state_dict(backend), is_loading=False, metadata=_OPTIM_METADATA
    )
    dist_checkpointing.save(optim_sd, str(path / OPTIM_SUBDIR))
    rank_state = {"step": backend.step, "layout": _layout(backend), "rng": _rng_state(backend.device)}
    torch.save(rank_state, _rank_file(path, dist.get_rank()))
    dist.barrier()


def _separate_step_tensors(optimizer: Any) -> None:
    """Give every parameter its own Adam ``step`` tensor (Megatron restores one shared tensor)."""
    for inner in _inner_optimizers(optimizer):
        for state in inner.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.detach().clone()


def _set_main_param_and_states_without_step(optimizer: Any, model_param: Any, tensors: dict[str, Any]) -> None:
    """``DistributedOptimizer._set_main_param_and_optimizer_states`` for torch's Adam: copy only the tensors the
    checkpoint has. Megatron's version copies every key of the live state, including torch Adam's ``step``, which
    the fully reshardable format does not carry per parameter (it restores it from the param groups), so it raises
    ``KeyError: 'step'``."""
    group_index, group_order = optimizer.model_param_group_index_map[model_param]
    main_param = optimizer.optimizer.param_groups[group_index]["params"][group_order]
    destinations = {"param": main_param, **optimizer.optimizer.state[main_param]}
    for key, value in tensors.items():
        destinations[key].copy_(value)


@contextlib.contextmanager
def _distributed_optimizer_load_fixes(optimizer: Any) -> Iterator[None]:
    """While loading: each distributed optimizer (torch Adam, not precision-aware) copies only saved tensors."""
    patched = []
    for inner in _inner_optimizers(optimizer):
        config = getattr(inner, "config", None)
        if not hasattr(inner, "model_param_group_index_map") or getattr(
            config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False
        ):
            continue
        inner._set_main_param_and_optimizer_states = functools.partial(_set_main_param_and_states_without_step, inner)
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states


def _saved_with_distributed_optimizer(optim_dir: Path) -> bool:
    """Whether ``optim/`` was written by Megatron's distributed optimizer (its fully reshardable format stores the
    fp32 main parameters as ``optimizer.state.param.*``; the non-distributed optimizer does not)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(optim_dir))
    return any(key.startswith("optimizer.state.param.") for key in metadata)


def load_checkpoint(backend: MegatronBackend, path: str | Path) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint` at any layout (collective); returns the step."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / MODEL_SUBDIR / "metadata.json").is_file() or not (path / OPTIM_SUBDIR).is_dir():
        raise ValueError(
            f"{str(path)!r} is not a Megatron student checkpoint (no model/metadata.json or optim/): pass a "
            "directory written by MegatronBackend.save()"
        )
    from kdscale.checkpoint.convert.formats import torch_dist_padded_vocab

    saved_vocab = torch_dist_padded_vocab(path / MODEL_SUBDIR)
    if saved_vocab != backend.padded_vocab:
        raise ValueError(
            f"the checkpoint's padded vocabulary has {saved_vocab} rows but this backend pads to "
            f"{backend.padded_vocab}: set make_vocab_size_divisible_by as when the checkpoint was saved"
        )
    saved_distributed = _saved_with_distributed_optimizer(path / OPTIM_SUBDIR)
    if saved_distributed != backend.use_distributed_optimizer:
        raise ValueError(
            f"checkpoint {str(path)!r} holds optimizer state written with use_distributed_optimizer="
            f"{saved_distributed} but this backend has use_distributed_optimizer={backend.use_distributed_optimizer}"
            ": the two optimizers' state formats differ. Resume with the same optimizer type (set "
            f"use_distributed_optimizer={saved_distributed}); the TP/PP/DP layout may change"
        )
    with torch.no_grad():
        # Create every optimizer state tensor first (dummy values, replaced in place by the load).
        for inner in _inner_optimizers(backend.optimizer):
            if hasattr(inner, "_init_optimizer_states_with_dummy_values"):
                inner._init_optimizer_states_with_dummy_values()
        model_sd = _model_sharded_state_dict(backend)
        loaded = dist_checkpointing.load(model_sd, str(path / MODEL_SUBDIR))
        if len(backend.models) == 1:
            backend.models[0].load_state_dict(loaded, strict=False)
        else:
            for i, model in enumerate(backend.models):
                model.load_state_dict(loaded[f"model{i}"], strict=False)
        optim_sd = backend.optimizer.sharded_state_dict(
            _model_sharded_state_dict(backend), is_loading=True, metadata=_OPTIM_METADATA
        )
        loaded_optim = dist_checkpointing.load(optim_sd, str(path / OPTIM_SUBDIR))
        with _distributed_optimizer_load_fixes(backend.optimizer):
            backend.optimizer.load_state_dict(loaded_optim)
        _separate_step_tensors(backend.optimizer)
    rank = dist.get_rank()
    own_file = _rank_file(path, rank)
    rank_state = torch.load(own_file if own_file.is_file() else _rank_file(path, 0), weights_only=False)
    same_layout = rank_state["layout"] == _layout(backend)
    if own_file.is_file() and same_layout:
        _set_rng_state(rank_state["rng"], backend.device)
    else:
        warnings.warn(
            f"checkpoint {str(path)!r} was saved at layout {rank_state['layout']} (now {_layout(backend)}): RNG "
            "states are not restored (stochastic layers will not replay the uninterrupted run)",
            stacklevel=2,
        )
    dist.barrier()
    return int(rank_state["step"])


def export_hf(backend: MegatronBackend, path: str | Path) -> None:
    """Write the student as a Hugging Face directory at ``path`` (collective; rank 0 converts).

    The model is saved as torch_dist into a temporary directory next to ``path`` (all ranks), then rank 0 runs
    ``convert_mcore_to_hf`` in a child process (the converter builds its own one-process Megatron world, which
    cannot exist inside this job's), with the student's HF directory for config and tokenizer.
    """
    from kdscale.checkpoint.convert.formats import save_torch_dist_model

    path = Path(path).absolute()
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{path.name}.mcore-", dir=path.parent)) if dist.get_rank() == 0 else None
    shared = [str(tmp_root) if tmp_root is not None else None]
    dist.broadcast_object_list(shared, src=0)
    tmp_root = Path(shared[0])
    save_torch_dist_model(backend.models if len(backend.models) > 1 else backend.models[0], tmp_root / "model")
    error: str | None = None
    if dist.get_rank() == 0:
        code = (
            "import sys; from kdscale.checkpoint.convert.mcore_to_hf import convert_mcore_to_hf; "
            "convert_mcore_to_hf(sys.argv[1], sys.argv[2], hf_config_dir=sys.argv[3], overwrite=True, progress=False)"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(tmp_root / "model"), str(path), backend.model_path],
            capture_output=True,
            text=True,
        )
        shutil.rmtree(tmp_root, ignore_errors=True)
        if done.returncode:
            error = f"HF export failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
    errors = [error]
    dist.broadcast_object_list(errors, src=0)
    if errors[0]:
        raise RuntimeError(errors[0])
