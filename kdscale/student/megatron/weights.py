"""Load a Hugging Face student's weights straight into this rank's Megatron GPTModel chunk(s), at any TP/PP/VPP.

Design:
- Every rank streams the HF safetensors through the converter's mapping table
  (:meth:`~kdscale.checkpoint.convert.mapping.MappingTable.hf_to_megatron`), which yields the GLOBAL (TP=1,
  global layer index) Megatron tensors one at a time, and keeps only what its chunks hold: the layers of its
  pipeline (and virtual) stages, sliced to its tensor-parallel shard. No checkpoint is written and no process
  needs a private Megatron world, so this works inside an initialized multi-rank job and on many nodes.
- The tensor-parallel split follows the attributes Megatron sets on each parameter (``tensor_model_parallel``,
  ``partition_dim``); SwiGLU's ``linear_fc1`` ([gate; up]) is split per half, as Megatron shards it. Megatron's
  grouped QKV layout ([q, k, v] per KV group) splits evenly along dim 0 into whole groups.
- A tied output layer on a last stage without the embedding (PP > 1) gets the embedding's rows.

Assumptions: the chunk(s) were built by :func:`kdscale.student.megatron.model.build_gpt_model` with the same
HF config and ``padded_vocab`` rows. Peak extra memory is one global tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

_LAYER_PREFIX = "decoder.layers."
_EMBEDDING = "embedding.word_embeddings.weight"
_OUTPUT = "output_layer.weight"


def _global_key(chunk: torch.nn.Module, local_key: str) -> str:
    """The TP=1 global-layer key of a chunk's local ``state_dict`` key (layer numbers are global in Megatron)."""
    if not local_key.startswith(_LAYER_PREFIX):
        return local_key
    index, rest = local_key[len(_LAYER_PREFIX) :].split(".", 1)
    layer_number = chunk.decoder.layers[int(index)].layer_number  # 1-based, includes the stage offset
    return f"{_LAYER_PREFIX}{layer_number - 1}.{rest}"


