"""Build a Megatron-Core GPTModel student from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2, Qwen3).

Everything the model needs is derived from the HF config dict (``transformer_config_from_hf``,
``gpt_model_kwargs_from_hf``): nothing is typed by hand. ``build_gpt_model`` builds one model chunk (one pipeline
stage, or one virtual stage) with the local layer spec, or the Transformer Engine spec when TE is importable.
Megatron's ``parallel_state`` must be initialized first; on a CPU-only torch call ``cpu_compat.activate()`` first.
For packed micro-batches, ``attention_takes_mask`` tells whether a chunk honours a block-diagonal attention mask
and ``rope_follows_position_ids`` makes its RoPE use restarting position ids.

Note for the checkpoint converter: parameter names
    Observed with megatron-core 0.16.1, local spec, TP=1 PP=1, 2-layer llama / qwen2 / qwen3 models.
    ``model.state_dict()`` keys (``{i}`` is the layer index LOCAL to the model chunk: every pipeline stage and
    virtual stage counts from 0)::

        embedding.word_embeddings.weight                       [V_pad/TP, H]     (pre_process chunk only)
        decoder.layers.{i}.input_layernorm.weight              [H]               (local spec: separate RMSNorm)
        decoder.layers.{i}.self_attention.linear_qkv.weight    [(nq + 2*nkv)*d/TP, H]  grouped per KV head:
                                                               [q_g0 (nq/nkv heads), k_g0, v_g0, q_g1, k_g1, ...]
        decoder.layers.{i}.self_attention.linear_qkv.bias      same layout, Qwen2 only (add_qkv_bias)
        decoder.layers.{i}.self_attention.q_layernorm.weight   [d]               Qwen3 only (qk_layernorm)
        decoder.layers.{i}.self_attention.k_layernorm.weight   [d]               Qwen3 only
        decoder.layers.{i}.self_attention.linear_proj.weight   [H, nq*d/TP]
        decoder.layers.{i}.pre_mlp_layernorm.weight            [H]               (local spec: separate RMSNorm)
        decoder.layers.{i}.mlp.linear_fc1.weight               [2*F/TP, H]  = cat(gate_proj, up_proj) of this
                                                                            TP rank's F/TP rows of each
        decoder.layers.{i}.mlp.linear_fc2.weight               [H, F/TP]
        decoder.final_layernorm.weight                         [H]               (post_process chunk only)
        output_layer.weight                                    [V_pad/TP, H]     (post_process chunk; absent when
                                                                                  tie_word_embeddings and PP=1)
        *._extra_state                                         None values (linear_qkv, linear_proj, linear_fc1,
                                                               linear_fc2, output_layer): skip them

    ``model.sharded_state_dict()`` (what ``dist_checkpointing`` saves) has the same dict keys, but each
    ``ShardedTensor.key`` is layer-stacked with a leading [num_layers] axis (global layer offsets) and the local
    spec's norms are saved under Transformer Engine names::

        decoder.layers.{i}.input_layernorm.weight   -> decoder.layers.self_attention.linear_qkv.layer_norm_weight [L, H]
        decoder.layers.{i}.pre_mlp_layernorm.weight -> decoder.layers.mlp.linear_fc1.layer_norm_weight [L, H]
        decoder.layers.{i}.<name>                   -> decoder.layers.<name> [L, ...] (qkv weight/bias, q/k_layernorm,
                                                       linear_proj, linear_fc2)
        decoder.layers.{i}.mlp.linear_fc1.weight    -> a ShardedTensorFactory (SwiGLU: gate and up halves are
                                                       sharded over TP separately, so TP resharding stays correct)
        embedding.word_embeddings.weight, decoder.final_layernorm.weight, output_layer.weight: unchanged keys

    With the Transformer Engine spec (GPU, TE installed) ``model.state_dict()`` itself uses the TE names
    (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); torch_dist checkpoints are the same for
    both specs. With a tied embedding and PP>1 the last stage also holds ``output_layer.weight`` (a copy kept in
    sync by Megatron's embedding group).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kdscale.checkpoint.convert.mapping import padded_vocab_size  # one definition, shared with the converter

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")


def _require(hf_config: dict[str, Any], key: str) -> Any:
    if key not in hf_config or hf_config[key] is None:
        raise ValueError(f"the Hugging Face config.json has no {key!r}: cannot derive the Megatron model from it")
    return hf_config[key]


def _model_type(hf_config: dict[str, Any]) -> str:
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by the Megatron student backend; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Use student.backend: fsdp2 for other Hugging Face models."
        )
    return model_type


def _rope_parameters(hf_config: dict[str, Any]) -> dict[str, Any]:
    """``rope_scaling`` (transformers < 5) merged with ``rope_parameters`` (transformers >= 5)."""
    params: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = hf_config.get(key)
        if isinstance(value, dict):
            params.update(value)
    return params


def _rope_theta(hf_config: dict[str, Any]) -> float:
    theta = hf_config.get("rope_theta")
    if theta is None:
        theta = _rope_parameters(hf_config).get("rope_theta", 10000.0)
    return float(theta)


def head_dim_from_hf(hf_config: dict[str, Any]) -> int:
    """Per-head dimension: ``head_dim`` when given (Qwen3, Mistral), else ``hidden_size // num_attention_heads``."""
    head_dim = hf_config.get("head_dim")
    if head_dim is None:
        head_dim = int(_require(hf_config, "hidden_size")) // int(_require(hf_config, "num_attention_heads"))
    return int(head_dim)


