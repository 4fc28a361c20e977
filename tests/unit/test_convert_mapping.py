"""The HF <-> Megatron mapping tables: bit-exact round trips per family, the QKV interleaving against a hand-built
layout, and the errors (unsupported architecture, shape mismatch, missing or left-over parameters). No Megatron."""

from __future__ import annotations

import pytest
import torch

from kdscale.checkpoint.convert.families import get_mapping_table, supported_model_types
from kdscale.checkpoint.convert.mapping import QKV, ConversionError, GatedMLP, ModelDims, padded_vocab_size
from tests.convert_models import FAMILIES, hf_state_dict, make_tiny_model


def _dims(model, **kwargs) -> ModelDims:
    return ModelDims.from_hf_config(model.config.to_dict(), **kwargs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_bit_exact(family):
    model = make_tiny_model(family)
    hf_sd = hf_state_dict(model)
    dims = _dims(model)
    assert dims.padded_vocab_size == 384 and dims.vocab_size == 300
    table = get_mapping_table(model.config.model_type)

    megatron_sd = dict(table.hf_to_megatron(hf_sd, dims))
    assert megatron_sd.keys() == table.expected_megatron_shapes(dims).keys()
    for key, shape in table.expected_megatron_shapes(dims).items():
        assert tuple(megatron_sd[key].shape) == shape, key
    embedding = megatron_sd["embedding.word_embeddings.weight"]
    assert torch.equal(embedding[300:], torch.zeros(84, dims.hidden_size))  # padded rows are zeros
    assert ("output_layer.weight" in megatron_sd) == (not dims.tie_word_embeddings)
    if family == "qwen2":
        assert "decoder.layers.1.self_attention.linear_qkv.bias" in megatron_sd
    if family == "qwen3":
        assert megatron_sd["decoder.layers.0.self_attention.q_layernorm.weight"].shape == (24,)
        assert megatron_sd["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 24, 64)

    back = dict(table.megatron_to_hf(megatron_sd, dims))
    assert back.keys() == hf_sd.keys()
    for key, tensor in hf_sd.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_round_trip_keeps_bf16_and_tp_padding():
    model = make_tiny_model("llama").to(torch.bfloat16)
    hf_sd = hf_state_dict(model)
    dims = _dims(model, make_vocab_size_divisible_by=128, tensor_parallel_size=4)
    assert dims.padded_vocab_size == 512
    table = get_mapping_table("llama")
    megatron_sd = dict(table.hf_to_megatron(hf_sd, dims))
    assert megatron_sd["output_layer.weight"].dtype == torch.bfloat16
    back = dict(table.megatron_to_hf(megatron_sd, dims))
    assert all(torch.equal(back[k], v) for k, v in hf_sd.items())


def test_padded_vocab_size():
    assert padded_vocab_size(300) == 384
    assert padded_vocab_size(384) == 384
    assert padded_vocab_size(300, 128, 2) == 512
    assert padded_vocab_size(49152, 128, 1) == 49152


def test_qkv_interleave_matches_hand_built_layout():
    # 4 query heads, 2 KV groups, head_dim 1, hidden 1: each row's value names its source head.
    dims = ModelDims(
        "llama",
        hidden_size=1,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=1,
        intermediate_size=1,
        vocab_size=1,
        padded_vocab_size=1,
        tie_word_embeddings=True,
    )
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    row = QKV(q="q", k="k", v="v", megatron="qkv")
    fused = row.to_megatron({"q": q, "k": k, "v": v}, dims)
    expected = [10, 11, 20, 30, 12, 13, 21, 31]  # Megatron: per group g: [q heads of g, k_g, v_g]
    assert fused.flatten().tolist() == expected
    back = row.to_hf(fused, dims)
    assert torch.equal(back["q"], q) and torch.equal(back["k"], k) and torch.equal(back["v"], v)

    bias = QKV(q="q", k="k", v="v", megatron="qkv", bias=True)
    assert bias.to_megatron({"q": q[:, 0], "k": k[:, 0], "v": v[:, 0]}, dims).tolist() == expected


def test_qkv_interleave_with_head_dim_2():
    dims = ModelDims(
        "llama",
        hidden_size=1,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=2,
        intermediate_size=1,
        vocab_size=1,
        padded_vocab_size=1,
        tie_word_embeddings=True,
    )
    q, k, v = torch.arange(4.0)[:, None], torch.arange(10.0, 12.0)[:, None], torch.arange(20.0, 22.0)[:, None]
    fused = QKV(q="q", k="k", v="v", megatron="qkv").to_megatron({"q": q, "k": k, "v": v}, dims)
    assert fused.flatten().tolist() == [0, 1, 2, 3, 10, 11, 20, 21]


def test_gated_mlp_is_gate_then_up():
    gate, up = torch.zeros(2, 3), torch.ones(2, 3)
    fc1 = GatedMLP(gate="g", up="u", megatron="fc1").to_megatron({"gate": gate, "up": up}, None)  # type: ignore[arg-type]
    assert torch.equal(fc1, torch.cat([gate, up]))


def test_unsupported_architecture_lists_supported():
    with pytest.raises(ValueError, match=r"unsupported architecture.*'gpt2'.*llama.*mistral.*qwen2.*qwen3"):
        get_mapping_table("gpt2")
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(supported_model_types())


def test_shape_mismatch_names_the_parameter():
    model = make_tiny_model("llama")
    hf_sd = hf_state_dict(model)
    hf_sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    table = get_mapping_table("llama")
    with pytest.raises(
        ConversionError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight: expected \[32, 64\].*got \[64, 64\]"
    ):
        dict(table.hf_to_megatron(hf_sd, _dims(model)))


def test_megatron_shape_mismatch_names_the_parameter():
    model = make_tiny_model("qwen2")
    dims = _dims(model)
    table = get_mapping_table("qwen2")
    megatron_sd = dict(table.hf_to_megatron(hf_state_dict(model), dims))
    megatron_sd["decoder.layers.0.mlp.linear_fc1.weight"] = torch.zeros(96, 64)
    with pytest.raises(ConversionError, match=r"decoder\.layers\.0\.mlp\.linear_fc1\.weight: expected \[192, 64\]"):
        dict(table.megatron_to_hf(megatron_sd, dims))


def test_missing_and_leftover_parameters_are_errors():
    model = make_tiny_model("qwen3")
    dims = _dims(model)
    table = get_mapping_table("qwen3")
    hf_sd = hf_state_dict(model)
    missing = {k: v for k, v in hf_sd.items() if k != "model.layers.1.self_attn.q_norm.weight"}
    with pytest.raises(ConversionError, match=r"missing parameter model\.layers\.1\.self_attn\.q_norm\.weight"):
        dict(table.hf_to_megatron(missing, dims))
    extra = dict(hf_sd, **{"model.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"no row in the 'qwen3' mapping table.*experts"):
        dict(table.hf_to_megatron(extra, dims))
    # A tied checkpoint that stores lm_head.weight anyway converts (the copy is ignored).
    tied = dict(hf_sd, **{"lm_head.weight": hf_sd["model.embed_tokens.weight"]})
    assert "output_layer.weight" not in dict(table.hf_to_megatron(tied, dims))


def test_untied_checkpoint_without_head_is_an_error():
    model = make_tiny_model("llama")
    hf_sd = hf_state_dict(model)
    del hf_sd["lm_head.weight"]
    with pytest.raises(ConversionError, match=r"missing parameter lm_head\.weight"):
        dict(get_mapping_table("llama").hf_to_megatron(hf_sd, _dims(model)))
