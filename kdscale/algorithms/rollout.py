"""Rollout engines: sample completions from the student's CURRENT weights (the generation half of on-policy
distillation).

Design:
- **Token ids in, token ids out.** A prompt is a list of token ids and a :class:`Rollout` keeps the completion ids
  exactly as the engine sampled them; they are never decoded to text and re-tokenized. Re-tokenizing generated text
  (as KDFlow does) does not round-trip: BPE merges across the prompt/completion boundary and special tokens change
  the ids, so the student would be trained on, and the teacher would score, a sequence the student never produced.
- **Finish reasons.** ``"stop"``: the model emitted a stop token, which stays as the LAST completion id (it is a
  target: the student learns when to stop) and nothing after it is kept. ``"length"``: ``max_new_tokens`` ids were
  generated without a stop token, and NO EOS is appended: forcing one (as KDFlow does) would train the student to
  end mid-thought on a token it never sampled, at a position where the teacher would not end either.
- **Stop tokens** are the model's EOS ids (``eos_token_id`` of config.json and generation_config.json, as SGLang
  reads them) plus :attr:`SamplingConfig.stop_token_ids`. The EOS ids cannot be switched off: SGLang 0.5.23's
  ``ignore_eos`` turns ``stop_token_ids`` off too (``Req._check_token_based_finish``), so both engines keep them.
- **Weight sync.** ``update_weights(named_tensors, version=)`` takes full (unsharded) tensors by Hugging Face name,
  in buckets of at most ``bucket_bytes`` (one tensor larger than that is a bucket alone). Every name must exist with
  the same shape, and by default every parameter must be sent (a parameter left out would silently keep stale
  weights): a :class:`WeightMismatchError` names the offenders. A failed update leaves the engine without a weight
  version, and :meth:`generate` refuses to run until a complete update succeeds.
- **Rollouts to training samples.** :meth:`Rollout.to_tokenized_sample` gives a
  :class:`~kdscale.data.tokenization.TokenizedSample` (loss mask on the completion), which the micro-batch layout
  (:mod:`kdscale.data.layout`) sends to the teacher and the student like any dataset sample.

Engines:
- :class:`HFRolloutEngine`: a transformers causal LM in this process (the CPU path and the reference): batched,
  left-padded ``model.generate``; sampling is reproducible for a given seed and batch.
- :class:`SGLangRolloutEngine`: an offline SGLang engine (the GPU production path; SGLang's CPU engine on CPU),
  started, timed and shut down by :class:`~kdscale.teacher.sglang_engine.SGLangTeacherEngine`'s machinery.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from kdscale.checkpoint.hf_io import dtype_kwarg, resolve_model_path, safetensors_key_index
from kdscale.data.tokenization import TokenizedSample

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
FINISH_REASONS = ("stop", "length")
DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightMismatchError(ValueError):
    """Weights sent to a rollout engine do not match its model: unknown or duplicate names, wrong shapes, or
    parameters left out."""


class RolloutEngineError(RuntimeError):
    """A rollout engine cannot serve the request (not started, weights in an unknown state, bad engine output)."""


# ------------------------------------------------------------------------------------------------ data types


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample rollouts.

    Args:
        n: samples per prompt.
        max_new_tokens: longest completion; a completion this long without a stop token finishes ``"length"``.
        temperature: 0 is greedy decoding.
        top_p: nucleus sampling (1.0: off).
        top_k: keep the k most likely tokens (-1: off).
        seed: seed of the sampling.
        stop_token_ids: stop tokens IN ADDITION to the model's EOS ids (which always stop, see the module doc).
    """

    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.n < 1:
            raise ValueError(f"n (samples per prompt) must be at least 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or at least 1, got {self.top_k}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (>= 0), got {list(self.stop_token_ids)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Rollout:
    """One sampled completion of one prompt.

    Attributes:
        prompt_ids: the prompt's token ids, as given.
        completion_ids: the sampled token ids, exactly as generated (never re-tokenized). With ``finish_reason ==
            "stop"`` the last id is the stop token; with ``"length"`` there is no EOS at the end.
        finish_reason: ``"stop"`` (a stop token was sampled) or ``"length"`` (``max_new_tokens`` reached).
        prompt_index: index of the prompt in the :meth:`generate` call.
        sample_index: index of this sample among the prompt's ``n``.
        weight_version: the weight version (optimizer step) of the weights that generated it.
    """

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_index: int
    sample_index: int
    weight_version: int

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if not self.prompt_ids or not self.completion_ids:
            raise ValueError(
                f"a rollout needs a non-empty prompt and completion, got {len(self.prompt_ids)} prompt and "
                f"{len(self.completion_ids)} completion ids"
            )

    def to_tokenized_sample(self, sample_id: int) -> TokenizedSample:
        """The rollout as a training sample: ``input_ids = prompt + completion`` (int32), ``loss_mask`` True exactly
        on the completion ids (the stop token included when there is one)."""
        ids = np.asarray(self.prompt_ids + self.completion_ids, dtype=np.int32)
        mask = np.zeros(ids.shape[0], dtype=bool)
        mask[len(self.prompt_ids) :] = True
        return TokenizedSample(sample_id=sample_id, input_ids=ids, loss_mask=mask)


class RolloutEngine(Protocol):
    """What the on-policy driver needs from a rollout engine."""

    weight_version: int | None

    def start(self) -> None: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: int) -> None: ...

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingConfig) -> list[Rollout]: ...

    def shutdown(self) -> None: ...


