"""Tiny random HF models of every family the HF <-> Megatron converter supports (made in the test, nothing
downloaded): llama (GQA, tied or untied), mistral, qwen2 (q/k/v biases), qwen3 (q/k norms, head_dim != hidden/heads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Family -> (transformers config class name, model class name, extra config keys). Sizes are chosen so that TP=2
# divides heads, KV heads and the FFN; vocab 300 is padded to 384 (make_vocab_size_divisible_by=128).
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24, "tie_word_embeddings": True}),
}


def make_tiny_model(
    family: str,
    *,
    vocab_size: int = 300,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 96,
    seed: int = 0,
):
    """A random float32 ``*ForCausalLM`` of ``family`` (a key of :data:`FAMILIES`), in eval mode."""
    import torch
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        **({"tie_word_embeddings": False} | extra),
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.float32).eval()
    with torch.no_grad():  # norms init to ones and biases to zeros: randomize so that a swapped mapping shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def hf_state_dict(model) -> dict[str, Any]:
    """The model's state dict as saved (the tied ``lm_head.weight`` left out, like ``save_pretrained``)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_tiny_model(path: str | Path, family: str, **kwargs: Any) -> Path:
    """Save :func:`make_tiny_model` (safetensors, config.json, a tiny tokenizer) to ``path``; returns it."""
    from tests.fixtures import make_tiny_tokenizer

    path = Path(path)
    model = make_tiny_model(family, **kwargs)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path
