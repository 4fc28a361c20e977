"""The SGLang rollout engine on SGLang's CPU engine (0.5.23, float32) with a tiny Llama.

Needs tools/dev/install_sglang_cpu.sh (tools/dev/test.sh runs it). Without SGLang these tests skip locally and FAIL
in CI (CI=true), so that a broken install never passes as skipped.

What is shown: greedy rollouts equal the hf engine's token ids with finish reasons (stop token included, no EOS on
truncated samples); ``update_weights`` in buckets inside one weight-update session replaces every weight (read back
exactly through ``get_weights_by_name``) and generation then follows the NEW weights with the new version; bad
weights are refused before anything is sent; shutdown leaves no process and no /dev/shm file.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.e2e.sglang_support import require_sglang, sglang_processes, shm_files

pytestmark = pytest.mark.slow

require_sglang()

PROMPTS = [[1, 40, 41, 42], [1, 50, 60, 70, 80, 90, 100, 110], [7, 8]]


@pytest.fixture(scope="module")
def model_dirs(tiny_tokenizer, tmp_path_factory):
    """Two tiny Llamas of one config: the engine starts on ``base`` and is updated to ``new``."""
    from tests.fixtures import make_tiny_llama

    root = tmp_path_factory.mktemp("sglang_rollout")
    return {name: make_tiny_llama(root / name, tokenizer=tiny_tokenizer, seed=seed)
            for name, seed in (("base", 1), ("new", 2))}


@pytest.fixture(scope="module")
def hf_greedy(model_dirs):
    """Greedy rollouts of the hf engine (float32) per model: the reference."""
    from kdscale.algorithms.rollout import HFRolloutEngine, SamplingConfig

    out = {}
    for name, path in model_dirs.items():
        engine = HFRolloutEngine(model_path=path)
        engine.start()
        out[name] = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0))
        engine.shutdown()
    return out


@pytest.fixture(scope="module")
def sglang_rollout(model_dirs):
    """The engine on ``base`` (float32: exact against the hf engine). Its teardown checks that shutdown leaves no
    process and no /dev/shm file: strictly (no new file at all) when no other SGLang engine runs on the machine (a
    concurrent test run may start one), else the files the engine recorded as its own."""
    from kdscale.algorithms.rollout import SGLangRolloutEngine

    foreign_before = set(sglang_processes(own=False))
    shm_before = shm_files()
    engine = SGLangRolloutEngine(model_path=model_dirs["base"], dtype="float32", device="cpu", startup_timeout_s=300,
                                 engine_args={"max_total_tokens": 4096})
    engine.start()
    children = list(engine.host._children)
    assert children and set(sglang_processes(own=True)) <= {p.pid for p in children}
    yield engine
    own_files = [*engine.host._shm_paths, *(f"/dev/shm/{n}" for n in engine.host._start_semaphores)]
    assert own_files  # at least SGLang's load-snapshot file
    engine.shutdown()
    assert engine.weight_version is None and not engine.host.started
    assert not [p.pid for p in children if p.is_running()]
    assert not sglang_processes(own=True)
    assert not [f for f in own_files if os.path.exists(f)], own_files
    if not (set(sglang_processes(own=False)) | foreign_before):
        left = shm_files() - shm_before
        assert not left, f"SGLang left files in /dev/shm: {left}"


def _ids(rollouts):
    return [(r.completion_ids, r.finish_reason) for r in rollouts]


def test_greedy_rollouts_equal_hf_and_finish_reasons(sglang_rollout, hf_greedy):
    from kdscale.algorithms.rollout import SamplingConfig

    rollouts = sglang_rollout.generate(PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0))
    assert _ids(rollouts) == _ids(hf_greedy["base"])
    assert all(r.weight_version == 0 and r.finish_reason == "length" for r in rollouts)
    stop_ids = set(sglang_rollout.eos_token_ids)
    assert all(len(r.completion_ids) == 8 and not set(r.completion_ids) & stop_ids for r in rollouts)  # no EOS added
    completion = rollouts[1].completion_ids  # a token greedy decoding emits at position k (and not before) stops it
    k = next(k for k in range(1, 8) if completion[k] not in completion[:k])
    stopped = sglang_rollout.generate(PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0,
                                                              stop_token_ids=(completion[k],)))
    assert stopped[1].finish_reason == "stop" and stopped[1].completion_ids == completion[: k + 1]


def test_update_weights_then_rollouts_follow_the_new_weights(sglang_rollout, model_dirs, hf_greedy):
    from safetensors.torch import load_file

    from kdscale.algorithms.rollout import RolloutEngineError, SamplingConfig, WeightMismatchError

    new = load_file(str(model_dirs["new"] / "model.safetensors"))
    name = sorted(new)[0]
    with pytest.raises(WeightMismatchError, match="not in the rollout model"):
        sglang_rollout.update_weights([("model.nope.weight", new[name])], version=1)
    with pytest.raises(WeightMismatchError, match="expected"):
        sglang_rollout.update_weights([(name, new[name][:1])], version=1)
    with pytest.raises(RolloutEngineError, match="unknown state"):
        sglang_rollout.generate(PROMPTS, SamplingConfig(max_new_tokens=2))

    sglang_rollout.update_weights(sorted(new.items()), version=7, bucket_bytes=64 * 1024)  # several buckets
    assert sglang_rollout.weight_version == 7
    held = sglang_rollout.state_dict()  # read back one weight at a time (get_weights_by_name)
    assert set(held) == set(new)
    for key, tensor in new.items():
        assert torch.equal(held[key], tensor), key
    rollouts = sglang_rollout.generate(PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0))
    assert _ids(rollouts) == _ids(hf_greedy["new"]) != _ids(hf_greedy["base"])
    assert all(r.weight_version == 7 for r in rollouts)  # SGLang reported version "7" for each request


def test_n_samples_per_prompt(sglang_rollout):
    from kdscale.algorithms.rollout import SamplingConfig

    rollouts = sglang_rollout.generate(PROMPTS, SamplingConfig(n=2, max_new_tokens=6, temperature=1.0, seed=5))
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, j) for i in range(3) for j in range(2)]
    assert [list(r.prompt_ids) for r in rollouts] == [p for p in PROMPTS for _ in range(2)]
    for r in rollouts:
        assert (r.finish_reason == "stop") == (r.completion_ids[-1] in sglang_rollout.eos_token_ids)
        assert r.finish_reason == "stop" or len(r.completion_ids) == 6
    assert len({r.completion_ids for r in rollouts}) > 1


def test_on_policy_run_through_the_controller(tmp_path, tiny_pair, ray_session):
    """``on_policy.rollout_engine=sglang`` in a whole run: after every optimizer step the engine holds the student's
    weights (read back), each step's rollouts come from the latest weights, and the student trains on them."""
    import json

    import ray

    from kdscale.controller.driver import train
    from kdscale.observability.metrics import read_metrics
    from tests.e2e.test_on_policy import _on_policy
    from tests.e2e.test_train import _write_data

    data = _write_data(tmp_path / "train.jsonl", 16, 0), _write_data(tmp_path / "eval.jsonl", 4, 1)
    cfg = _on_policy(tmp_path, tiny_pair, data, **{"on_policy.rollout_engine": "sglang", "run.max_steps": 2,
                                                   "on_policy.dtype": "float32"})  # fmt: skip
    compared = []

    def compare_weights(step, view):
        student = ray.get([h.hf_state_dict.remote() for h in view.student_handles])[0]  # collective; rank 0's
        assert ray.get(view.rollout_worker.weight_version.remote()) == step  # queued after this step's sync
        held = ray.get(view.rollout_worker.state_dict.remote())
        assert held and set(held) <= set(student)
        for name, tensor in held.items():
            assert torch.equal(tensor, student[name].float()), (step, name)
        compared.append(step)

    train(cfg, on_step_end=compare_weights)
    assert compared == [1, 2]
    run = tmp_path / "run"
    rollouts = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * cfg.data.global_batch_size
    assert all(r["weight_version"] == r["step"] - 1 and r["completion_ids"] for r in rollouts)
    steps = [m for m in read_metrics(run / "metrics.jsonl") if "train/loss" in m]
    assert [m["rollout/on_policy"] for m in steps] == [1.0, 1.0]
    # The run's engine (in the rollout actor, not a child of this process, unlike this module's fixture engine) is
    # gone with the run.
    import time

    deadline = time.monotonic() + 30
    while sglang_processes(own=False) and time.monotonic() < deadline:
        time.sleep(1)
    assert not sglang_processes(own=False), sglang_processes(own=False)
