"""MegatronBackend.hf_state_dict: the whole student by Hugging Face name, gathered in memory over TP and PP (what
an on-policy rollout engine loads after each step). Right after loading it must give back the HF checkpoint
exactly, at every layout (TP2, PP2, PP2 x VPP2, DP2; tied and untied heads); after training, exactly the weights
the (disk-based) HF export writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from tests.distributed.megatron_utils import run_spawned  # noqa: E402
from tests.distributed.test_backend_conformance import STUDENT_VOCAB_PAD, World  # noqa: E402

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "tp2": ("untied", {"tensor_parallel_size": 2, "pipeline_parallel_size": 1}),
    "tp2_tied": ("tied", {"tensor_parallel_size": 2, "pipeline_parallel_size": 1}),
    "pp2_tied": ("tied", {"tensor_parallel_size": 1, "pipeline_parallel_size": 2}),
    "pp2_vpp2": ("deep", {"tensor_parallel_size": 1, "pipeline_parallel_size": 2, "virtual_pipeline_parallel_size": 2}),
    "dp2": ("untied", {"tensor_parallel_size": 1, "pipeline_parallel_size": 1}),
}


def _group(rank: int, root: str) -> dict:
    from megatron.core import parallel_state

    world = World(Path(root))
    results: dict = {}
    for name, (model, layout) in LAYOUTS.items():
        parallel_state.destroy_model_parallel()
        backend = world.backend("megatron", model, "forward_kl", layout)
        results[name] = backend.hf_state_dict()
        if name == "tp2":  # after two optimizer steps: the gathered weights are what export_hf writes
            world.train(backend, [1, 2])
            results["tp2_trained"] = backend.hf_state_dict()
            backend.export_hf(str(Path(root) / "export_tp2"))
        del backend
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.fixtures import make_tiny_llama, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("megatron_hf_state_dict")
    tokenizer = make_tiny_tokenizer()
    vocab = len(tokenizer) + STUDENT_VOCAB_PAD
    make_tiny_llama(root / "untied", tokenizer=tokenizer, vocab_size=vocab, seed=1)
    make_tiny_llama(root / "tied", tokenizer=tokenizer, vocab_size=vocab, tie_word_embeddings=True, seed=2)
    make_tiny_llama(root / "deep", tokenizer=tokenizer, vocab_size=vocab, num_layers=4, seed=3)
    return root, run_spawned(_group, 2, args=(str(root),), timeout_s=600)


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _assert_equal(actual: dict, expected: dict, tied: bool) -> None:
    expected = dict(expected)
    if tied:
        expected.pop("lm_head.weight", None)  # a tied head is the embedding (HF may or may not store it)
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for key, tensor in expected.items():
        assert actual[key].shape == tensor.shape, key
        assert torch.equal(actual[key].to(tensor.dtype), tensor), key


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gathered_weights_equal_the_loaded_checkpoint(results, name):
    root, ranks = results
    model, _ = LAYOUTS[name]
    assert ranks[1][name] is None  # only global rank 0 holds the result
    _assert_equal(ranks[0][name], _checkpoint(root / model), tied=model == "tied")


def test_gathered_weights_after_training_equal_the_hf_export(results):
    root, ranks = results
    trained, exported = ranks[0]["tp2_trained"], _checkpoint(root / "export_tp2")
    _assert_equal(trained, exported, tied=False)
    changed = [k for k, v in _checkpoint(root / "untied").items() if not torch.equal(v, trained[k])]
    assert len(changed) > len(trained) // 2  # two optimizer steps moved (almost) every weight
