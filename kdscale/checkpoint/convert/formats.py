"""Megatron checkpoint formats: write and read ``torch_dist`` (``megatron.core.dist_checkpointing``), read the
legacy ``mp_rank_XX[_XXX]/model_optim_rng.pt`` layout, and the ``kdscale_convert.json`` metadata.

Design:
- Every reader returns the *global* Megatron state dict: the keys and shapes of a GPTModel's ``state_dict()`` at
  TP=1/PP=1 (local layer spec), which the mapping tables (``mapping.py``) translate to and from HF.
- ``torch_dist`` is written from ONE process at TP=1/PP=1: a GPTModel is built from the HF config
  (``kdscale.student.megatron.model``; TransformerConfig never typed by hand), its tensors are filled with the
  converted weights, and ``dist_checkpointing.save(model.sharded_state_dict(), dir)`` writes them. The sharded keys
  are therefore exactly the ones a GPTModel uses (stacked layers, local-spec norms under their TE names), and since
  torch_dist reshards on load, the checkpoint loads at any TP/PP/VPP: build the target model, then
  :func:`load_torch_dist_into`. Reading builds the TP=1/PP=1 model and loads into it the same way.
- The legacy layout is merged here (no Megatron import needed): TP shards by parameter kind (:data:`TP_MERGE_DIMS`;
  ``linear_fc1`` holds ``[gate_shard; up_shard]`` per rank and is merged as all gates then all ups), pipeline
  stages (and virtual chunks ``model0``, ``model1``, ...) by layer offset.
- A converted checkpoint directory is::

      <out>/kdscale_convert.json    HF config.json, make_vocab_size_divisible_by, padded vocab, dtype, source
      <out>/tokenizer.json ...      the HF tokenizer / chat template / generation_config files, copied
      <out>/model/                  the torch_dist checkpoint (metadata.json + *.distcp)

  so ``mcore_to_hf`` needs only that directory.

Assumptions:
- kdscale's own Megatron training checkpoints keep the model's torch_dist checkpoint in a ``model/`` subdirectory
  of the checkpoint directory (optimizer state elsewhere); a directory that is itself a torch_dist checkpoint
  (has ``metadata.json``), or a Megatron-LM directory with ``latest_checkpointed_iteration.txt`` and
  ``iter_XXXXXXX/``, works too. When no ``kdscale_convert.json`` is found next to it (or one level up), the HF
  config must be given (``hf_config_dir``).
- Legacy files are read with ``torch.load(weights_only=True)``, allowing ``argparse.Namespace`` and numpy arrays
  (Megatron-LM stores its args and RNG states there); anything else in the pickle is refused.
- Transformer Engine ``_extra_state`` entries (fp8 metadata) are not parameters and are dropped.

Usage::

    write_torch_dist(megatron_sd, hf_config, out_dir / "model", padded_vocab=384)
    megatron_sd = read_megatron_checkpoint(ckpt_dir, hf_config, padded_vocab=None)
    load_torch_dist_into(model, ckpt_dir)   # inside an initialized TP/PP layout
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kdscale.checkpoint.convert.mapping import ConversionError

METADATA_FILE = "kdscale_convert.json"
MODEL_SUBDIR = "model"
METADATA_FORMAT_VERSION = 1

# Legacy TP merge: the dim along which tensor-parallel shards are concatenated, by key suffix. None = replicated
# (taken from TP rank 0). "fc1" = per-rank [gate_shard; up_shard], merged as cat(gates) then cat(ups).
TP_MERGE_DIMS: dict[str, int | str | None] = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "self_attention.linear_proj.bias": None,
    "self_attention.q_layernorm.weight": None,
    "self_attention.k_layernorm.weight": None,
    "input_layernorm.weight": None,
    "input_layernorm.bias": None,
    "pre_mlp_layernorm.weight": None,
    "pre_mlp_layernorm.bias": None,
    "self_attention.linear_qkv.layer_norm_weight": None,
    "mlp.linear_fc1.layer_norm_weight": None,
    "mlp.linear_fc1.weight": "fc1",
    "mlp.linear_fc2.weight": 1,
    "mlp.linear_fc2.bias": None,
    "decoder.final_layernorm.weight": None,
    "decoder.final_layernorm.bias": None,
}
# TE-spec legacy checkpoints fuse the norms into the linear layers; the global state dict uses local-spec names.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MP_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


# ------------------------------------------------------------------------------------------------------ metadata


def write_convert_metadata(
    out_dir: Path,
    *,
    hf_config: dict[str, Any],
    make_vocab_size_divisible_by: int,
    padded_vocab: int,
    dtype: torch.dtype,
    source: str,
) -> Path:
    """Write ``kdscale_convert.json`` (what ``mcore_to_hf`` needs besides the weights) into ``out_dir``."""
    path = Path(out_dir) / METADATA_FILE
    payload = {
        "format_version": METADATA_FORMAT_VERSION,
        "format": "torch_dist",
        "model_subdir": MODEL_SUBDIR,
        "model_type": hf_config.get("model_type"),
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "padded_vocab_size": padded_vocab,
        "dtype": str(dtype).removeprefix("torch."),
        "source": source,
        "hf_config": hf_config,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def find_convert_metadata(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """``kdscale_convert.json`` in ``ckpt_dir`` or its parent (for ``<out>/model``), parsed; None if absent."""
    for candidate in (ckpt_dir / METADATA_FILE, ckpt_dir.parent / METADATA_FILE):
        if candidate.is_file():
            try:
                return candidate, json.loads(candidate.read_text())
            except json.JSONDecodeError as exc:
                raise ConversionError(f"{candidate} is not valid JSON: {exc}") from exc
    return None


def dtype_from_name(name: str) -> torch.dtype:
    """``torch.bfloat16`` from ``"bfloat16"`` (or ``"torch.bfloat16"``); ValueError listing the choices."""
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    key = name.removeprefix("torch.")
    if key not in choices:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {sorted(choices)}")
    return choices[key]


# ------------------------------------------------------------------------------------------------ layout resolution


def _is_torch_dist(path: Path) -> bool:
    return (path / "metadata.json").is_file() and (any(path.glob("*.distcp")) or (path / ".metadata").is_file())


def resolve_megatron_checkpoint(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """``("torch_dist" | "legacy", directory)`` for a converted dir, its ``model/``, a kdscale training checkpoint
    dir, a torch_dist dir, or a Megatron-LM dir (``latest_checkpointed_iteration.txt`` + ``iter_XXXXXXX/``)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"Megatron checkpoint directory {root} not found")
    if not root.is_dir():
        raise ConversionError(f"Megatron checkpoint {root} is not a directory")
    candidates = [root, root / MODEL_SUBDIR]
    tracker = root / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        text = tracker.read_text().strip()
        iteration_dir = root / ("release" if text == "release" else f"iter_{int(text):07d}")
        if not iteration_dir.is_dir():
            raise FileNotFoundError(f"{tracker} says {text!r} but {iteration_dir} does not exist")
        candidates = [iteration_dir, iteration_dir / MODEL_SUBDIR, *candidates]
    for candidate in candidates:
        if _is_torch_dist(candidate):
            return "torch_dist", candidate
        if candidate.is_dir() and any(_MP_RANK_DIR.match(p.name) for p in candidate.iterdir() if p.is_dir()):
            return "legacy", candidate
    raise ConversionError(
        f"{root} is not a Megatron checkpoint: looked for a torch_dist checkpoint (metadata.json + *.distcp) or "
        f"legacy mp_rank_XX[_XXX]/model_optim_rng.pt in {[str(c) for c in candidates]}"
    )