def _check_supported_features(hf_config: dict[str, Any], model_type: str) -> None:
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported: the Megatron student implements SwiGLU (silu) only")
    if model_type in ("llama", "mistral", "qwen3") and hf_config.get("attention_bias", False):
        raise ValueError(
            f"attention_bias=True ({model_type}) puts biases on q/k/v AND o_proj, which the Megatron student does not "
            "support (only Qwen2-style q/k/v biases). Set attention_bias to false or use student.backend: fsdp2."
        )
    if hf_config.get("mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported by the Megatron student; use student.backend: fsdp2")
    if hf_config.get("use_sliding_window", False) or (
        model_type == "mistral"
        and hf_config.get("sliding_window") is not None
        and hf_config["sliding_window"] < int(hf_config.get("max_position_embeddings", 0))
    ):
        warnings.warn(
            f"{model_type} sliding-window attention (sliding_window={hf_config.get('sliding_window')}) is ignored: "
            "the Megatron student uses full causal attention, identical only for sequences within the window.",
            stacklevel=3,
        )


def _check_parallel_sizes(
    *,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    virtual_pipeline_parallel_size: int | None,
) -> None:
    if tensor_parallel_size < 1 or pipeline_parallel_size < 1:
        raise ValueError(
            f"tensor_model_parallel_size ({tensor_parallel_size}) and pipeline_model_parallel_size "
            f"({pipeline_parallel_size}) must be >= 1"
        )
    if num_heads % tensor_parallel_size:
        raise ValueError(
            f"num_attention_heads ({num_heads}) must be a multiple of tensor_model_parallel_size "
            f"({tensor_parallel_size}): choose a tensor-parallel size that divides {num_heads}"
        )
    if num_kv_heads % tensor_parallel_size:
        raise ValueError(
            f"num_key_value_heads ({num_kv_heads}) must be a multiple of tensor_model_parallel_size "
            f"({tensor_parallel_size}): choose a tensor-parallel size that divides {num_kv_heads}"
        )
    num_chunks = pipeline_parallel_size * (virtual_pipeline_parallel_size or 1)
    if num_layers % num_chunks:
        raise ValueError(
            f"num_hidden_layers ({num_layers}) must be a multiple of pipeline_model_parallel_size "
            f"({pipeline_parallel_size}) x virtual_pipeline_model_parallel_size "
            f"({virtual_pipeline_parallel_size or 1}) = {num_chunks}: choose pipeline sizes whose product divides "
            f"{num_layers}"
        )


