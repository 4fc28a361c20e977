"""Declarative, bidirectional parameter mappings between Hugging Face and Megatron-Core state dicts.

Design:
- A model family is a :class:`MappingTable`: a list of rows, one per parameter *pattern*. Each row names its HF
  key pattern(s) and its Megatron key pattern, with ``*`` standing for an index (a layer; for MoE tables, also an
  expert). The same row converts in both directions: ``to_megatron(hf_tensors, dims)`` and
  ``to_hf(megatron_tensor, dims)`` (the Megatron-Bridge model: no per-model loops, no substring chains).
- Row kinds: :class:`Direct` (same tensor), :class:`VocabPadded` (embedding / output head: zero rows appended up
  to the padded vocabulary on the way in, stripped back to the HF ``vocab_size`` on the way out), :class:`QKV`
  (q/k/v fused into ``linear_qkv`` with Megatron's grouped-query interleaving; used for weights and biases),
  :class:`GatedMLP` (SwiGLU gate/up fused into ``linear_fc1`` as ``cat[gate, up]``).
- The Megatron side is the *global, unsharded* per-layer state dict: exactly the keys of a GPTModel's
  ``state_dict()`` at TP=1/PP=1 built from the local layer spec (``decoder.layers.3.self_attention.linear_qkv.weight``).
  Sharding (TP/PP) is the formats' business (``formats.py``): torch_dist reshards by itself, the legacy reader
  merges shards into this global form.
- Every tensor's shape is checked against the shape the config implies (``shape`` on the rows, resolved through
  :class:`ModelDims`), and every source key must be consumed by a row: a mismatch raises
  :class:`ConversionError` naming the parameter, the expected and the actual shape.

Assumptions:
- Megatron's QKV layout: along dim 0, for each of the ``num_query_groups`` groups, the group's
  ``num_heads / num_query_groups`` query heads, then its key head, then its value head (``head_dim`` rows each).
- Megatron's SwiGLU ``linear_fc1`` at TP=1 is ``cat[gate, up]`` along dim 0.
- Tied embeddings: the Megatron model has no ``output_layer`` (``share_embeddings_and_output_weights``) and the HF
  state dict has no ``lm_head.weight`` (one that is present anyway is ignored when tied).

Usage::

    table = get_mapping_table(hf_config["model_type"])          # families.py
    dims = ModelDims.from_hf_config(hf_config, make_vocab_size_divisible_by=128)
    megatron_sd = dict(table.hf_to_megatron(hf_sd, dims))
    hf_sd_again = dict(table.megatron_to_hf(megatron_sd, dims))   # bit-exact round trip
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# A shape entry is an int or the name of a ModelDims attribute (e.g. "hidden_size", "q_size").
ShapeSpec = tuple[int | str, ...]


class ConversionError(ValueError):
    """A checkpoint does not match its config or its mapping table (names the parameter and the mismatch)."""


# --------------------------------------------------------------------------------------------------- dimensions


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_parallel_size: int = 1) -> int:
    """Megatron's padded vocabulary: ``vocab_size`` rounded up to a multiple of ``divisible_by * TP``."""
    if vocab_size < 1 or make_vocab_size_divisible_by < 1 or tensor_parallel_size < 1:
        raise ValueError(
            f"vocab_size ({vocab_size}), make_vocab_size_divisible_by ({make_vocab_size_divisible_by}) and "
            f"tensor_parallel_size ({tensor_parallel_size}) must all be >= 1"
        )
    multiple = make_vocab_size_divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) and "hidden_size" not in config else config