# ------------------------------------------------------------------------------------------ single-process Megatron


@contextlib.contextmanager
def single_process_megatron() -> Iterator[None]:
    """A TP=1/PP=1 Megatron world of one gloo process (no port needed), unless one is already initialized.

    Activates the CPU compatibility layer when CUDA is absent. Tears down only what it set up.
    """
    from kdscale.student.megatron import cpu_compat

    cpu_compat.activate()
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    own_parallel = not parallel_state.model_parallel_is_initialized()
    if own_parallel:
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(1234)
    try:
        yield
    finally:
        if own_parallel:
            parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


def vocab_divisor_for(padded_vocab: int, tensor_parallel_size: int) -> int:
    """The ``make_vocab_size_divisible_by`` that makes Megatron pad to exactly ``padded_vocab`` rows at
    ``tensor_parallel_size`` (a converted checkpoint fixes its padded vocabulary; a model loading it must match)."""
    if padded_vocab % tensor_parallel_size:
        raise ConversionError(
            f"the checkpoint's padded vocabulary ({padded_vocab} rows) is not divisible by tensor_model_parallel_size "
            f"({tensor_parallel_size}); convert again with --make-vocab-size-divisible-by a multiple of it"
        )
    return padded_vocab // tensor_parallel_size


def build_tp1_model(hf_config: dict[str, Any], *, padded_vocab: int, dtype: torch.dtype) -> torch.nn.Module:
    """A whole GPTModel (TP=1/PP=1, initialized parallel state) for ``hf_config`` with ``padded_vocab`` rows."""
    from kdscale.student.megatron.model import build_gpt_model

    return build_gpt_model(
        hf_config,
        pre_process=True,
        post_process=True,
        make_vocab_size_divisible_by=vocab_divisor_for(padded_vocab, 1),
        params_dtype=dtype,
    )


