"""Make a small random student with its OWN tokenizer, offline, for cross-tokenizer distillation tests and examples.

The teacher kdscale ships examples for (SmolLM2-135M-Instruct) has a 49152-token byte-level BPE vocabulary and a
ChatML template ending turns with ``<|im_end|>``. This tool makes a student that shares neither: a byte-level BPE
tokenizer trained on the given JSONL data, a different chat template, and a randomly initialized Llama model sized
to that vocabulary. Nothing is downloaded.

Design:
- Tokenizer: byte-level BPE (``ByteLevel`` pre-tokenizer, no prefix space; ``ByteLevel`` decoder; a ``ByteLevel``
  post-processor that does not trim offsets, so character offsets keep their whitespace as SmolLM2's do). Special
  tokens ``<s>`` (0, BOS), ``</s>`` (1, EOS and end of turn), ``<pad>`` (2), then the 256 byte symbols, then the
  merges (``--vocab-size`` is an upper bound: the trainer stops earlier when no pair occurs twice). The training
  text is every message of every row, under its role header; it is deterministic for a given input.
- Chat template (:data:`CHAT_TEMPLATE`)::

      <s>### System:\\n{content}</s>\\n### User:\\n{content}</s>\\n### Assistant:\\n{content}</s>\\n

  and ``add_generation_prompt`` appends ``### Assistant:\\n``. Every row is checked with kdscale's own rule
  (:func:`kdscale.data.tokenization.tokenize_rows`): the prompt with the generation prompt must tokenize to a prefix
  of the conversation, and the assistant turn must contain ``</s>``. A row that fails is an error, not a warning.
  (A response that starts with two whitespace characters would fail it: the byte-level pre-tokenizer then joins the
  header's ``"\\n"`` with them.)
- Model: ``LlamaForCausalLM`` in float32, ``vocab_size = len(tokenizer)``, untied embeddings, weights drawn from a
  forked RNG seeded with ``--seed`` (the caller's RNG state is left alone).
- Output: built in a temporary directory next to ``--out`` and renamed into place, so a reader never sees a half
  written model. An existing ``--out`` is refused unless ``--force``, which replaces it.

Usage::

    python tools/dev/make_cross_tokenizer_student.py --data data/quickstart/train.jsonl --out runs/student-xtok
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kdscale.data.jsonl import DataError, Row, read_jsonl

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2
NUM_BYTE_SYMBOLS = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + NUM_BYTE_SYMBOLS
MAX_POSITION_EMBEDDINGS = 2048

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '### ' + (message['role'] | capitalize) + ':\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


class StudentError(ValueError):
    """The student cannot be made as asked (bad arguments, or data the chat template cannot tokenize)."""


def make_student(
    data_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Train the tokenizer on ``data_paths``, build the random model, and write both to ``out_dir``.

    Returns ``out_dir`` as a Path. Raises :class:`StudentError` (or :class:`kdscale.data.jsonl.DataError`, a
    ``ValueError`` too) for bad arguments, unreadable data, a row the chat template fails on, or an existing
    ``out_dir`` without ``force``.
    """
    out_dir = Path(out_dir)
    _validate(data_paths, out_dir, vocab_size=vocab_size, hidden_size=hidden_size, layers=layers, heads=heads,
              force=force)  # fmt: skip
    datasets = [read_jsonl(path) for path in data_paths]
    tokenizer = _train_tokenizer([row for rows, _ in datasets for row in rows], vocab_size=vocab_size)
    for rows, stats in datasets:
        _check_template(rows, stats, tokenizer)
    model = _build_model(tokenizer, hidden_size=hidden_size, layers=layers, heads=heads, seed=seed)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should be an ordinary directory
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _portable_tokenizer_class(staging / "tokenizer_config.json")
        _move_into_place(staging, out_dir, force=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    return out_dir


def _validate(
    data_paths: Sequence[str | Path],
    out_dir: Path,
    *,
    vocab_size: int,
    hidden_size: int,
    layers: int,
    heads: int,
    force: bool,
) -> None:
    if isinstance(data_paths, (str, Path)) or not data_paths:
        raise StudentError("give at least one JSONL data file (--data PATH, repeatable)")
    for path in data_paths:
        if not Path(path).is_file():
            what = "is a directory, not a file" if Path(path).is_dir() else "does not exist"
            raise StudentError(f"data file {str(path)!r} {what}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise StudentError(
            f"--vocab-size must be at least {MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + "
            f"{NUM_BYTE_SYMBOLS} byte symbols), got {vocab_size}"
        )
    if layers < 1 or heads < 1 or hidden_size < 1:
        raise StudentError(
            f"--layers, --heads and --hidden-size must be positive, got {layers}, {heads}, {hidden_size}"
        )
    if hidden_size % heads or (hidden_size // heads) % 2:
        raise StudentError(
            f"--hidden-size ({hidden_size}) must be a multiple of --heads ({heads}) with an even head size "
            f"(rotary embeddings), got head size {hidden_size / heads:g}"
        )
    if out_dir.exists() and not force:
        raise StudentError(f"{str(out_dir)!r} already exists: pass --force to replace it, or choose another --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise StudentError(f"{str(out_dir)!r} exists and is not a directory: remove it or choose another --out")


def _training_text(rows: Sequence[Row]) -> Iterator[str]:
    """Each message under its role header, as the chat template writes it (without the special tokens)."""
    for row in rows:
        for message in row.messages:
            yield f"### {message['role'].capitalize()}:\n{message['content']}\n"


def _train_tokenizer(rows: Sequence[Row], *, vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_text(rows), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )


def _check_template(rows: Sequence[Row], stats: Any, tokenizer: Any) -> None:
    """Every row must pass kdscale's chat tokenization (prompt is a prefix; the turn ends with ``</s>``)."""
    from kdscale.data.tokenization import tokenize_rows

    rule = (
        "the prompt rendered with add_generation_prompt=True must tokenize to a prefix of the whole conversation "
        "(a response starting with two whitespace characters breaks this)"
    )
    try:
        _, checked = tokenize_rows(rows, tokenizer, max_seq_len=sys.maxsize, truncation="drop", stats=stats)
    except DataError as e:
        raise StudentError(f"the student chat template fails on every row of {stats.source}: {rule}. {e}") from None
    if checked.dropped:
        raise StudentError(
            f"the student chat template fails on rows kdscale would drop: {rule}. {checked.dropped_report()}. "
            "Fix or remove those rows"
        )


def _portable_tokenizer_class(config_path: Path) -> None:
    """Name the class every transformers >= 4.51 knows (v5 writes its new name for it, ``TokenizersBackend``)."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _build_model(tokenizer: Any, *, hidden_size: int, layers: int, heads: int, seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    return model.eval()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(staging: Path, out_dir: Path, *, force: bool) -> None:
    """Rename ``staging`` to ``out_dir``; with ``force`` an existing ``out_dir`` is moved aside first, then removed."""
    old = None
    if out_dir.exists():
        if not force:
            raise StudentError(f"{str(out_dir)!r} already exists: pass --force to replace it, or choose another --out")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / out_dir.name)
    try:
        os.rename(staging, out_dir)
    except OSError:
        if old is not None:  # put the previous student back (if that fails too, it stays in ``old``)
            os.rename(old / out_dir.name, out_dir)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _summary(out_dir: Path) -> tuple[int, int]:
    """``(vocab_size, num_params)`` of the written model, read back from its files."""
    from safetensors import safe_open

    num_params = 0
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                num_params += math.prod(f.get_slice(name).get_shape())
    return int(json.loads((out_dir / "config.json").read_text())["vocab_size"]), num_params


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``--help`` for the options)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", required=True, metavar="JSONL",
                        help="training data (prompt/response or messages rows); repeat for more files")  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="directory to write the model and tokenizer to")
    parser.add_argument("--vocab-size", type=int, default=2048,
                        help=f"largest vocabulary, specials included (at least {MIN_VOCAB_SIZE})")  # fmt: skip
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    sizes = dict(vocab_size=args.vocab_size, hidden_size=args.hidden_size, layers=args.layers, heads=args.heads)
    try:
        _validate(args.data, args.out, **sizes, force=args.force)  # before importing torch: bad flags fail fast
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" for a 4 MB file
        out_dir = make_student(args.data, args.out, **sizes, seed=args.seed, force=args.force)
    except ValueError as e:  # StudentError, DataError, a template without </s> in the assistant turn
        parser.error(str(e))
    vocab_size, num_params = _summary(out_dir)
    print(
        f"student: vocab {vocab_size} tokens, {num_params / 1e6:.2f}M params, {args.layers} layers x "
        f"{args.hidden_size} hidden, written to {out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