@dataclass(frozen=True)
class ModelDims:
    """The sizes a mapping needs, read from an HF ``config.json`` dict (never typed by hand)."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    padded_vocab_size: int
    tie_word_embeddings: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def q_size(self) -> int:
        """Rows of ``q_proj``: ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Rows of ``k_proj`` / ``v_proj``: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        """Rows of Megatron's fused ``linear_qkv``."""
        return self.q_size + 2 * self.kv_size

    @property
    def fc1_size(self) -> int:
        """Rows of Megatron's fused SwiGLU ``linear_fc1``: ``2 * intermediate_size``."""
        return 2 * self.intermediate_size

    @classmethod
    def from_hf_config(
        cls,
        hf_config: Mapping[str, Any],
        *,
        make_vocab_size_divisible_by: int = 128,
        tensor_parallel_size: int = 1,
        padded_vocab: int | None = None,
    ) -> ModelDims:
        """Dims of an HF config dict; ``padded_vocab`` (e.g. read from a converted checkpoint) wins over the
        ``make_vocab_size_divisible_by * tensor_parallel_size`` rounding."""
        config = _text_config(hf_config)

        def need(key: str) -> int:
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConversionError(f"config.json: {key!r} must be a positive integer, got {value!r}")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ConversionError(
                f"config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        vocab = need("vocab_size")
        padded = padded_vocab or padded_vocab_size(vocab, make_vocab_size_divisible_by, tensor_parallel_size)
        if padded < vocab:
            raise ConversionError(f"padded vocabulary ({padded}) is smaller than config.json vocab_size ({vocab})")
        tied = config.get("tie_word_embeddings", hf_config.get("tie_word_embeddings", False))
        return cls(
            model_type=str(hf_config.get("model_type", "")),
            hidden_size=hidden,
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate_size=need("intermediate_size"),
            vocab_size=vocab,
            padded_vocab_size=padded,
            tie_word_embeddings=bool(tied),
        )

    def resolve(self, shape: ShapeSpec) -> tuple[int, ...]:
        """Turn a symbolic shape (ints and attribute names) into ints."""
        return tuple(dim if isinstance(dim, int) else int(getattr(self, dim)) for dim in shape)


# ------------------------------------------------------------------------------------------------------ patterns


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


def _fill(pattern: str, indices: tuple[str, ...]) -> str:
    parts = pattern.split("*")
    if len(parts) - 1 != len(indices):
        raise AssertionError(f"pattern {pattern!r} has {len(parts) - 1} wildcards, got indices {indices}")
    out = parts[0]
    for index, part in zip(indices, parts[1:]):
        out += index + part
    return out


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ConversionError(
            f"shape mismatch for {name}: expected {list(expected)} (from config.json), got {list(tensor.shape)}"
        )


# --------------------------------------------------------------------------------------------------------- rows


class ParamMapping:
    """One row of a mapping table: HF key pattern(s) <-> one Megatron key pattern.

    Subclasses define ``to_megatron(hf_tensors, dims)`` (``hf_tensors`` keyed by role, the names of
    ``hf_patterns``) and ``to_hf(megatron_tensor, dims)`` (returns tensors keyed by role), and the expected shapes.
    ``when`` decides whether the row applies to a given model (e.g. the output head only when untied).
    """

    hf_patterns: dict[str, str]
    megatron: str
    when: Callable[[ModelDims], bool] | None = None

    def applies(self, dims: ModelDims) -> bool:
        """Whether this row has a parameter in a model with ``dims``."""
        return self.when is None or self.when(dims)

    def hf_shapes(self, dims: ModelDims) -> dict[str, tuple[int, ...]]:
        """Expected shape of each HF tensor, by role."""
        raise NotImplementedError

    def megatron_shape(self, dims: ModelDims) -> tuple[int, ...]:
        """Expected shape of the (global, TP=1) Megatron tensor."""
        raise NotImplementedError

    def to_megatron(self, hf_tensors: Mapping[str, torch.Tensor], dims: ModelDims) -> torch.Tensor:
        """The Megatron tensor from the HF tensors (keyed by role)."""
        raise NotImplementedError

    def to_hf(self, megatron_tensor: torch.Tensor, dims: ModelDims) -> dict[str, torch.Tensor]:
        """The HF tensors (keyed by role) from the Megatron tensor."""
        raise NotImplementedError


@dataclass(frozen=True)
class Direct(ParamMapping):
    """The same tensor under two names (norms, o_proj/linear_proj, down_proj/linear_fc2, ...)."""

    hf: str
    megatron: str
    shape: ShapeSpec
    when: Callable[[ModelDims], bool] | None = None

    @property
    def hf_patterns(self) -> dict[str, str]:  # type: ignore[override]
        return {"hf": self.hf}

    def hf_shapes(self, dims: ModelDims) -> dict[str, tuple[int, ...]]:
        return {"hf": dims.resolve(self.shape)}

    def megatron_shape(self, dims: ModelDims) -> tuple[int, ...]:
        return dims.resolve(self.shape)

    def to_megatron(self, hf_tensors: Mapping[str, torch.Tensor], dims: ModelDims) -> torch.Tensor:
        return hf_tensors["hf"]

    def to_hf(self, megatron_tensor: torch.Tensor, dims: ModelDims) -> dict[str, torch.Tensor]:
        return {"hf": megatron_tensor}


@dataclass(frozen=True)
class VocabPadded(ParamMapping):
    """Embedding or output head [vocab, hidden]: zero rows up to the padded vocabulary in, stripped out."""

    hf: str
    megatron: str
    when: Callable[[ModelDims], bool] | None = None

    @property
    def hf_patterns(self) -> dict[str, str]:  # type: ignore[override]
        return {"hf": self.hf}

    def hf_shapes(self, dims: ModelDims) -> dict[str, tuple[int, ...]]:
        return {"hf": (dims.vocab_size, dims.hidden_size)}

    def megatron_shape(self, dims: ModelDims) -> tuple[int, ...]:
        return (dims.padded_vocab_size, dims.hidden_size)

    def to_megatron(self, hf_tensors: Mapping[str, torch.Tensor], dims: ModelDims) -> torch.Tensor:
        weight = hf_tensors["hf"]
        extra = dims.padded_vocab_size - weight.shape[0]
        if extra == 0:
            return weight
        return torch.cat([weight, weight.new_zeros(extra, weight.shape[1])], dim=0)

    def to_hf(self, megatron_tensor: torch.Tensor, dims: ModelDims) -> dict[str, torch.Tensor]:
        return {"hf": megatron_tensor[: dims.vocab_size]}


@dataclass(frozen=True)
class QKV(ParamMapping):
    """q/k/v projections (weights or biases) <-> Megatron's fused ``linear_qkv`` with grouped interleaving:
    per query group g, ``[q heads of g..., k head g, v head g]`` along dim 0."""

    q: str
    k: str
    v: str
    megatron: str
    bias: bool = False
    when: Callable[[ModelDims], bool] | None = None

    @property
    def hf_patterns(self) -> dict[str, str]:  # type: ignore[override]
        return {"q": self.q, "k": self.k, "v": self.v}

    def _tail(self, dims: ModelDims) -> tuple[int, ...]:
        return () if self.bias else (dims.hidden_size,)

    def hf_shapes(self, dims: ModelDims) -> dict[str, tuple[int, ...]]:
        tail = self._tail(dims)
        return {"q": (dims.q_size, *tail), "k": (dims.kv_size, *tail), "v": (dims.kv_size, *tail)}

    def megatron_shape(self, dims: ModelDims) -> tuple[int, ...]:
        return (dims.qkv_size, *self._tail(dims))

    def to_megatron(self, hf_tensors: Mapping[str, torch.Tensor], dims: ModelDims) -> torch.Tensor:
        groups, head_dim = dims.num_kv_heads, dims.head_dim
        heads_per_group = dims.num_heads // groups
        tail = self._tail(dims)
        q = hf_tensors["q"].reshape(groups, heads_per_group * head_dim, *tail)
        k = hf_tensors["k"].reshape(groups, head_dim, *tail)
        v = hf_tensors["v"].reshape(groups, head_dim, *tail)
        return torch.cat([q, k, v], dim=1).reshape(dims.qkv_size, *tail)

    def to_hf(self, megatron_tensor: torch.Tensor, dims: ModelDims) -> dict[str, torch.Tensor]:
        groups, head_dim = dims.num_kv_heads, dims.head_dim
        heads_per_group = dims.num_heads // groups
        tail = self._tail(dims)
        grouped = megatron_tensor.reshape(groups, (heads_per_group + 2) * head_dim, *tail)
        q, k, v = torch.split(grouped, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
        return {
            "q": q.reshape(dims.q_size, *tail).contiguous(),
            "k": k.reshape(dims.kv_size, *tail).contiguous(),
            "v": v.reshape(dims.kv_size, *tail).contiguous(),
        }


@dataclass(frozen=True)
class GatedMLP(ParamMapping):
    """SwiGLU gate/up projections <-> Megatron's fused ``linear_fc1`` = ``cat[gate, up]`` along dim 0."""

    gate: str
    up: str
    megatron: str
    when: Callable[[ModelDims], bool] | None = None

    @property
    def hf_patterns(self) -> dict[str, str]:  # type: ignore[override]
        return {"gate": self.gate, "up": self.up}

    def hf_shapes(self, dims: ModelDims) -> dict[str, tuple[int, ...]]:
        shape = (dims.intermediate_size, dims.hidden_size)
        return {"gate": shape, "up": shape}

    def megatron_shape(self, dims: ModelDims) -> tuple[int, ...]:
        return (dims.fc1_size, dims.hidden_size)

    def to_megatron(self, hf_tensors: Mapping[str, torch.Tensor], dims: ModelDims) -> torch.Tensor:
        return torch.cat([hf_tensors["gate"], hf_tensors["up"]], dim=0)

    def to_hf(self, megatron_tensor: torch.Tensor, dims: ModelDims) -> dict[str, torch.Tensor]:
        gate, up = torch.chunk(megatron_tensor, 2, dim=0)
        return {"gate": gate.contiguous(), "up": up.contiguous()}


# --------------------------------------------------------------------------------------------------------- table

TensorSource = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class MappingTable:
    """A model family's rows plus the HF keys that carry no parameter (ignored when present).

    ``hf_to_megatron`` / ``megatron_to_hf`` take a mapping of key -> tensor; it may be lazy (only ``keys()``,
    ``__contains__`` and ``__getitem__`` are used), so a large checkpoint is read one row at a time.
    """

    name: str
    rows: tuple[ParamMapping, ...]
    hf_ignore: tuple[str, ...] = ()

    # ---- expansion of patterns into concrete keys

    def _instances(
        self, row: ParamMapping, keys: Iterable[str], *, side: str, dims: ModelDims
    ) -> list[tuple[str, ...]]:
        """The wildcard values of ``row``: one wildcard is the layer index (always ``0..num_layers-1``, so a missing
        layer is an error and an extra one is left over); more wildcards (e.g. MoE experts) are taken from the keys
        present on the ``side`` read ("hf": the row's first HF pattern)."""
        pattern = next(iter(row.hf_patterns.values())) if side == "hf" else row.megatron
        num_wildcards = pattern.count("*")
        if num_wildcards == 0:
            return [()]
        if num_wildcards == 1:
            return [(str(i),) for i in range(dims.num_layers)]
        regex = _pattern_regex(pattern)
        found = {match.groups() for key in keys if (match := regex.match(key))}
        return sorted(found, key=lambda idx: tuple(int(i) for i in idx))

    def _check_complete(self, keys: Iterable[str], consumed: set[str], side: str) -> None:
        ignore = [_pattern_regex(p) for p in self.hf_ignore] if side == "HF" else []
        extra = sorted(k for k in keys if k not in consumed and not any(r.match(k) for r in ignore))
        if extra:
            raise ConversionError(
                f"{len(extra)} {side} parameter(s) have no row in the {self.name!r} mapping table "
                f"(unsupported variant of the architecture?): {extra[:8]}"
            )

    def expected_megatron_shapes(self, dims: ModelDims) -> dict[str, tuple[int, ...]]:
        """Every Megatron (global, TP=1) key of a model with ``dims`` and its shape (single-wildcard rows only)."""
        out: dict[str, tuple[int, ...]] = {}
        for row in self.rows:
            if not row.applies(dims):
                continue
            for idx in self._instances(row, (), side="hf", dims=dims):
                out[_fill(row.megatron, idx)] = row.megatron_shape(dims)
        return out

    # ---- directions

    def hf_to_megatron(self, hf_tensors: TensorSource, dims: ModelDims) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(megatron_key, tensor)`` for every row instance; checks shapes and that nothing is left over."""
        keys = list(hf_tensors.keys())
        consumed: set[str] = set()
        for row in self.rows:
            if not row.applies(dims):
                continue
            shapes = row.hf_shapes(dims)
            for idx in self._instances(row, keys, side="hf", dims=dims):
                names = {role: _fill(pattern, idx) for role, pattern in row.hf_patterns.items()}
                inputs: dict[str, torch.Tensor] = {}
                for role, name in names.items():
                    if name not in hf_tensors:
                        raise ConversionError(
                            f"HF checkpoint is missing parameter {name} (mapping table {self.name!r})"
                        )
                    inputs[role] = hf_tensors[name]
                    _check_shape(name, inputs[role], shapes[role])
                consumed.update(names.values())
                yield _fill(row.megatron, idx), row.to_megatron(inputs, dims)
        self._check_complete(keys, consumed, "HF")

    def megatron_to_hf(self, megatron_tensors: TensorSource, dims: ModelDims) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_key, tensor)`` for every row instance; checks shapes and that nothing is left over."""
        keys = list(megatron_tensors.keys())
        consumed: set[str] = set()
        for row in self.rows:
            if not row.applies(dims):
                continue
            expected = row.megatron_shape(dims)
            for idx in self._instances(row, keys, side="megatron", dims=dims):
                name = _fill(row.megatron, idx)
                if name not in megatron_tensors:
                    raise ConversionError(
                        f"Megatron checkpoint is missing parameter {name} (mapping table {self.name!r})"
                    )
                tensor = megatron_tensors[name]
                _check_shape(name, tensor, expected)
                consumed.add(name)
                for role, out in row.to_hf(tensor, dims).items():
                    yield _fill(row.hf_patterns[role], idx), out
        self._check_complete(keys, consumed, "Megatron")

    def num_parameters(self, dims: ModelDims, *, side: str = "megatron") -> int:
        """How many Megatron (``side="megatron"``) or HF (``side="hf"``) tensors a model with ``dims`` has
        (single-wildcard rows; for progress bars)."""
        total = 0
        for row in self.rows:
            if row.applies(dims):
                per_instance = len(row.hf_patterns) if side == "hf" else 1
                total += per_instance * len(self._instances(row, (), side="hf", dims=dims))
        return total
