"""The hf rollout engine (kdscale.algorithms.rollout) on a tiny Llama: weight sync, exact greedy ids, finish
reasons, seeded sampling, and rollouts as training samples."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kdscale.algorithms.rollout import (
    HFRolloutEngine,
    Rollout,
    RolloutEngineError,
    SamplingConfig,
    WeightMismatchError,
    iter_weight_buckets,
    read_eos_token_ids,
)

PROMPTS = [[1, 40, 41, 42], [1, 50, 60, 70, 80, 90, 100, 110], [7, 8]]  # different lengths: left padding matters


@pytest.fixture(scope="module")
def dirs(tiny_pair, tiny_tokenizer, tmp_path_factory):
    """The tiny student and a second model of the same config with other weights."""
    from tests.fixtures import make_tiny_llama

    _, student = tiny_pair
    other = make_tiny_llama(tmp_path_factory.mktemp("rollout") / "other", tokenizer=tiny_tokenizer,
                            vocab_size=len(tiny_tokenizer) + 4, hidden_size=64, num_layers=2, seed=11)
    return student, other


@pytest.fixture(scope="module")
def other_state(dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(dirs[1], dtype=torch.float32).state_dict()


@pytest.fixture
def engine(dirs):
    engine = HFRolloutEngine(model_path=dirs[0], max_batch_size=4)
    engine.start()
    yield engine
    engine.shutdown()


def _manual_greedy(model, prompt: list[int], max_new_tokens: int, stop_ids: set[int]) -> tuple[list[int], str]:
    """Argmax decoding of one prompt alone, recomputing the whole sequence each step (no cache, no padding)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in stop_ids:
                return ids, "stop"
    return ids, "length"


def test_update_weights_copies_every_parameter_exactly(engine, other_state):
    assert engine.weight_version == 0
    before = {k: v.clone() for k, v in other_state.items()}
    assert any(not torch.equal(engine.state_dict()[k], v) for k, v in other_state.items())
    engine.update_weights(sorted(other_state.items()), version=5, bucket_bytes=20_000)  # several buckets
    assert engine.weight_version == 5
    mine = engine.state_dict()
    assert set(mine) == set(other_state)
    for name, tensor in other_state.items():
        assert torch.equal(mine[name], tensor), name
        assert torch.equal(tensor, before[name])  # the source is left as it was
    for name, param in engine.model.named_parameters():
        assert torch.equal(param, other_state[name]), name


def test_weight_buckets_respect_the_size_and_order():
    tensors = [(f"w{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5, 5])]  # float32: 4 bytes each
    buckets = list(iter_weight_buckets(iter(tensors), bucket_bytes=80))
    assert [[n for n, _ in b] for b, _ in buckets] == [["w0", "w1"], ["w2"], ["w3", "w4", "w5"]]
    assert [last for _, last in buckets] == [False, False, True]
    with pytest.raises(TypeError, match=r"\(str, torch.Tensor\) pairs"):
        list(iter_weight_buckets([("w", np.zeros(3))], bucket_bytes=80))


def test_bad_weights_are_refused_with_clear_errors(engine, other_state):
    items = sorted(other_state.items())
    name, tensor = items[0]
    with pytest.raises(WeightMismatchError, match=r"not in the rollout model: \['model.nope.weight'\]"):
        engine.update_weights([("model.nope.weight", tensor)], version=1)
    with pytest.raises(WeightMismatchError, match=rf"{name}: got \[{tensor.shape[0]}, 3\], expected"):
        engine.update_weights([(name, torch.zeros(tensor.shape[0], 3))], version=1)
    with pytest.raises(WeightMismatchError, match="sent twice"):
        engine.update_weights([items[0], items[0]], version=1)
    with pytest.raises(WeightMismatchError, match=rf"left out 1 of {len(items)} parameters"):
        engine.update_weights(items[1:], version=1)
    # a failed update leaves the weights in an unknown state: no generation until a complete update
    assert engine.weight_version is None
    with pytest.raises(RolloutEngineError, match="unknown state"):
        engine.generate(PROMPTS, SamplingConfig(max_new_tokens=2, temperature=0))
    engine.update_weights(items[:1], version=2, require_all=False)  # a deliberate partial update is allowed
    engine.update_weights(items, version=3)
    assert engine.weight_version == 3
    assert len(engine.generate(PROMPTS, SamplingConfig(max_new_tokens=2, temperature=0))) == len(PROMPTS)


def test_greedy_ids_equal_a_manual_argmax_loop(engine, other_state):
    engine.update_weights(other_state.items(), version=4)
    params = SamplingConfig(max_new_tokens=12, temperature=0)
    rollouts = engine.generate(PROMPTS, params)
    stop_ids = set(engine.eos_token_ids)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, 0) for i in range(len(PROMPTS))]
    for prompt, rollout in zip(PROMPTS, rollouts):
        expected, reason = _manual_greedy(engine.model, prompt, 12, stop_ids)
        assert list(rollout.prompt_ids) == prompt
        assert list(rollout.prompt_ids + rollout.completion_ids) == expected
        assert rollout.finish_reason == reason and rollout.weight_version == 4
    # top_k=1 sampling is greedy: the sampling path applies top_k
    sampled = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=1, seed=3))
    assert [r.completion_ids for r in sampled] == [r.completion_ids for r in rollouts]