# ---------------------------------------------------------------------------------------- shared helpers


def iter_weight_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[tuple[list[tuple[str, torch.Tensor]], bool]]:
    """Group ``(name, tensor)`` pairs, in order, into buckets of at most ``bucket_bytes`` (a larger tensor is a
    bucket alone); yields ``(bucket, is_last)``. Consumes the iterable lazily, so a generator that gathers one
    tensor at a time holds at most one bucket (plus one tensor) in memory."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"named_tensors must yield (str, torch.Tensor) pairs, got ({type(name).__name__}, "
                            f"{type(tensor).__name__})")
        if type(tensor).__name__ == "DTensor":
            raise TypeError(f"{name} is a sharded DTensor: send full tensors (tensor.full_tensor())")
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket, False
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    yield bucket, True


class _WeightCheck:
    """Checks one weight update against the model's parameters: names, shapes, duplicates and completeness.

    ``shapes`` maps every accepted name to its shape; ``groups`` maps a name to the parameter it writes (tied
    weights: two names, one parameter), so completeness counts parameters, not names."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], groups: dict[str, str] | None = None) -> None:
        self.shapes = shapes
        self.groups = groups or {}
        self.seen: set[str] = set()

    def check(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        unknown = [name for name, _ in bucket if name not in self.shapes]
        if unknown:
            raise WeightMismatchError(
                f"{len(unknown)} weight name(s) not in the rollout model: {unknown[:5]}"
                f"{' ...' if len(unknown) > 5 else ''} (names must be the Hugging Face checkpoint's, e.g. "
                f"{sorted(self.shapes)[:3]})"
            )
        wrong = [(n, tuple(t.shape), self.shapes[n]) for n, t in bucket if tuple(t.shape) != self.shapes[n]]
        if wrong:
            raise WeightMismatchError(
                "weight shape(s) differ from the rollout model's: "
                + ", ".join(f"{n}: got {list(got)}, expected {list(want)}" for n, got, want in wrong[:5])
            )
        for name, _ in bucket:
            if name in self.seen:
                raise WeightMismatchError(f"weight {name} was sent twice in one update")
            self.seen.add(name)

    def finish(self) -> None:
        written = {self.groups.get(n, n) for n in self.seen}
        missing = sorted({self.groups.get(n, n) for n in self.shapes} - written)
        if missing:
            raise WeightMismatchError(
                f"the update left out {len(missing)} of {len(missing) + len(written)} parameters: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} (every parameter must be sent; pass require_all=False for a "
                "deliberate partial update)"
            )


def read_eos_token_ids(model_dir: str | os.PathLike[str]) -> tuple[int, ...]:
    """EOS ids of an HF model directory: ``eos_token_id`` of config.json and generation_config.json (an int or a
    list each), merged as SGLang does (``ModelConfig._get_hf_eos_token_id``)."""
    ids: set[int] = set()
    for file in ("config.json", "generation_config.json"):
        path = Path(model_dir) / file
        if path.is_file():
            config = json.loads(path.read_text())
            for section in (config, config.get("text_config") or {}):
                value = section.get("eos_token_id")
                if value is not None:
                    ids.update([value] if isinstance(value, int) else value)
    return tuple(sorted(ids))


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    out = []
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token id")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        out.append(ids)
    return out


def _require_version(version: int | None) -> int:
    if version is None:
        raise RolloutEngineError(
            "the rollout weights are in an unknown state (the last update_weights failed part way): call "
            "update_weights with the full state dict before generating"
        )
    return version


def _check_token_ids(completion: Sequence[int], token_vocab_size: int | None) -> None:
    if token_vocab_size is not None and any(t >= token_vocab_size for t in completion):
        raise RolloutEngineError(
            f"the engine sampled ids outside the tokenizer's vocabulary [0, {token_vocab_size}): "
            f"{[t for t in completion if t >= token_vocab_size][:5]}; they must be masked out (token_vocab_size)"
        )


def _cut_completion(ids: Sequence[int], stop_ids: set[int], max_new_tokens: int) -> tuple[list[int], FinishReason]:
    """Generated ids up to and including the first stop token (``"stop"``), or all ``max_new_tokens`` of them
    (``"length"``); whatever an engine wrote after a stop (padding) is dropped."""
    for k, token in enumerate(ids):
        if token in stop_ids:
            return list(ids[: k + 1]), "stop"
    if len(ids) != max_new_tokens:
        raise RolloutEngineError(
            f"engine returned {len(ids)} ids without a stop token for max_new_tokens={max_new_tokens}"
        )
    return list(ids), "length"


# ------------------------------------------------------------------------------------------ the hf engine


class HFRolloutEngine:
    """Rollouts from a transformers causal LM in this process (the CPU path and the reference engine).

    Generation is ``model.generate`` on left-padded batches of at most ``max_batch_size`` samples (each prompt
    repeated ``n`` times), under a forked torch RNG seeded with ``params.seed``: the same prompts, parameters and
    weights give the same rollouts. Greedy decoding (``temperature=0``) equals an argmax loop on each prompt alone.

    Args:
        model_path: the student's HF model directory (config.json + safetensors); its weights are version 0.
        dtype: weights and compute dtype ("float32", "bfloat16" or "float16").
        device: torch device ("cpu", "cuda", "cuda:1", ...).
        attn_implementation: transformers' attention implementation (None: its default).
        max_batch_size: most samples per ``generate`` call.
        bucket_bytes: default weight bucket size of :meth:`update_weights`.
        num_threads: torch CPU threads (None: leave as is).
        token_vocab_size: ids at or above it are never sampled (the tokenizer's size, when the embedding has
            padding rows beyond it, as Qwen's do; a padding id is no token and would break the teacher and loss).
    """

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str],
        dtype: str = "float32",
        device: str = "cpu",
        attn_implementation: str | None = None,
        max_batch_size: int = 64,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        num_threads: int | None = None,
        token_vocab_size: int | None = None,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"rollout dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        self.token_vocab_size = token_vocab_size
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        path = resolve_model_path(model_path)
        if not path.is_dir():
            raise ValueError(f"rollout model_path {os.fspath(model_path)!r} must be an HF model directory")
        self.model_path = path
        self.dtype = dtype
        self.device = torch.device(device)
        self.attn_implementation = attn_implementation
        self.max_batch_size = max_batch_size
        self.bucket_bytes = bucket_bytes
        self.num_threads = num_threads
        self.eos_token_ids = read_eos_token_ids(path)
        self.weight_version: int | None = None
        self._model: Any = None
        self._targets: dict[str, torch.Tensor] = {}
        self._groups: dict[str, str] = {}

    @property
    def model(self) -> Any:
        """The transformers model (read-only use: tests compare it with a manual decoding loop)."""
        self._require_started("model")
        return self._model

    def start(self) -> None:
        """Load the model (idempotent)."""
        if self._model is not None:
            return
        from transformers import AutoModelForCausalLM, GenerationConfig

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        kwargs: dict[str, Any] = {"trust_remote_code": False, "use_safetensors": True}
        kwargs.update(dtype_kwarg(_DTYPES[self.dtype]))
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(self.model_path, **kwargs).to(self.device).eval()
        model.requires_grad_(False)
        # Every sampling setting is passed per call; the checkpoint's generation_config.json (repetition penalty,
        # min length, top_k=50 defaults, ...) must not leak into rollouts.
        model.generation_config = GenerationConfig()
        self._model = model
        self._targets = dict(model.state_dict(keep_vars=True))
        first_name: dict[int, str] = {}
        for name, tensor in self._targets.items():  # tied weights: one parameter under two names
            self._groups[name] = first_name.setdefault(id(tensor), name)
        self.weight_version = 0

    def shutdown(self) -> None:
        """Free the model (idempotent)."""
        self._model, self._targets, self._groups = None, {}, {}
        self.weight_version = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights by HF name (detached; shared with the model, do not modify)."""
        self._require_started("state_dict")
        return {name: tensor.detach() for name, tensor in self._targets.items()}

    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        version: int,
        bucket_bytes: int | None = None,
        require_all: bool = True,
    ) -> None:
        """Copy new weights in, bucket by bucket, and record ``version`` (see the module doc for the checks).

        Raises:
            WeightMismatchError: an unknown or duplicate name, a wrong shape, or (``require_all``) a parameter
                left out. The weights may then be partly updated: the engine has no weight version until a
                complete update succeeds.
        """
        self._require_started("update_weights")
        self.weight_version = None
        check = _WeightCheck({n: tuple(t.shape) for n, t in self._targets.items()}, self._groups)
        with torch.no_grad():
            for bucket, _ in iter_weight_buckets(named_tensors, bucket_bytes=bucket_bytes or self.bucket_bytes):
                check.check(bucket)
                for name, tensor in bucket:
                    self._targets[name].copy_(tensor.detach())
        if require_all:
            check.finish()
        self.weight_version = int(version)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingConfig) -> list[Rollout]:
        """``params.n`` rollouts per prompt, in prompt order then sample order."""
        self._require_started("generate")
        version = _require_version(self.weight_version)
        from transformers import GenerationConfig

        prompts = _check_prompts(prompts, int(self._model.config.vocab_size))
        stop_ids = set(self.eos_token_ids) | set(params.stop_token_ids)
        if not stop_ids:
            raise ValueError("the model has no eos_token_id: pass SamplingConfig.stop_token_ids")
        pad_id = self._model.config.pad_token_id
        pad_id = int(pad_id) if pad_id is not None else min(stop_ids)  # any id: padding is masked and cut
        sampling = {"do_sample": False} if params.greedy else {
            "do_sample": True, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else 0,  # 0: off (None would mean transformers' 50)
        }
        model_vocab = int(self._model.config.vocab_size)
        if self.token_vocab_size is not None and self.token_vocab_size < model_vocab:
            sampling["suppress_tokens"] = list(range(self.token_vocab_size, model_vocab))  # padding rows
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, min_new_tokens=0, eos_token_id=sorted(stop_ids),
            pad_token_id=pad_id, repetition_penalty=1.0, num_beams=1, use_cache=True, **sampling,
        )
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        rollouts: list[Rollout] = []
        devices = []
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(params.seed)
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start : start + self.max_batch_size]
                batch = [prompts[i] for i, _ in chunk]
                width = max(len(p) for p in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for b, prompt in enumerate(batch):
                    input_ids[b, width - len(prompt) :] = torch.tensor(prompt)
                    attention_mask[b, width - len(prompt) :] = 1
                out = self._model.generate(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                    generation_config=config,
                )
                new_ids = out[:, width:].tolist()
                for (i, j), ids in zip(chunk, new_ids):
                    completion, reason = _cut_completion(ids, stop_ids, params.max_new_tokens)
                    _check_token_ids(completion, self.token_vocab_size)
                    rollouts.append(Rollout(tuple(prompts[i]), tuple(completion), reason, i, j, version))
        return rollouts

    def _require_started(self, what: str) -> None:
        if self._model is None:
            raise RolloutEngineError(f"HFRolloutEngine.{what} called before start(); call engine.start() first")


# -------------------------------------------------------------------------------------- the sglang engine


class SGLangRolloutEngine:
    """Rollouts from an offline SGLang engine (GPU production path; SGLang's CPU engine on CPU).

    The engine's life (start in a long-lived owner thread, per-call timeouts, CPU environment and shims, shutdown
    that leaves no process and no /dev/shm file) is :class:`~kdscale.teacher.sglang_engine.SGLangTeacherEngine`'s,
    held here as ``host``; only generation and weight sync are added. Requests are token ids
    (``skip_tokenizer_init``), ``n`` samples of a prompt are ``n`` requests, and the engine records the weight
    version of every update and reports it per request (``meta_info["weight_version"]``), which is checked.

    Weight sync runs ``update_weights_from_tensor`` calls (one per bucket, serialized per tensor-parallel rank as
    ``Engine.update_weights_from_tensor`` does) inside one ``begin_weight_update`` / ``end_weight_update`` session,
    which SGLang 0.5.23 requires; the cache is flushed and the version recorded with the last bucket. Names are
    those of the HF checkpoint (SGLang maps q/k/v and gate/up onto its fused parameters) and are checked against the
    checkpoint's safetensors headers first, because SGLang's ``load_weights`` skips names it does not know.

    The host runs with the teacher's settings, which rollouts do not need but which are correct for them: no radix
    cache (the ``n`` samples of a prompt each prefill it) and no chunked prefill.

    Sampling: ``random_seed`` seeds the engine once; reproducible per-request sampling needs
    ``engine_args={"enable_deterministic_inference": True}`` (SGLang then uses each request's ``sampling_seed``,
    which is set from ``params.seed``, the prompt index and the sample index).

    Args:
        model_path: the student's HF model directory; its weights are version 0.
        dtype: "bfloat16", "float16" or "float32".
        device: "cuda" or "cpu".
        tp_size: SGLang's tensor-parallel size (data parallelism: one engine per replica; SGLang 0.5.23 refuses
            ``update_weights_from_tensor`` with dp_size > 1).
        mem_fraction_static, engine_args, enable_memory_saver, num_threads, startup_timeout_s, request_timeout_s,
        seed: as for :class:`~kdscale.teacher.sglang_engine.SGLangTeacherEngine`.
        bucket_bytes: default weight bucket size of :meth:`update_weights`.
        token_vocab_size: ids at or above it are never sampled (``logit_bias``), as for :class:`HFRolloutEngine`.
    """

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str],
        dtype: str = "bfloat16",
        device: str = "cuda",
        tp_size: int = 1,
        mem_fraction_static: float | None = None,
        engine_args: dict[str, Any] | None = None,
        enable_memory_saver: bool = False,
        num_threads: int | None = None,
        startup_timeout_s: float = 900.0,
        request_timeout_s: float = 600.0,
        seed: int = 0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        token_vocab_size: int | None = None,
    ) -> None:
        from kdscale.teacher.sglang_engine import SGLangTeacherEngine

        self.token_vocab_size = token_vocab_size
        engine_args = dict(engine_args or {})
        if "weight_version" in engine_args:
            raise ValueError("engine_args sets weight_version: the rollout engine numbers weight versions itself")
        engine_args["weight_version"] = "0"
        self.host = SGLangTeacherEngine(
            model_path=model_path, dtype=dtype, device=device, tp_size=tp_size,
            mem_fraction_static=mem_fraction_static, engine_args=engine_args, enable_memory_saver=enable_memory_saver,
            num_threads=num_threads, startup_timeout_s=startup_timeout_s, request_timeout_s=request_timeout_s,
            seed=seed,
        )
        self.model_path = self.host.model_path
        self.tp_size = tp_size
        self.bucket_bytes = bucket_bytes
        self.eos_token_ids = read_eos_token_ids(self.model_path)
        self.weight_version: int | None = None
        config = json.loads((self.model_path / "config.json").read_text())
        self.vocab_size = int(config.get("vocab_size") or (config.get("text_config") or {})["vocab_size"])
        self._shapes, self._groups = _checkpoint_shapes(self.model_path, tied=bool(config.get("tie_word_embeddings")))

    def start(self) -> None:
        """Start the engine (idempotent; raises :class:`~kdscale.teacher.sglang_engine.TeacherEngineError` if it is
        not up within ``startup_timeout_s``)."""
        if not self.host.started:
            self.host.start()
            self.weight_version = 0

    def shutdown(self) -> None:
        """Stop the engine's processes and remove its /dev/shm files (idempotent)."""
        self.host.shutdown()
        self.weight_version = None

    def sleep(self) -> None:
        """Release the engine's GPU memory (weights and KV cache) while the student trains."""
        self.host.sleep()

    def wake(self) -> None:
        """Resume what :meth:`sleep` released."""
        self.host.wake()

    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        version: int,
        bucket_bytes: int | None = None,
        require_all: bool = True,
    ) -> None:
        """Send new weights bucket by bucket in one weight-update session and record ``version``.

        Raises:
            WeightMismatchError: as :meth:`HFRolloutEngine.update_weights` (checked before each bucket is sent).
            TeacherEngineError: SGLang refused or failed an update call (its message is included).
        """
        from sglang.srt.managers.io_struct import (
            BeginWeightUpdateReqInput,
            EndWeightUpdateReqInput,
            UpdateWeightsFromTensorReqInput,
        )
        from sglang.srt.utils import MultiprocessingSerializer

        self._require_started("update_weights")
        if self.host.asleep:
            self.host.wake()
        self.weight_version = None
        check = _WeightCheck(self._shapes, self._groups)
        tp_size = self.tp_size
        self._call(lambda e: e.tokenizer_manager.begin_weight_update(BeginWeightUpdateReqInput(), None),
                   what="begin_weight_update")
        try:
            for bucket, is_last in iter_weight_buckets(named_tensors, bucket_bytes=bucket_bytes or self.bucket_bytes):
                check.check(bucket)
                if is_last and require_all:
                    check.finish()
                # A CPU tensor is serialized by moving its storage to shared memory in place: send copies, so
                # that the caller's tensors (the student's parameters) stay where they are.
                payload = [(n, t.detach().clone() if t.device.type == "cpu" else t.detach()) for n, t in bucket]
                req = UpdateWeightsFromTensorReqInput(
                    serialized_named_tensors=[MultiprocessingSerializer.serialize(payload) for _ in range(tp_size)],
                    flush_cache=is_last, weight_version=str(int(version)) if is_last else None,
                )
                self._call(lambda e, req=req: e.tokenizer_manager.update_weights_from_tensor(req, None),
                           what="update_weights_from_tensor")
        except BaseException:
            try:  # close the session so that the next update can open one; the first error is the one raised
                self._call(lambda e: e.tokenizer_manager.end_weight_update(EndWeightUpdateReqInput(), None),
                           what="end_weight_update")
            except Exception as exc:  # noqa: BLE001
                logger.warning(f"closing SGLang's weight-update session after a failed update failed too: {exc!r}")
            raise
        self._call(lambda e: e.tokenizer_manager.end_weight_update(EndWeightUpdateReqInput(), None),
                   what="end_weight_update")
        self.weight_version = int(version)

    def read_weight(self, name: str) -> torch.Tensor:
        """One weight as the engine holds it, by HF name, as float32 on the CPU (SGLang's ``get_weights_by_name``:
        slow, for tests and spot checks)."""
        from sglang.srt.managers.io_struct import GetWeightsByNameReqInput

        from kdscale.teacher.sglang_engine import TeacherEngineError

        self._require_started("read_weight")
        if name not in self._shapes:
            raise WeightMismatchError(f"{name} is not a weight of {self.model_path}")
        shape = self._shapes[name]
        req = GetWeightsByNameReqInput(name=name, truncate_size=shape[0] if shape else 1)
        values = self.host._run(lambda e: e.tokenizer_manager.get_weights_by_name(req, None),
                                what="get_weights_by_name")
        if values is None:
            raise TeacherEngineError(f"SGLang could not read weight {name} (see the scheduler's log)")
        return torch.tensor(values, dtype=torch.float32).reshape(shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every checkpoint weight as the engine holds it, as float32 (:meth:`read_weight` each: for tests)."""
        return {name: self.read_weight(name) for name in self._shapes if name not in self._groups}

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingConfig) -> list[Rollout]:
        """``params.n`` rollouts per prompt, in prompt order then sample order."""
        from sglang.srt.managers.io_struct import GenerateReqInput

        from kdscale.teacher.sglang_engine import TeacherEngineError

        self._require_started("generate")
        version = _require_version(self.weight_version)
        if self.host.asleep:
            self.host.wake()
        prompts = _check_prompts(prompts, self.vocab_size)
        stop_ids = set(self.eos_token_ids) | set(params.stop_token_ids)
        if not stop_ids:
            raise ValueError("the model has no eos_token_id: pass SamplingConfig.stop_token_ids")
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        base = {
            "max_new_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k, "min_p": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0,
            "presence_penalty": 0.0, "min_new_tokens": 0, "stop_token_ids": sorted(stop_ids), "ignore_eos": False,
            # With skip_tokenizer_init the ids bypass the detokenizer, which would otherwise drop the stop token
            # from output_ids (DetokenizerManager.trim_matched_stop); no_stop_trim keeps it either way.
            "no_stop_trim": True,
        }
        if self.token_vocab_size is not None and self.token_vocab_size < self.vocab_size:  # padding rows: never
            base["logit_bias"] = {str(i): -1e9 for i in range(self.token_vocab_size, self.vocab_size)}
        sampling = [{**base, "sampling_seed": _sample_seed(params.seed, i, j)} for i, j in rows]
        req = GenerateReqInput(input_ids=[prompts[i] for i, _ in rows], sampling_params=sampling)
        out = self.host._run(lambda e: e.tokenizer_manager.generate_request(req, None).__anext__(), what="generate")
        if isinstance(out, dict):
            out = [out]
        if len(out) != len(rows):
            raise TeacherEngineError(f"SGLang answered {len(out)} of {len(rows)} requests")
        rollouts = []
        for (i, j), answer in zip(rows, out):
            meta = answer.get("meta_info", {})
            served = meta.get("weight_version")
            if served is not None and str(served) != str(version):
                raise RolloutEngineError(f"SGLang served weight version {served!r}, expected {version}")
            reason = (meta.get("finish_reason") or {}).get("type")
            ids = [int(t) for t in answer["output_ids"]]
            completion, cut = _cut_completion(ids, stop_ids, params.max_new_tokens) if ids else ([], "length")
            if reason not in FINISH_REASONS or reason != cut or len(completion) != len(ids):
                raise RolloutEngineError(
                    f"SGLang finished request {i}/{j} with {meta.get('finish_reason')!r} after {len(ids)} ids "
                    f"(max_new_tokens={params.max_new_tokens}, stop ids {sorted(stop_ids)}), which is not a complete "
                    f"rollout ({cut!r} by its ids)"
                )
            _check_token_ids(completion, self.token_vocab_size)
            rollouts.append(Rollout(tuple(prompts[i]), tuple(completion), reason, i, j, version))
        return rollouts

    def _call(self, make_coroutine: Any, *, what: str) -> Any:
        """An engine call that answers ``(success, message)``; raises on failure."""
        from kdscale.teacher.sglang_engine import TeacherEngineError

        result = self.host._run(make_coroutine, what=what)
        success, message = result if isinstance(result, tuple) else (True, "")
        if not success:
            raise TeacherEngineError(f"SGLang {what} failed: {message}")
        return result

    def _require_started(self, what: str) -> None:
        if not self.host.started:
            raise RolloutEngineError(f"SGLangRolloutEngine.{what} called before start(); call engine.start() first")


def _checkpoint_shapes(model_dir: Path, *, tied: bool) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes of the checkpoint's tensors by name (safetensors headers only), and the tied-head alias."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key, file in safetensors_key_index(model_dir).items():
        by_file.setdefault(file, []).append(key)
    shapes: dict[str, tuple[int, ...]] = {}
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for key in keys:
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    groups: dict[str, str] = {}
    if tied and "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]  # SGLang skips it and ties the head itself
        groups["lm_head.weight"] = "model.embed_tokens.weight"
    return shapes, groups


def _sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A per-request seed from the call's seed and the request's place (SGLang's ``sampling_seed`` is int64)."""
    return (int(seed) * 1_000_003 + prompt_index * 8_191 + sample_index) % (2**63 - 1)
