"""``kdscale probe-teacher``: how far the configured teacher engine is from the Hugging Face float32 reference.

Before a long run, the teacher engine as configured (dtype, quantization, KV-cache dtype, attention) runs on a
few sequences of the run's own data, and its final-norm hidden states go through the checkpoint's output head
(``logits = hidden @ head.T`` in float32, as the students do). The reference is transformers' causal LM in
float32 on the same token ids; its logits are taken as they are (nothing recomputed). Per sequence and over all
tokens: per-token KL(reference || engine) in nats, top-1 agreement of the argmaxes, and the largest absolute
difference of the hidden states (the reference's captured at the output of its base model, which is what the
engines return).

Design:
- Sequences: the first ``num_sequences`` usable rows of ``data.eval_path`` (else ``data.train_path``), tokenized
  as training tokenizes them (same tokenizer, chat template, ``max_seq_len``, truncation), then cut to
  ``max_tokens``; one padded single-row micro-batch each, the loss mask being the response tokens.
- The engine runs first and is shut down before the reference loads, so the two never share a device's memory.
- Logits are compared over the tokenizer's vocabulary only (head rows past it are padding), in float64, in chunks
  of rows so that memory stays bounded for large vocabularies.

Assumption: the float32 reference fits on the teacher's device (the CPU, or one GPU).
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

import torch

from kdscale.data.batch import MicroBatch, gather_prediction_rows
from kdscale.data.layout import make_micro_batch
from kdscale.data.tokenization import TokenizedSample

logger = logging.getLogger(__name__)

REFERENCE_DTYPE = "float32"
_ROWS_PER_CHUNK = 128  # prediction rows per chunk of the logits comparison
_ROWS_TOKENIZED_PER_SEQUENCE = 16  # rows read and tokenized per requested sequence (at least 64)


def probe_teacher(cfg: Any, *, num_sequences: int = 4, max_tokens: int = 256) -> dict[str, Any]:
    """Compare the configured teacher engine with the float32 Hugging Face reference on a few sequences.

    Args:
        cfg: a validated run config (``KDConfig``); its ``teacher``, ``data`` and ``run`` sections are used.
        num_sequences: how many sequences to probe (the first usable rows of the eval data, else the train data).
        max_tokens: longest sequence in tokens (longer ones are cut at the end).

    Returns:
        A JSON-serializable dict: the settings (engine, dtype, quantization, device, model dir, reference dtype,
        data source), ``sequences`` (one dict of metrics per sequence) and ``all`` (the metrics over every token).
    """
    if num_sequences < 1:
        raise ValueError(f"--num-sequences must be at least 1, got {num_sequences}")
    if max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2 (a prompt token and a target), got {max_tokens}")
    from kdscale.checkpoint.hf_io import materialize_hf_dir, read_output_head

    teacher = cfg.teacher
    teacher_dir = materialize_hf_dir(teacher.model_path, cache_dir=Path(cfg.run.cache_dir))
    tokenizer = _training_tokenizer(cfg, teacher_dir)
    source = cfg.data.eval_path or cfg.data.train_path
    samples = _first_samples(cfg, source, tokenizer, num_sequences=num_sequences, max_tokens=max_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [make_micro_batch([sample], pad_token_id=pad_id or 0) for sample in samples]  # one row each
    device = _resolve_device(teacher.device)
    vocab_size = len(tokenizer)

    started = time.perf_counter()
    engine_hidden = _engine_hidden(cfg, teacher_dir, device, batches)
    engine_s = time.perf_counter() - started
    started = time.perf_counter()
    reference = _reference_outputs(teacher_dir, device, batches, vocab_size)
    reference_s = time.perf_counter() - started

    head = read_output_head(teacher_dir, dtype=torch.float32)[:vocab_size].to(device)
    sequences, per_token = [], []
    for index, (sample, hidden, (ref_logits, ref_hidden)) in enumerate(zip(samples, engine_hidden, reference)):
        kl, agree, hidden_diff = _compare(hidden.to(device), head, ref_logits, ref_hidden)
        per_token.append((kl, agree, hidden_diff))
        sequences.append(
            {"index": index, "sample_id": sample.sample_id, "length": len(sample), **_metrics(kl, agree, hidden_diff)}
        )
    kl_all = torch.cat([kl for kl, _, _ in per_token])
    agree_all = torch.cat([agree for _, agree, _ in per_token])
    diffs = [diff for _, _, diff in per_token]
    hidden_diff_all = None if None in diffs else max(diffs)
    return {
        "engine": teacher.engine,
        "dtype": teacher.dtype,
        **{key: getattr(teacher, key) for key in ("quantization", "kv_cache_dtype") if hasattr(teacher, key)},
        "device": device,
        "model_dir": str(teacher_dir.resolve()),
        "reference": "transformers",
        "reference_dtype": REFERENCE_DTYPE,
        "data_path": str(source),
        "vocab_size": vocab_size,
        "max_tokens": max_tokens,
        "num_sequences": len(samples),
        "engine_s": round(engine_s, 3),
        "reference_s": round(reference_s, 3),
        "sequences": sequences,
        "all": {"length": sum(len(s) for s in samples), **_metrics(kl_all, agree_all, hidden_diff_all)},
    }


def format_probe_table(result: dict[str, Any]) -> str:
    """The result of :func:`probe_teacher` as a header and an aligned text table, one row per sequence + "all"."""
    settings = [f"dtype {result['dtype']}"]
    if "quantization" in result:
        settings.append(f"quantization {result['quantization'] or 'none'}")
    if result.get("kv_cache_dtype") not in (None, "auto"):
        settings.append(f"kv cache {result['kv_cache_dtype']}")
    lines = [
        f"teacher engine {result['engine']} ({', '.join(settings)}) on {result['device']} vs "
        f"{result['reference']} {result['reference_dtype']} reference",
        f"model {result['model_dir']}",
        f"data {result['data_path']}: {result['num_sequences']} sequence(s) of <= {result['max_tokens']} tokens "
        f"| engine {result['engine_s']:.1f}s, reference {result['reference_s']:.1f}s",
        "KL(reference || engine) per predicted token, nats; top-1: argmax agreement; |dh|: hidden-state difference",
        "",
    ]
    header = ("seq", "sample", "length", "tokens", "mean KL", "max KL", "top-1 agree", "max |dh|")
    rows = [_table_row(str(s["index"]), str(s["sample_id"]), s) for s in result["sequences"]]
    rows.append(_table_row("all", "", result["all"]))
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))

    lines += [line(header), line(tuple("-" * w for w in widths)), *(line(row) for row in rows[:-1])]
    lines += [line(tuple("-" * w for w in widths)), line(rows[-1])]
    return "\n".join(lines)


def _table_row(seq: str, sample: str, m: dict[str, Any]) -> tuple[str, ...]:
    diff = m["max_abs_hidden_diff"]
    return (
        seq,
        sample,
        str(m["length"]),
        str(m["num_tokens"]),
        f"{m['mean_kl']:.3e}",
        f"{m['max_kl']:.3e}",
        f"{m['top1_agreement']:.2f}%",
        "n/a" if diff is None else f"{diff:.3e}",
    )


def _metrics(kl: torch.Tensor, agree: torch.Tensor, hidden_diff: float | None) -> dict[str, Any]:
    return {
        "num_tokens": int(kl.numel()),
        "mean_kl": float(kl.mean()) if kl.numel() else 0.0,
        "max_kl": float(kl.max()) if kl.numel() else 0.0,
        "top1_agreement": 100.0 * float(agree.double().mean()) if agree.numel() else 100.0,
        "max_abs_hidden_diff": hidden_diff,
    }


def _compare(
    hidden: torch.Tensor, head: torch.Tensor, ref_logits: torch.Tensor, ref_hidden: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """Per-token KL(reference || engine) [n] (float64, CPU), top-1 agreement [n] (bool, CPU), max |dh|."""
    kls, agrees = [], []
    for start in range(0, hidden.shape[0], _ROWS_PER_CHUNK):
        stop = start + _ROWS_PER_CHUNK
        engine_logp = (hidden[start:stop].float() @ head.T).double().log_softmax(dim=-1)
        ref_logp = ref_logits[start:stop].double().log_softmax(dim=-1)
        kl = (ref_logp.exp() * (ref_logp - engine_logp)).sum(dim=-1).clamp_min(0.0)  # rounding can go below 0
        kls.append(kl.cpu())
        agrees.append((ref_logp.argmax(dim=-1) == engine_logp.argmax(dim=-1)).cpu())
    hidden_diff = None
    if ref_hidden is not None and ref_hidden.shape == hidden.shape:
        hidden_diff = float((hidden.float() - ref_hidden.float()).abs().max()) if hidden.numel() else 0.0
    return torch.cat(kls), torch.cat(agrees), hidden_diff


def _training_tokenizer(cfg: Any, teacher_dir: Path) -> Any:
    """The tokenizer training uses: the student's (``student.model_path``), else the teacher's (a student derived
    from teacher layers copies it)."""
    from transformers import AutoTokenizer

    from kdscale.checkpoint.hf_io import resolve_model_path

    if cfg.student.model_path is not None:
        return AutoTokenizer.from_pretrained(resolve_model_path(cfg.student.model_path))
    return AutoTokenizer.from_pretrained(teacher_dir)


def _first_samples(cfg: Any, source: str, tokenizer: Any, *, num_sequences: int, max_tokens: int) -> list:
    """The first ``num_sequences`` usable rows of ``source`` tokenized as training does, cut to ``max_tokens``."""
    from kdscale.data import DataError, read_jsonl, tokenize_rows

    rows, stats = read_jsonl(source, max_bad_fraction=cfg.data.max_bad_fraction)
    rows = rows[: max(64, _ROWS_TOKENIZED_PER_SEQUENCE * num_sequences)]  # bounded: a train set may be huge
    tokenized, _ = tokenize_rows(
        rows, tokenizer, max_seq_len=cfg.data.max_seq_len, truncation=cfg.data.truncation, stats=stats
    )
    samples = []
    for sample in tokenized:
        cut = TokenizedSample(sample.sample_id, sample.input_ids[:max_tokens], sample.loss_mask[:max_tokens])
        if cut.num_loss_tokens > 0:  # else the prompt alone fills max_tokens
            samples.append(cut)
        if len(samples) == num_sequences:
            break
    if not samples:
        raise DataError(
            f"{source}: no row has a response token within the first {max_tokens} tokens of the "
            f"{len(rows)} rows read: raise --max-tokens"
        )
    if len(samples) < num_sequences:
        logger.warning(f"{source}: only {len(samples)} usable sequence(s) of the {num_sequences} asked for")
    return samples


def _resolve_device(setting: str) -> str:
    """``teacher.device`` with "auto" resolved (cuda when available), as the driver resolves it."""
    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


def _engine_hidden(cfg: Any, teacher_dir: Path, device: str, batches: list[MicroBatch]) -> list[torch.Tensor]:
    """The configured engine's float32 hidden rows for each micro-batch (CPU); the engine is always shut down."""
    from kdscale.teacher import build_teacher_engine, engine_kwargs

    kwargs = engine_kwargs(
        cfg.teacher, model_dir=str(teacher_dir), transport_dtype="float32", device=device, seed=cfg.run.seed
    )
    engine = build_teacher_engine(cfg.teacher.engine, **kwargs)
    try:
        engine.start()
        return [engine.forward(batch).as_tensor().float().clone() for batch in batches]
    finally:
        engine.shutdown()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def _reference_outputs(
    teacher_dir: Path, device: str, batches: list[MicroBatch], vocab_size: int
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per micro-batch: the float32 reference's logits at the prediction positions [n, vocab_size] and its base
    model's output there [n, H] (None if the base model cannot be found)."""
    from transformers import AutoModelForCausalLM

    from kdscale.checkpoint.hf_io import dtype_kwarg

    model = AutoModelForCausalLM.from_pretrained(
        teacher_dir, use_safetensors=True, trust_remote_code=False, **dtype_kwarg(torch.float32)
    )
    model = model.to(device).eval()
    captured: dict[str, torch.Tensor] = {}
    base = model.get_decoder() if hasattr(model, "get_decoder") else None

    def keep_hidden(_module, _args, output) -> None:
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    hook = base.register_forward_hook(keep_hidden) if base is not None and base is not model else None
    outputs = []
    try:
        with torch.inference_mode():
            for batch in batches:
                captured.clear()
                loss_mask = batch.loss_mask.to(device)
                out = model(
                    input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device),
                    use_cache=False,
                )
                logits = gather_prediction_rows(out.logits, loss_mask)[:, :vocab_size].float()
                hidden = captured.get("hidden")
                outputs.append((logits, None if hidden is None else gather_prediction_rows(hidden, loss_mask)))
    finally:
        if hook is not None:
            hook.remove()
        del model
        gc.collect()
    if not all(bool(torch.isfinite(logits).all()) for logits, _ in outputs):
        logger.warning("the float32 reference produced non-finite logits: the comparison is not meaningful")
    return outputs