def transformer_config_from_hf(
    hf_config: dict[str, Any],
    *,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    virtual_pipeline_parallel_size: int | None = None,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool = True,
    **overrides: Any,
):
    """A Megatron ``TransformerConfig`` equivalent to the HF decoder described by ``hf_config`` (config.json dict).

    Derived: layer count, sizes, heads and GQA groups, ``kv_channels`` (``head_dim``), RMSNorm and its epsilon,
    SwiGLU (``gated_linear_unit`` + silu), no linear biases except Qwen2's q/k/v bias (``add_qkv_bias``), Qwen3's
    q/k RMSNorm (``qk_layernorm``), ``init_method_std`` from ``initializer_range``; dropout 0; every fusion that
    needs CUDA/TE/Apex off. ``overrides`` are set last (any ``TransformerConfig`` field, e.g.
    ``recompute_granularity``, ``bf16``, ``batch_p2p_comm``). Raises ``ValueError`` for unsupported architectures
    and for parallel sizes that do not divide the heads, KV heads or layers.
    """
    from megatron.core.transformer import TransformerConfig

    model_type = _model_type(hf_config)
    _check_supported_features(hf_config, model_type)
    num_layers = int(_require(hf_config, "num_hidden_layers"))
    num_heads = int(_require(hf_config, "num_attention_heads"))
    num_kv_heads = int(hf_config.get("num_key_value_heads") or num_heads)
    _check_parallel_sizes(
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        virtual_pipeline_parallel_size=virtual_pipeline_parallel_size,
    )
    kwargs: dict[str, Any] = {
        "num_layers": num_layers,
        "hidden_size": int(_require(hf_config, "hidden_size")),
        "ffn_hidden_size": int(_require(hf_config, "intermediate_size")),
        "num_attention_heads": num_heads,
        "num_query_groups": num_kv_heads,
        "kv_channels": head_dim_from_hf(hf_config),
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(hf_config.get("rms_norm_eps", 1e-6)),
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": model_type == "qwen2",
        "qk_layernorm": model_type == "qwen3",
        "init_method_std": float(hf_config.get("initializer_range", 0.02)),
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "persist_layer_norm": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "apply_rope_fusion": False,
        "masked_softmax_fusion": False,
        "gradient_accumulation_fusion": False,
        "tensor_model_parallel_size": tensor_parallel_size,
        "pipeline_model_parallel_size": pipeline_parallel_size,
        "virtual_pipeline_model_parallel_size": virtual_pipeline_parallel_size,
        "sequence_parallel": False,
        "params_dtype": params_dtype,
        "bf16": params_dtype == torch.bfloat16,
        "fp16": params_dtype == torch.float16,
        "use_cpu_initialization": use_cpu_initialization,
    }
    kwargs.update(overrides)
    # Activations cross pipeline stages in the compute dtype (bf16/fp16 under Float16Module, else params_dtype).
    if "pipeline_dtype" not in overrides:
        kwargs["pipeline_dtype"] = (
            torch.bfloat16 if kwargs["bf16"] else torch.float16 if kwargs["fp16"] else kwargs["params_dtype"]
        )
    return TransformerConfig(**kwargs)


def _rope_kwargs(hf_config: dict[str, Any]) -> dict[str, Any]:
    params = _rope_parameters(hf_config)
    rope_type = params.get("rope_type", params.get("type", "default")) if params else "default"
    if rope_type in (None, "default"):
        return {"rope_scaling": False}
    if rope_type == "linear":
        return {"rope_scaling": False, "seq_len_interpolation_factor": float(params["factor"])}
    if rope_type == "llama3":
        # Megatron hard-codes low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192.
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        different = {k: params[k] for k, v in fixed.items() if k in params and float(params[k]) != float(v)}
        if different:
            raise ValueError(
                f"llama3 rope_scaling with {different} is not supported: Megatron-Core's llama3 scaling fixes {fixed}"
            )
        return {"rope_scaling": True, "rope_scaling_factor": float(params["factor"])}
    raise ValueError(
        f"rope_scaling type {rope_type!r} is not supported by the Megatron student; supported: none/default, "
        "linear, llama3. Use student.backend: fsdp2 for this model."
    )


def gpt_model_kwargs_from_hf(
    hf_config: dict[str, Any], *, make_vocab_size_divisible_by: int = 128, tp: int = 1
) -> dict:
    """``GPTModel`` keyword arguments (besides config, spec and stage flags) derived from an HF config.json dict.

    ``vocab_size`` is padded the Megatron way (:func:`padded_vocab_size`); RoPE base, scaling (none, linear,
    llama3) and embedding tying come from the HF config.
    """
    _model_type(hf_config)
    kwargs = {
        "vocab_size": padded_vocab_size(int(_require(hf_config, "vocab_size")), make_vocab_size_divisible_by, tp),
        "max_sequence_length": int(hf_config.get("max_position_embeddings", 4096)),
        "position_embedding_type": "rope",
        "rotary_percent": 1.0,
        "rotary_base": _rope_theta(hf_config),
        "share_embeddings_and_output_weights": bool(hf_config.get("tie_word_embeddings", False)),
    }
    kwargs.update(_rope_kwargs(hf_config))
    return kwargs


