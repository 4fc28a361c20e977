"""FSDP2 checkpoints: resumable DCP checkpoints (reshardable across data-parallel sizes) and Hugging Face export.

Layout of a checkpoint directory written by :func:`save_checkpoint` (all ranks write into the same, shared,
EXISTING directory; the caller creates it empty, e.g. as a temporary directory, and renames it atomically once
``save_checkpoint`` has returned on every rank):

- ``.metadata`` and ``__*_*.distcp``: ``torch.distributed.checkpoint`` files of ``{"model": ..., "optim": ...}``
  from ``get_state_dict`` (parameter names without FSDP or activation-checkpointing prefixes; shards are
  resharded on load, so a DP=2 checkpoint loads at DP=1 and vice versa).
- ``rank_{r}.pt``: per-rank state loaded with ``torch.load(weights_only=True)``: optimizer-step counter, LR
  scheduler state, the data-parallel size at save time and this rank's RNG states (torch CPU, and CUDA when used).

:func:`export_hf` gathers the full state dict to rank 0 and writes a standalone Hugging Face model directory.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

# Files of a Hugging Face model directory that belong to the tokenizer (copied by export_hf).
TOKENIZER_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
)


def _rank_file(path: str | Path, rank: int) -> Path:
    return Path(path) / f"rank_{rank}.pt"


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    path: str | Path,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    device: torch.device,
) -> None:
    """Write model + optimizer (DCP) and this rank's ``rank_{r}.pt`` into the existing directory ``path`` (collective)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {str(path)!r} does not exist: create it (empty) before save")
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
    rank_state: dict[str, Any] = {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "dp_size": dist.get_world_size(),
        "rng": _rng_state(device),
    }
    torch.save(rank_state, _rank_file(path, dist.get_rank()))
    dist.barrier()


def load_checkpoint(
    path: str | Path,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint` (collective); returns the step counter.

    At another data-parallel size, DCP reshards the model and optimizer; ranks without a ``rank_{r}.pt`` of
    their own take the step and schedule from ``rank_0.pt`` and keep their current RNG state (with a warning).
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ValueError(f"{str(path)!r} is not an FSDP2 checkpoint (no .metadata): pass a directory written by save()")
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    rank = dist.get_rank()
    own_file = _rank_file(path, rank)
    rank_state = torch.load(own_file if own_file.is_file() else _rank_file(path, 0), weights_only=True)
    scheduler.load_state_dict(rank_state["scheduler"])
    if own_file.is_file():
        _set_rng_state(rank_state["rng"], device)
    else:
        warnings.warn(
            f"checkpoint {str(path)!r} was saved at DP={rank_state['dp_size']} and has no RNG state for rank {rank}: "
            "this rank keeps its seeded RNG state (stochastic layers will not replay the uninterrupted run)",
            stacklevel=2,
        )
    dist.barrier()
    return int(rank_state["step"])


def _copy_tokenizer_files(source: Path, target: Path) -> None:
    for pattern in TOKENIZER_FILE_PATTERNS:
        for file in source.glob(pattern):
            if file.is_file() and not (target / file.name).exists():
                shutil.copy2(file, target / file.name)


def full_hf_state_dict(module: nn.Module, *, prefix: str) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict on CPU by Hugging Face name, on rank 0; None on the other ranks.

    Collective: every rank must call. ``prefix`` is the attribute path of the HF model inside ``module``."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    if dist.get_rank() != 0:
        return None
    return {name.removeprefix(prefix): tensor for name, tensor in state.items() if name.startswith(prefix)}


def export_hf(path: str | Path, *, module: nn.Module, prefix: str, hf_config: Any, model_path: str | Path) -> None:
    """Write the model as a Hugging Face directory at ``path`` (collective; rank 0 writes).

    The full fp32 state dict is gathered to CPU (``full_state_dict=True, cpu_offload=True``); ``prefix`` is the
    attribute path of the HF model inside ``module`` (e.g. ``"model."``). Rank 0 writes weights (safetensors) and
    config with ``save_pretrained`` into ``path + '.tmp'``, copies the tokenizer files of ``model_path``, then
    renames it to ``path`` (replacing an earlier export there).
    """
    from transformers import AutoModelForCausalLM

    hf_state = full_hf_state_dict(module, prefix=prefix)
    if hf_state is not None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
        model.tie_weights()
        still_meta = [name for name, param in model.named_parameters() if param.is_meta]
        assert not unexpected and not still_meta, f"HF export: unexpected {unexpected}, not loaded {still_meta}"
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)  # safetensors (the default, and the only format in transformers 5)
        _copy_tokenizer_files(Path(model_path), tmp)
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    dist.barrier()
