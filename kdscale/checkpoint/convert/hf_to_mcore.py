"""Convert a Hugging Face model directory into a Megatron-Core torch_dist checkpoint (loadable at any TP/PP/VPP).

Usage::

    python tools/checkpoint_convert/hf_to_mcore.py --hf-dir ./SmolLM2-135M --out-dir ./smollm2-mcore
    # or, in Python
    convert_hf_to_mcore("./SmolLM2-135M", "./smollm2-mcore")

The output directory holds ``model/`` (torch_dist), ``kdscale_convert.json`` (the HF config and padding) and the
tokenizer files; see ``formats.py``. Runs on CPU in one process; no GPU needed.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from kdscale import cli_errors
from kdscale.checkpoint import hf_io
from kdscale.checkpoint.convert.families import get_mapping_table
from kdscale.checkpoint.convert.formats import MODEL_SUBDIR, dtype_from_name, write_convert_metadata, write_torch_dist
from kdscale.checkpoint.convert.mapping import ConversionError, ModelDims

logger = logging.getLogger(__name__)


class LazySafetensors(Mapping[str, torch.Tensor]):
    """The tensors of an HF safetensors directory, read one at a time on access (optionally cast)."""

    def __init__(self, model_dir: Path, dtype: torch.dtype | None = None) -> None:
        self._index = hf_io.safetensors_key_index(model_dir)
        self._dtype = dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = hf_io.read_tensor(self._index[key], key)
        return tensor.to(self._dtype) if self._dtype is not None else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def first_dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's first tensor (the checkpoint's storage dtype)."""
        key = next(iter(self._index))
        return hf_io.read_tensor(self._index[key], key).dtype


def _check_hf_dir(hf_dir: Path) -> None:
    if not hf_dir.exists():
        raise FileNotFoundError(f"HF model directory {hf_dir} not found")
    if not hf_dir.is_dir():
        raise hf_io.ModelPathError(
            f"{hf_dir} is not a directory: expected an HF model directory (config.json + *.safetensors); convert "
            "a .gguf first with kdscale.checkpoint.hf_io.materialize_hf_dir"
        )


def convert_hf_to_mcore(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    make_vocab_size_divisible_by: int = 128,
    tensor_parallel_size: int = 1,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Convert ``hf_dir`` into a torch_dist checkpoint directory ``out_dir`` (written atomically); returns it.

    Args:
        hf_dir: an HF directory (config.json + safetensors) of a supported ``model_type``.
        out_dir: the output directory (``model/`` + ``kdscale_convert.json`` + tokenizer files).
        make_vocab_size_divisible_by: Megatron's vocabulary padding multiple (rows are padded with zeros).
        tensor_parallel_size: pad as Megatron does for this TP (multiple = divisible_by * TP). The padded size is
            fixed in the checkpoint; models that load it must be built with that many rows (any TP dividing it).
        dtype: store the weights in this dtype (default: the checkpoint's own).
        overwrite: replace an existing ``out_dir`` once the new one is complete.
        progress: show a progress bar (None: only on a terminal).
    """
    hf_dir = Path(hf_dir).expanduser()
    _check_hf_dir(hf_dir)
    hf_config = hf_io.read_model_config(hf_dir)
    table = get_mapping_table(hf_config.get("model_type"))  # unsupported architecture: fail before anything heavy
    try:
        dims = ModelDims.from_hf_config(
            hf_config,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            tensor_parallel_size=tensor_parallel_size,
        )
    except ConversionError as exc:
        raise ConversionError(f"{hf_dir}/{exc}") from None
    source = LazySafetensors(hf_dir, dtype)
    dtype = dtype or source.first_dtype()

    megatron_sd: dict[str, torch.Tensor] = {}
    bar = tqdm(
        total=table.num_parameters(dims),
        desc=f"HF -> Megatron ({table.name})",
        unit="param",
        disable=None if progress is None else not progress,
    )
    with bar:
        for key, tensor in table.hf_to_megatron(source, dims):
            megatron_sd[key] = tensor.contiguous()
            bar.update(1)

    with hf_io.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_torch_dist(megatron_sd, hf_config, tmp / MODEL_SUBDIR, padded_vocab=dims.padded_vocab_size, dtype=dtype)
        write_convert_metadata(
            tmp,
            hf_config=hf_config,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            padded_vocab=dims.padded_vocab_size,
            dtype=dtype,
            source=str(hf_dir.absolute()),
        )
        hf_io.copy_tokenizer_files(hf_dir, tmp)
    out = Path(out_dir).expanduser().absolute()
    logger.info(
        f"wrote torch_dist checkpoint {out} ({len(megatron_sd)} tensors, padded vocab {dims.padded_vocab_size})"
    )
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf_to_mcore",
        description="Convert a Hugging Face model directory (llama, mistral, qwen2, qwen3) into a Megatron-Core "
        "torch_dist checkpoint that loads at any TP/PP/VPP layout.",
    )
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    parser.add_argument("--out-dir", required=True, help="output directory (written atomically)")
    parser.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Megatron vocabulary padding multiple (default 128)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="pad the vocabulary as Megatron does for this TP (default 1; the checkpoint still "
        "loads at any TP that divides the padded vocabulary)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="store weights in this dtype (default: the HF checkpoint's)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with one clear message on a user error)."""
    args = _parser().parse_args(argv)

    def run() -> None:
        out = convert_hf_to_mcore(
            args.hf_dir,
            args.out_dir,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            tensor_parallel_size=args.tensor_parallel_size,
            dtype=dtype_from_name(args.dtype) if args.dtype else None,
            overwrite=args.overwrite,
        )
        print(f"wrote {out}")

    return cli_errors.run_cli("hf_to_mcore", run)