def transformer_engine_available() -> bool:
    """Whether Transformer Engine's PyTorch binding can be imported (it needs a CUDA torch)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE installed without a working CUDA build
        return False
    return True


def gpt_layer_spec(hf_config: dict[str, Any], *, use_transformer_engine: bool | None = None):
    """The decoder layer spec: Transformer Engine's when TE is importable (or forced), else Megatron's local spec."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    qk_layernorm = _model_type(hf_config) == "qwen3"
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")


def build_gpt_model(
    hf_config: dict[str, Any],
    *,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
    config=None,
    make_vocab_size_divisible_by: int = 128,
    use_transformer_engine: bool | None = None,
    parallel_output: bool = True,
    **config_overrides: Any,
):
    """One ``GPTModel`` chunk for this rank's pipeline stage (and virtual stage ``vp_stage``).

    ``config`` defaults to :func:`transformer_config_from_hf` with the sizes of the initialized ``parallel_state``
    (``config_overrides`` go to it). ``pre_process``/``post_process``: whether this chunk holds the embedding /
    the final norm and output layer (Megatron's ``is_pipeline_first_stage``/``is_pipeline_last_stage`` for the
    chunk). The output layer is vocab-parallel: ``forward(..., labels=None)`` returns logits [b, s, V_pad/TP].
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if config is None:
        config_overrides.setdefault("tensor_parallel_size", parallel_state.get_tensor_model_parallel_world_size())
        config_overrides.setdefault("pipeline_parallel_size", parallel_state.get_pipeline_model_parallel_world_size())
        config_overrides.setdefault(
            "virtual_pipeline_parallel_size", parallel_state.get_virtual_pipeline_model_parallel_world_size()
        )
        config = transformer_config_from_hf(hf_config, **config_overrides)
    elif config_overrides:
        raise ValueError(f"pass either config or config overrides, not both (got {sorted(config_overrides)})")
    kwargs = gpt_model_kwargs_from_hf(
        hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by, tp=config.tensor_model_parallel_size
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=gpt_layer_spec(hf_config, use_transformer_engine=use_transformer_engine),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        vp_stage=vp_stage,
        **kwargs,
    )


def attention_takes_mask(model: torch.nn.Module) -> str | None:
    """None if every core attention of this chunk applies a given ``attention_mask`` instead of its own causal
    mask, else the name of the first attention class that does not.

    Megatron's local ``DotProductAttention`` does (its softmax builds the default causal mask only when it gets
    none, and the config sets no sliding window); Transformer Engine's attention with the causal mask type ignores
    the mask.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    for module in model.modules():
        core = getattr(module, "core_attention", None)
        if core is not None and not isinstance(core, DotProductAttention):
            return type(core).__name__
    if getattr(model.config, "window_size", None) is not None:
        return "DotProductAttention with a sliding window"
    return None


def rope_follows_position_ids(model: torch.nn.Module, position_ids: Callable[[], torch.Tensor | None]) -> None:
    """Make this chunk's rotary embedding take per-token positions from ``position_ids()`` when it returns some.

    ``GPTModel`` computes RoPE for positions ``0 .. S - 1`` whatever ``position_ids`` it is given (they only feed
    learned absolute embeddings). A forward hook on its ``rotary_pos_emb`` replaces the ``[S, 1, 1, D]`` table by
    its rows at ``position_ids()`` ``[B, S]``, i.e. ``[S, B, 1, D]`` (the attention broadcasts it over heads):
    packed samples then get the angles of their own positions, bit for bit those of the padded layout. When
    ``position_ids()`` returns None the output is left as is.
    """
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        raise ValueError(
            f"{type(model).__name__} has no rotary_pos_emb: packed micro-batches need a RoPE student; set "
            "data.packing: false"
        )

    def hook(module: torch.nn.Module, args: Any, output: Any) -> torch.Tensor | None:
        positions = position_ids()
        if positions is None:
            return None
        if not (isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[1:3] == (1, 1)):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise RuntimeError(
                f"{type(module).__name__} returned {shape}, not the [S, 1, 1, D] table that packed micro-batches "
                "index by position: this megatron-core is not supported with data.packing; set it to false"
            )
        return output[:, 0][positions.t().to(output.device)]

    rotary.register_forward_hook(hook)
