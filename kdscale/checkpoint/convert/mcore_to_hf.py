"""Convert a Megatron-Core checkpoint (torch_dist at any layout, or legacy ``mp_rank_*``) into a Hugging Face
model directory.

Usage::

    python tools/checkpoint_convert/mcore_to_hf.py --mcore-dir ./smollm2-mcore --out-dir ./smollm2-hf
    # a checkpoint without kdscale_convert.json (a training checkpoint, Megatron-LM): give the HF config
    python tools/checkpoint_convert/mcore_to_hf.py --mcore-dir ./ckpt --hf-config-dir ./SmolLM2-135M --out-dir ./out

The HF config (and tokenizer files) come from ``kdscale_convert.json`` next to the checkpoint (written by
``hf_to_mcore``), or from ``--hf-config-dir``. The vocabulary is stripped back to the HF ``vocab_size``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kdscale import cli_errors
from kdscale.checkpoint import hf_io
from kdscale.checkpoint.convert.families import get_mapping_table
from kdscale.checkpoint.convert.formats import (
    dtype_from_name,
    find_convert_metadata,
    read_megatron_checkpoint,
    resolve_megatron_checkpoint,
)
from kdscale.checkpoint.convert.mapping import ConversionError, ModelDims

logger = logging.getLogger(__name__)


def _hf_config_and_tokenizer_dir(
    ckpt_root: Path, ckpt_path: Path, hf_config_dir: str | os.PathLike[str] | None
) -> tuple[dict[str, Any], Path | None]:
    if hf_config_dir is not None:
        hf_config_dir = Path(hf_config_dir).expanduser()
        if not hf_config_dir.is_dir():
            raise FileNotFoundError(
                f"--hf-config-dir {hf_config_dir} not found (expected a directory with config.json)"
            )
        return hf_io.read_model_config(hf_config_dir), hf_config_dir
    for where in (ckpt_path, ckpt_root):
        found = find_convert_metadata(where)
        if found is not None:
            path, metadata = found
            if not isinstance(metadata.get("hf_config"), dict):
                raise ConversionError(f"{path} has no 'hf_config' object; pass --hf-config-dir")
            return metadata["hf_config"], path.parent
    raise ConversionError(
        f"{ckpt_root} has no kdscale_convert.json (next to the checkpoint or one level up): pass the HF model "
        "directory whose config.json describes this model (--hf-config-dir / hf_config_dir=)"
    )


def convert_mcore_to_hf(
    mcore_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    hf_config_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    progress: bool | None = None,
) -> Path:
    """Convert a Megatron checkpoint into an HF directory ``out_dir`` (safetensors + config + tokenizer, written
    atomically); returns it. ``dtype`` defaults to the checkpoint's."""
    root = Path(mcore_dir).expanduser()
    kind, ckpt_path = resolve_megatron_checkpoint(root)
    hf_config, tokenizer_dir = _hf_config_and_tokenizer_dir(root, ckpt_path, hf_config_dir)
    table = get_mapping_table(hf_config.get("model_type"))

    megatron_sd = read_megatron_checkpoint(ckpt_path, hf_config, dtype=dtype)
    embedding = megatron_sd.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise ConversionError(f"{ckpt_path}: the checkpoint has no embedding.word_embeddings.weight")
    dims = ModelDims.from_hf_config(hf_config, padded_vocab=int(embedding.shape[0]))

    hf_sd: dict[str, torch.Tensor] = {}
    bar = tqdm(
        total=table.num_parameters(dims, side="hf"),
        desc=f"Megatron ({kind}) -> HF ({table.name})",
        unit="param",
        disable=None if progress is None else not progress,
    )
    with bar:
        for key, tensor in table.megatron_to_hf(megatron_sd, dims):
            hf_sd[key] = tensor.contiguous()
            bar.update(1)

    out_config = dict(hf_config)
    out_dtype = next(iter(hf_sd.values())).dtype
    for dtype_key in ("torch_dtype", "dtype"):
        if dtype_key in out_config:
            out_config[dtype_key] = str(out_dtype).removeprefix("torch.")
    out = hf_io.save_hf_model_atomically(
        hf_sd, out_config, tokenizer_dir, out_dir, overwrite=overwrite, max_shard_size=max_shard_size
    )
    logger.info(f"wrote HF model {out} ({len(hf_sd)} tensors) from {kind} checkpoint {ckpt_path}")
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcore_to_hf",
        description="Convert a Megatron-Core checkpoint (torch_dist at any TP/PP layout, or legacy mp_rank_*) into "
        "a Hugging Face model directory.",
    )
    parser.add_argument(
        "--mcore-dir",
        required=True,
        help="checkpoint directory: written by hf_to_mcore, its model/ subdir, a kdscale Megatron "
        "checkpoint, a torch_dist dir, or a Megatron-LM dir (latest_checkpointed_iteration.txt)",
    )
    parser.add_argument("--out-dir", required=True, help="output HF directory (written atomically)")
    parser.add_argument(
        "--hf-config-dir",
        default=None,
        help="HF directory with the config.json (and tokenizer) of this model; needed only when the "
        "checkpoint has no kdscale_convert.json",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="write weights in this dtype (default: the checkpoint's)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with one clear message on a user error)."""
    args = _parser().parse_args(argv)

    def run() -> None:
        out = convert_mcore_to_hf(
            args.mcore_dir,
            args.out_dir,
            hf_config_dir=args.hf_config_dir,
            dtype=dtype_from_name(args.dtype) if args.dtype else None,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
        )
        print(f"wrote {out}")

    return cli_errors.run_cli("mcore_to_hf", run)