def _chunk_parameters(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """``(global key, parameter, gated)`` of every parameter of the chunks, in ``state_dict`` order (the same on
    every TP rank of a stage); ``gated``: a SwiGLU ``linear_fc1`` ([gate; up], sharded per half)."""
    for chunk in chunks:
        for local_key, param in chunk.state_dict(keep_vars=True).items():
            if local_key.endswith("_extra_state") or param is None:
                continue
            gated = local_key.endswith("mlp.linear_fc1.weight") and chunk.config.gated_linear_unit
            yield _global_key(chunk, local_key), param, gated


def _tp_shard(param: torch.Tensor, tensor: torch.Tensor, *, tp_rank: int, tp_size: int, gated: bool) -> torch.Tensor:
    """This TP rank's shard of the global ``tensor`` for the (local) parameter ``param``."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor
    dim = int(param.partition_dim)
    if gated:  # [gate; up] along dim 0: shard each half, keep the local [gate_r; up_r]
        halves = tensor.chunk(2, dim=0)
        return torch.cat([half.chunk(tp_size, dim=0)[tp_rank] for half in halves], dim=0)
    return tensor.chunk(tp_size, dim=dim)[tp_rank]


def load_hf_into_chunks(
    chunks: list[torch.nn.Module],
    model_path: str | Path,
    hf_config: dict[str, Any],
    *,
    padded_vocab: int,
    tp_rank: int,
    tp_size: int,
) -> None:
    """Copy the HF weights of ``model_path`` into the (unwrapped) GPTModel ``chunks`` of this rank.

    Raises ``RuntimeError`` naming the parameters the HF checkpoint did not provide, or any shape mismatch.
    """
    from kdscale.checkpoint.convert.families import get_mapping_table
    from kdscale.checkpoint.convert.hf_to_mcore import LazySafetensors
    from kdscale.checkpoint.convert.mapping import ModelDims

    table = get_mapping_table(hf_config.get("model_type"))
    dims = ModelDims.from_hf_config(hf_config, padded_vocab=padded_vocab)
    tied = bool(hf_config.get("tie_word_embeddings", False))

    # global key -> [(local parameter, gated)] (a tied embedding may feed two parameters of one rank)
    wanted: dict[str, list[tuple[torch.Tensor, bool]]] = {}
    for source, tensor, gated in _chunk_parameters(chunks):
        wanted.setdefault(_EMBEDDING if source == _OUTPUT and tied else source, []).append((tensor, gated))

    filled: set[str] = set()
    source_tensors = LazySafetensors(Path(model_path))
    with torch.no_grad():
        for key, tensor in table.hf_to_megatron(source_tensors, dims):
            for param, gated in wanted.get(key, ()):
                shard = _tp_shard(param, tensor, tp_rank=tp_rank, tp_size=tp_size, gated=gated)
                if shard.shape != param.shape:
                    raise RuntimeError(
                        f"{key}: this rank's shard of the HF weight has shape {list(shard.shape)} but the Megatron "
                        f"parameter has {list(param.shape)} (TP rank {tp_rank} of {tp_size})"
                    )
                param.copy_(shard)
                filled.add(key)
    missing = sorted(set(wanted) - filled)
    if missing:
        raise RuntimeError(f"{model_path}: the HF checkpoint provided no weights for {missing[:8]}")


def _tp_gather(param: torch.Tensor, *, tp_group: Any, tp_size: int, gated: bool) -> torch.Tensor:
    """The global (TP=1) tensor of a tensor-parallel parameter: the inverse of :func:`_tp_shard` (collective on
    ``tp_group``; every TP rank gets it)."""
    import torch.distributed as dist

    local = param.detach().contiguous()
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return local
    shards = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(shards, local, group=tp_group)
    if gated:  # each shard is [gate_r; up_r]: the global tensor is [gate_0 .. gate_n; up_0 .. up_n]
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=int(param.partition_dim))


def gather_hf_state_dict(
    chunks: list[torch.nn.Module],
    hf_config: dict[str, Any],
    *,
    padded_vocab: int,
    tp_group: Any,
    tp_size: int,
    tp_rank: int,
    pp_group: Any,
    pp_size: int,
    pp_rank: int,
    dp_rank: int,
) -> dict[str, torch.Tensor] | None:
    """The whole student by Hugging Face name on the rank at (DP 0, PP 0, TP 0) (None on every other rank): the
    inverse of :func:`load_hf_into_chunks`, in memory (what an on-policy rollout engine loads after each step).

    Collective on the ranks of data-parallel rank 0 (the others return None at once): every TP group gathers its
    stage's parameters (:func:`_tp_gather`), the TP-rank-0 ranks send their stage's tensors (on the CPU) to the
    first stage over the pipeline group, where the converter's mapping table turns the global Megatron keys into
    HF names (the padded vocabulary rows are dropped; a tied output layer is the embedding).
    """
    import torch.distributed as dist

    from kdscale.checkpoint.convert.families import get_mapping_table
    from kdscale.checkpoint.convert.mapping import ModelDims

    if dp_rank != 0:
        return None
    tied = bool(hf_config.get("tie_word_embeddings", False))
    stage: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, param, gated in _chunk_parameters(chunks):
            if key == _OUTPUT and tied:
                continue  # the embedding row gives it
            full = _tp_gather(param, tp_group=tp_group, tp_size=tp_size, gated=gated)
            if tp_rank == 0:  # a copy: the caller keeps it while the parameters train on
                stage[key] = full.to("cpu", copy=full.data_ptr() == param.data_ptr())
    if tp_rank != 0:
        return None
    merged = stage
    if pp_size > 1:
        gathered: list[Any] | None = [None] * pp_size if pp_rank == 0 else None
        dist.gather_object(stage, gathered, dst=dist.get_global_rank(pp_group, 0), group=pp_group)
        if pp_rank != 0:
            return None
        merged = {key: tensor for part in gathered for key, tensor in part.items()}
    table = get_mapping_table(hf_config.get("model_type"))
    dims = ModelDims.from_hf_config(hf_config, padded_vocab=padded_vocab)
    return {key: tensor.contiguous() for key, tensor in table.megatron_to_hf(merged, dims)}
