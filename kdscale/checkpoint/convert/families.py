"""Mapping tables per architecture family, and the registry keyed by the HF ``model_type``.

Design:
- Each family is one :class:`~kdscale.checkpoint.convert.mapping.MappingTable` built from shared row groups
  (embedding, attention, MLP, norms, head). A new family is a new table: e.g. ``qwen3_moe`` would reuse
  ``_qwen3_attention`` and add a router row (``mlp.gate.weight`` <-> ``mlp.router.weight``) and two-wildcard expert
  rows (``model.layers.*.mlp.experts.*.gate_proj.weight`` + ``up_proj`` -> ``GatedMLP`` into
  ``decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight``).
- :func:`get_mapping_table` raises a ``ValueError`` listing the supported ``model_type`` values on a miss.

Assumptions: Megatron key names are those of a GPTModel built from the local layer spec
(``get_gpt_layer_local_spec``): ``input_layernorm`` / ``pre_mlp_layernorm`` are separate modules (torch_dist saves
them under the Transformer Engine names ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``, which
the formats layer takes from the model's own ``sharded_state_dict``, never from this table).
"""

from __future__ import annotations

from kdscale.checkpoint.convert.mapping import QKV, Direct, GatedMLP, MappingTable, ModelDims, ParamMapping, VocabPadded

_L = "model.layers.*."
_M = "decoder.layers.*."


def _untied(dims: ModelDims) -> bool:
    return not dims.tie_word_embeddings


def _embedding_and_head() -> tuple[ParamMapping, ...]:
    return (
        VocabPadded("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
        Direct("model.norm.weight", "decoder.final_layernorm.weight", shape=("hidden_size",)),
        VocabPadded("lm_head.weight", "output_layer.weight", when=_untied),
    )


def _llama_attention(*, qkv_bias: bool = False) -> tuple[ParamMapping, ...]:
    rows: list[ParamMapping] = [
        Direct(_L + "input_layernorm.weight", _M + "input_layernorm.weight", shape=("hidden_size",)),
        QKV(
            q=_L + "self_attn.q_proj.weight",
            k=_L + "self_attn.k_proj.weight",
            v=_L + "self_attn.v_proj.weight",
            megatron=_M + "self_attention.linear_qkv.weight",
        ),
        Direct(
            _L + "self_attn.o_proj.weight", _M + "self_attention.linear_proj.weight", shape=("hidden_size", "q_size")
        ),
    ]
    if qkv_bias:
        rows.append(
            QKV(
                q=_L + "self_attn.q_proj.bias",
                k=_L + "self_attn.k_proj.bias",
                v=_L + "self_attn.v_proj.bias",
                megatron=_M + "self_attention.linear_qkv.bias",
                bias=True,
            )
        )
    return tuple(rows)


def _qk_norm() -> tuple[ParamMapping, ...]:
    return (
        Direct(_L + "self_attn.q_norm.weight", _M + "self_attention.q_layernorm.weight", shape=("head_dim",)),
        Direct(_L + "self_attn.k_norm.weight", _M + "self_attention.k_layernorm.weight", shape=("head_dim",)),
    )


def _swiglu_mlp() -> tuple[ParamMapping, ...]:
    return (
        Direct(_L + "post_attention_layernorm.weight", _M + "pre_mlp_layernorm.weight", shape=("hidden_size",)),
        GatedMLP(gate=_L + "mlp.gate_proj.weight", up=_L + "mlp.up_proj.weight", megatron=_M + "mlp.linear_fc1.weight"),
        Direct(_L + "mlp.down_proj.weight", _M + "mlp.linear_fc2.weight", shape=("hidden_size", "intermediate_size")),
    )


# Buffers some HF checkpoints carry that are not parameters.
_HF_IGNORE = (_L + "self_attn.rotary_emb.inv_freq", "lm_head.weight")


def _table(name: str, *groups: tuple[ParamMapping, ...]) -> MappingTable:
    rows = tuple(row for group in groups for row in group)
    return MappingTable(name=name, rows=rows, hf_ignore=_HF_IGNORE)


# "lm_head.weight" is in hf_ignore so that a tied checkpoint that stores it anyway converts; when untied, its row
# consumes it (and a missing one is an error), so the ignore list never hides an untied head.
MAPPING_TABLES: dict[str, MappingTable] = {
    "llama": _table("llama", _embedding_and_head(), _llama_attention(), _swiglu_mlp()),
    "mistral": _table("mistral", _embedding_and_head(), _llama_attention(), _swiglu_mlp()),
    "qwen2": _table("qwen2", _embedding_and_head(), _llama_attention(qkv_bias=True), _swiglu_mlp()),
    "qwen3": _table("qwen3", _embedding_and_head(), _llama_attention(), _qk_norm(), _swiglu_mlp()),
}


def supported_model_types() -> list[str]:
    """The HF ``model_type`` values that have a mapping table."""
    return sorted(MAPPING_TABLES)


def get_mapping_table(model_type: str | None) -> MappingTable:
    """The mapping table for an HF ``model_type``; ``ValueError`` listing the supported ones on a miss."""
    table = MAPPING_TABLES.get(model_type or "")
    if table is None:
        raise ValueError(
            f"unsupported architecture: config.json model_type={model_type!r}; the HF <-> Megatron converter "
            f"supports {supported_model_types()} (add a mapping table in kdscale/checkpoint/convert/families.py)"
        )
    return table