def _parameter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state") and v is not None}


def fill_model(model: torch.nn.Module, megatron_sd: dict[str, torch.Tensor]) -> None:
    """Copy a global Megatron state dict into a TP=1/PP=1 GPTModel; ``ConversionError`` on any key or shape
    difference (names the parameter)."""
    target = _parameter_state(model)
    missing, unexpected = sorted(target.keys() - megatron_sd.keys()), sorted(megatron_sd.keys() - target.keys())
    if missing or unexpected:
        raise ConversionError(
            f"converted weights do not match the GPTModel built from config.json: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    with torch.no_grad():
        for key, tensor in target.items():
            source = megatron_sd[key]
            if source.shape != tensor.shape:
                raise ConversionError(
                    f"shape mismatch for {key}: the GPTModel expects {list(tensor.shape)}, got {list(source.shape)}"
                )
            tensor.copy_(source)


# ------------------------------------------------------------------------------------------------------ torch_dist


def write_torch_dist(
    megatron_sd: dict[str, torch.Tensor],
    hf_config: dict[str, Any],
    out_dir: Path,
    *,
    padded_vocab: int,
    dtype: torch.dtype,
) -> None:
    """Save a global Megatron state dict as a torch_dist checkpoint in ``out_dir`` (created; must not exist)."""
    from megatron.core import dist_checkpointing

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    with single_process_megatron():
        model = build_tp1_model(hf_config, padded_vocab=padded_vocab, dtype=dtype)
        fill_model(model, megatron_sd)
        dist_checkpointing.save(model.sharded_state_dict(), str(out_dir))


def save_torch_dist_model(model: torch.nn.Module | list[torch.nn.Module], ckpt_dir: str | os.PathLike[str]) -> None:
    """Save this rank's GPTModel chunk(s), in whatever TP/PP/VPP layout, as one torch_dist checkpoint.

    Call on every rank. Rank 0 creates ``ckpt_dir``. The result loads at any layout (:func:`load_torch_dist_into`)
    and converts to HF (``mcore_to_hf`` with ``hf_config_dir``).
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if not dist.is_initialized() or dist.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    chunks = model if isinstance(model, list) else [model]
    if len(chunks) == 1:
        sharded = chunks[0].sharded_state_dict()
    else:
        sharded = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    dist_checkpointing.save(sharded, str(ckpt_dir))


def torch_dist_padded_vocab(ckpt_dir: Path) -> int:
    """Rows of the embedding stored in a torch_dist checkpoint (the padded vocabulary it was written with)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    embedding = metadata.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise ConversionError(
            f"{ckpt_dir}: torch_dist checkpoint has no embedding.word_embeddings.weight; is it a GPTModel checkpoint? "
            f"(some keys: {sorted(metadata)[:8]})"
        )
    return int(embedding.global_shape[0])


def load_torch_dist_into(model: torch.nn.Module | list[torch.nn.Module], ckpt_dir: str | os.PathLike[str]) -> None:
    """Load a torch_dist checkpoint (any layout it was written in) into the GPTModel chunk(s) of this rank.

    Call on every rank of the model's TP/PP layout. ``ckpt_dir`` may be a converted dir, its ``model/``, or any
    directory :func:`resolve_megatron_checkpoint` accepts that holds a torch_dist checkpoint.
    """
    from megatron.core import dist_checkpointing

    kind, path = resolve_megatron_checkpoint(ckpt_dir)
    if kind != "torch_dist":
        raise ConversionError(f"{ckpt_dir} is a legacy checkpoint; convert it with mcore_to_hf/hf_to_mcore first")
    chunks = model if isinstance(model, list) else [model]
    if len(chunks) == 1:
        loaded = dist_checkpointing.load(chunks[0].sharded_state_dict(), str(path))
        chunks[0].load_state_dict(loaded, strict=False)
        return
    sharded = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    loaded = dist_checkpointing.load(sharded, str(path))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"], strict=False)


def read_torch_dist(
    ckpt_dir: Path, hf_config: dict[str, Any], *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The global Megatron state dict of a torch_dist checkpoint (built and loaded at TP=1/PP=1 in-process)."""
    from megatron.core import dist_checkpointing

    padded_vocab = torch_dist_padded_vocab(ckpt_dir)
    if dtype is None:
        metadata = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
        dtype = metadata["embedding.word_embeddings.weight"].dtype
    with single_process_megatron():
        model = build_tp1_model(hf_config, padded_vocab=padded_vocab, dtype=dtype)
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir))
        model.load_state_dict(loaded, strict=False)
        return {k: v.detach().clone() for k, v in _parameter_state(model).items()}


# ---------------------------------------------------------------------------------------------------------- legacy


def _legacy_load(path: Path) -> dict[str, Any]:
    import numpy as np

    allowed: list[Any] = [argparse.Namespace, np.ndarray, np.dtype]
    with contextlib.suppress(AttributeError):
        allowed.append(np.core.multiarray._reconstruct)  # type: ignore[attr-defined]
    with contextlib.suppress(AttributeError, ImportError):
        import numpy._core.multiarray as multiarray  # numpy >= 2

        allowed.append(multiarray._reconstruct)
    allowed.extend(type(np.dtype(name)) for name in ("float32", "float64", "int64", "uint32", "uint8", "bool"))
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConversionError(f"cannot read legacy Megatron checkpoint file {path}: {exc}") from exc


def _merge_suffix(key: str) -> str:
    layer = _LAYER_KEY.match(key)
    return layer.group(2) if layer else key


def _merge_tp(key: str, shards: list[torch.Tensor]) -> torch.Tensor:
    suffix = _merge_suffix(key)
    if suffix not in TP_MERGE_DIMS:
        raise ConversionError(
            f"legacy checkpoint parameter {key}: no tensor-parallel merge rule for {suffix!r} "
            f"(known: {sorted(TP_MERGE_DIMS)})"
        )
    rule = TP_MERGE_DIMS[suffix]
    if len(shards) == 1 or rule is None:
        return shards[0]
    if rule == "fc1":
        halves = [torch.chunk(shard, 2, dim=0) for shard in shards]
        return torch.cat([gate for gate, _ in halves] + [up for _, up in halves], dim=0)
    return torch.cat(shards, dim=int(rule))


def read_legacy(ckpt_dir: Path, *, tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """The global Megatron state dict of a legacy ``mp_rank_XX[_XXX]/model_optim_rng.pt`` checkpoint (TP shards
    merged, pipeline stages and virtual chunks renumbered by layer offset, TE norm names mapped to local ones)."""
    ranks: dict[tuple[int, int], Path] = {}
    for sub in ckpt_dir.iterdir():
        match = _MP_RANK_DIR.match(sub.name)
        if match and sub.is_dir():
            file = sub / "model_optim_rng.pt"
            if not file.is_file():
                raise FileNotFoundError(f"legacy checkpoint rank directory {sub} has no model_optim_rng.pt")
            ranks[(int(match.group(1)), int(match.group(2) or 0))] = file
    num_tp = 1 + max(tp for tp, _ in ranks)
    num_pp = 1 + max(pp for _, pp in ranks)
    absent = [f"mp_rank_{tp:02d}_{pp:03d}" for tp in range(num_tp) for pp in range(num_pp) if (tp, pp) not in ranks]
    if absent:
        raise FileNotFoundError(f"legacy checkpoint {ckpt_dir} is missing rank directories {absent}")

    # (pp, chunk) -> key -> [tp shards]
    pieces: dict[tuple[int, int], dict[str, list[torch.Tensor]]] = {}
    for pp in range(num_pp):
        for tp in range(num_tp):
            state = _legacy_load(ranks[(tp, pp)])
            chunks = (
                {0: state["model"]}
                if "model" in state
                else {int(k[len("model") :]): v for k, v in state.items() if re.fullmatch(r"model\d+", k)}
            )
            if not chunks:
                raise ConversionError(f"{ranks[(tp, pp)]} has no 'model' (or 'model0', ...) entry: {sorted(state)[:8]}")
            for chunk, model_sd in chunks.items():
                for key, value in model_sd.items():
                    if key.endswith("_extra_state") or not isinstance(value, torch.Tensor):
                        continue
                    pieces.setdefault((pp, chunk), {}).setdefault(key, []).append(value)

    merged: dict[str, torch.Tensor] = {}
    layer_offset = 0
    num_chunks = 1 + max(chunk for _, chunk in pieces)
    for chunk in range(num_chunks):  # Megatron's interleaved order: chunk-major, then stage
        for pp in range(num_pp):
            stage = pieces.get((pp, chunk), {})
            local_layers = set()
            for key, shards in stage.items():
                if len(shards) != num_tp:
                    raise ConversionError(
                        f"legacy parameter {key} (stage {pp}) is on {len(shards)} of {num_tp} TP ranks"
                    )
                tensor = _merge_tp(key, shards)
                layer = _LAYER_KEY.match(key)
                if layer:
                    local_layers.add(int(layer.group(1)))
                    suffix = _TE_TO_LOCAL.get(layer.group(2), layer.group(2))
                    key = f"decoder.layers.{layer_offset + int(layer.group(1))}.{suffix}"
                if key == "output_layer.weight" and tie_word_embeddings:
                    continue  # the last stage's copy of the shared embedding
                if key in merged:
                    raise ConversionError(f"legacy parameter {key} appears on more than one pipeline stage")
                merged[key] = tensor
            layer_offset += len(local_layers)
    return merged


def read_megatron_checkpoint(
    ckpt_dir: str | os.PathLike[str], hf_config: dict[str, Any], *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The global Megatron state dict of any checkpoint :func:`resolve_megatron_checkpoint` accepts."""
    kind, path = resolve_megatron_checkpoint(ckpt_dir)
    if kind == "torch_dist":
        return read_torch_dist(path, hf_config, dtype=dtype)
    tied = bool(hf_config.get("tie_word_embeddings", False))
    state = read_legacy(path, tie_word_embeddings=tied)
    return {k: v.to(dtype) for k, v in state.items()} if dtype is not None else state