def test_length_finish_adds_no_eos_and_a_stop_token_ends_the_completion(engine):
    stop_ids = set(engine.eos_token_ids)
    greedy = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0))
    for rollout in greedy:
        assert rollout.finish_reason == "length"  # the random tiny model does not emit EOS this early
        assert len(rollout.completion_ids) == 6 and not set(rollout.completion_ids) & stop_ids
    # a stop token that greedy decoding emits at position k (and not before) ends the completion there, included
    completion = greedy[1].completion_ids
    k = next(k for k in range(1, 6) if completion[k] not in completion[:k])
    stop = completion[k]
    stopped = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0, stop_token_ids=(stop,)))
    assert stopped[1].finish_reason == "stop"
    assert stopped[1].completion_ids == completion[: k + 1] and stopped[1].completion_ids[-1] == stop
    for before, after in zip(greedy, stopped):  # the other prompts: cut at their own first `stop`, if any
        if stop in before.completion_ids:
            cut = before.completion_ids.index(stop) + 1
            assert after.finish_reason == "stop" and after.completion_ids == before.completion_ids[:cut]
        else:
            assert after.finish_reason == "length" and after.completion_ids == before.completion_ids


def test_eos_of_the_model_config_stops(dirs, engine, tmp_path):
    """The model's EOS (config.json and generation_config.json) is a stop token without being asked for."""
    first = engine.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=4, temperature=0))[0].completion_ids[0]
    model_dir = tmp_path / "eos_is_first_token"
    shutil.copytree(dirs[0], model_dir)
    for file in ("config.json", "generation_config.json"):
        config = json.loads((model_dir / file).read_text())
        config["eos_token_id"] = [config["eos_token_id"], first] if file == "config.json" else first
        (model_dir / file).write_text(json.dumps(config))
    other = HFRolloutEngine(model_path=model_dir)
    assert set(other.eos_token_ids) == set(engine.eos_token_ids) | {first} == set(read_eos_token_ids(model_dir))
    other.start()
    rollout = other.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=4, temperature=0))[0]
    assert rollout.completion_ids == (first,) and rollout.finish_reason == "stop"


def test_n_samples_per_prompt_are_reproducible_with_a_seed(engine):
    params = SamplingConfig(n=3, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=123)
    first = engine.generate(PROMPTS, params)
    assert [(r.prompt_index, r.sample_index) for r in first] == [(i, j) for i in range(3) for j in range(3)]
    assert [list(r.prompt_ids) for r in first] == [p for p in PROMPTS for _ in range(3)]
    again = engine.generate(PROMPTS, params)
    assert [(r.completion_ids, r.finish_reason) for r in again] == [(r.completion_ids, r.finish_reason) for r in first]
    other_seed = engine.generate(PROMPTS, SamplingConfig(n=3, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7))
    assert [r.completion_ids for r in other_seed] != [r.completion_ids for r in first]
    for i in range(len(PROMPTS)):  # the samples of one prompt differ
        assert len({r.completion_ids for r in first if r.prompt_index == i}) > 1
    for r in first:
        assert (r.finish_reason == "stop") == (r.completion_ids[-1] in engine.eos_token_ids)
        assert r.finish_reason == "stop" or len(r.completion_ids) == 8


def test_rollout_to_tokenized_sample_flows_through_the_layout():
    from kdscale.data.batch import gather_labels
    from kdscale.data.layout import make_micro_batch

    rollouts = [Rollout((1, 2, 3), (4, 5, 9), "stop", 0, 0, 3), Rollout((1, 2), (6, 7, 8, 6), "length", 1, 0, 3)]
    samples = [r.to_tokenized_sample(sample_id=10 + k) for k, r in enumerate(rollouts)]
    assert samples[0].sample_id == 10 and samples[0].input_ids.dtype == np.int32
    assert samples[0].input_ids.tolist() == [1, 2, 3, 4, 5, 9]
    assert samples[0].loss_mask.tolist() == [False, False, False, True, True, True]
    assert samples[1].loss_mask.tolist() == [False, False, True, True, True, True]
    assert [s.num_loss_tokens for s in samples] == [3, 4]
    batch = make_micro_batch(samples, pad_token_id=0)
    assert batch.num_loss_tokens == 7
    assert gather_labels(batch.input_ids, batch.loss_mask).tolist() == [4, 5, 9, 6, 7, 8, 6]  # the completions


def test_invalid_arguments_are_refused(dirs):
    with pytest.raises(ValueError, match="finish_reason"):
        Rollout((1,), (2,), "eos", 0, 0, 0)
    with pytest.raises(ValueError, match="non-empty prompt and completion"):
        Rollout((1,), (), "length", 0, 0, 0)
    for kwargs, message in [({"n": 0}, "n "), ({"max_new_tokens": 0}, "max_new_tokens"),
                            ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k")]:
        with pytest.raises(ValueError, match=message):
            SamplingConfig(**kwargs)
    engine = HFRolloutEngine(model_path=dirs[0])
    with pytest.raises(RolloutEngineError, match=r"before start\(\)"):
        engine.generate(PROMPTS, SamplingConfig())
    engine.start()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingConfig())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 10**6]], SamplingConfig())
