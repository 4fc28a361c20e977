"""Tiny models and tokenizers made inside the tests (nothing is downloaded).

``make_tiny_tokenizer`` trains a small byte-level BPE on a fixed corpus and gives it a ChatML chat template;
``make_tiny_llama`` writes a random Llama (safetensors + config.json + tokenizer) into a directory.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Distillation trains a small student to imitate a large teacher.",
    "What is two plus two? Two plus two is four.",
    "Name a primary colour. Red is a primary colour.",
    "Write a haiku about the sea: waves fold into foam, salt wind carries gull voices, the tide keeps its time.",
    "Explain gravity in one sentence. Gravity pulls masses toward each other.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000, a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


def make_tiny_tokenizer(vocab_size: int = 300):
    """A PreTrainedTokenizerFast with BOS/EOS/PAD and ChatML special tokens; EOS is <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(
    path: str | Path,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    tokenizer=None,
):
    """Save a random LlamaForCausalLM (float32, safetensors) with a tokenizer to ``path``; returns the path.

    ``vocab_size`` defaults to ``len(tokenizer)``; pass a larger value to get a padded vocabulary.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = tokenizer or make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def load_script(path: str | Path, name: str | None = None):
    """Import a script that is not in a package (tools/dev/*.py, benchmarks/*.py) as a module, by its path."""
    import importlib.util

    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
