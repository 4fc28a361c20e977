"""On-policy distillation through the Ray controller on tiny models (hf rollout engine): the rollout engine's weights
equal the student's after every sync, samples train exactly as generated, staleness is bounded, lambda mixes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from kdscale.config.load import ConfigError, load_config
from kdscale.data.batch import sample_digest
from kdscale.observability.metrics import read_metrics
from tests.e2e.test_train import _overrides, _write_data


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return _write_data(root / "train.jsonl", 32, 0), _write_data(root / "eval.jsonl", 8, 1)


def _on_policy(tmp_path, tiny_pair, tiny_data, **extra):
    values = {"algorithm": "on_policy", "on_policy.max_new_tokens": 12, "on_policy.temperature": 1.0,
              "run.save_every": 0, "run.max_steps": 3, "run.export_hf": False, "run.plot": False,
              "data.max_tokens_per_micro_batch": 128}
    values.update(extra)
    return load_config(None, _overrides(tmp_path, tiny_pair, tiny_data, **values))


def _rollouts(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]


def test_on_policy_syncs_weights_and_trains_samples_as_generated(tmp_path, tiny_pair, tiny_data, ray_session):
    from kdscale.controller.driver import train

    cfg = _on_policy(tmp_path, tiny_pair, tiny_data)
    compared = []

    def compare_weights(step, view):
        student = ray.get([h.hf_state_dict.remote() for h in view.student_handles])[0]  # collective; rank 0's
        engine = ray.get(view.rollout_worker.state_dict.remote())  # queued after this step's sync
        assert ray.get(view.rollout_worker.weight_version.remote()) == step
        for name, tensor in student.items():
            assert torch.equal(engine[name], tensor), (step, name)
        compared.append(step)

    summary = train(cfg, on_step_end=compare_weights)
    assert compared == [1, 2, 3]
    run = Path(cfg.run_dir)
    rollouts = _rollouts(run)
    assert len(rollouts) == 3 * cfg.data.global_batch_size
    from kdscale.algorithms.rollout import read_eos_token_ids

    eos = set(read_eos_token_ids(tiny_pair[1]))
    assert eos
    for r in rollouts:
        assert r["weight_version"] == r["step"] - 1  # max_staleness 0: generated with the latest weights
        if r["finish_reason"] == "length":
            assert len(r["completion_ids"]) == 12  # cut, and no EOS appended
        else:
            assert r["completion_ids"][-1] in eos and not set(r["completion_ids"][:-1]) & eos
    # each sample trained exactly as generated: the ranks' digests of (ids, targets) equal the rollouts'
    by_id = {r["sample_id"]: r for r in rollouts}
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    checked = 0
    for record in ledger:
        for ids, digests in zip(record["sample_ids"], record["sample_digests"]):
            for sample_id, digest in zip(ids, digests):
                r = by_id[sample_id]
                tokens = r["prompt_ids"] + r["completion_ids"]
                mask = np.zeros(len(tokens), dtype=bool)
                mask[r["prompt_len"]:] = True
                assert digest == sample_digest(tokens, mask), sample_id
                checked += 1
    assert checked == len(rollouts)
    steps = [m for m in read_metrics(run / "metrics.jsonl") if "train/loss" in m]
    assert all(m["rollout/on_policy"] == 1.0 and m["rollout/staleness"] == 0 for m in steps)
    assert summary.eval_kl_after is not None


def test_staleness_bound_and_lambda_mixing(tmp_path, tiny_pair, tiny_data, ray_session):
    from kdscale.controller.driver import train

    cfg = _on_policy(tmp_path, tiny_pair, tiny_data, **{"on_policy.max_staleness": 1, "on_policy.lmbda": 0.5,
                                                        "run.max_steps": 6, "run.seed": 3})
    train(cfg)
    run = Path(cfg.run_dir)
    steps = [m for m in read_metrics(run / "metrics.jsonl") if "train/loss" in m]
    on = [m for m in steps if m["rollout/on_policy"] == 1.0]
    assert 0 < len(on) < len(steps)  # lambda 0.5 over 6 steps with this seed mixes both kinds
    assert all(m["rollout/staleness"] <= 1 for m in on)
    assert any(m["rollout/staleness"] == 1 for m in on if m["step"] > 1)
    assert {r["step"] for r in _rollouts(run)} == {m["step"] for m in on}


def test_on_policy_with_the_megatron_student(tmp_path, tiny_pair, tiny_data, ray_session):
    """The Megatron student at TP=2: after every step the rollout engine holds the student's weights, gathered over
    the tensor-parallel shards and renamed to Hugging Face names in memory (MegatronBackend.hf_state_dict)."""
    from kdscale.controller.driver import train

    values = {"algorithm": "on_policy", "on_policy.max_new_tokens": 12, "run.save_every": 0, "run.max_steps": 2,
              "run.export_hf": False, "run.plot": False, "data.max_tokens_per_micro_batch": 128,
              "student.backend": "megatron", "student.tensor_parallel_size": 2}  # fmt: skip
    overrides = [o for o in _overrides(tmp_path, tiny_pair, tiny_data, **values)
                 if not o.startswith(("student.num_ranks", "student.attn_implementation"))]  # fmt: skip
    compared = []

    def compare_weights(step, view):
        student = ray.get([h.hf_state_dict.remote() for h in view.student_handles])
        assert student[1] is None  # gathered on global rank 0 only
        engine = ray.get(view.rollout_worker.state_dict.remote())
        assert set(engine) <= set(student[0]) and "model.embed_tokens.weight" in engine
        for name, tensor in engine.items():
            assert torch.equal(student[0][name], tensor), (step, name)
        compared.append(step)

    train(load_config(None, overrides), on_step_end=compare_weights)
    assert compared == [1, 2]
    rollouts = _rollouts(tmp_path / "run")
    assert len(rollouts) == 2 * 8 and all(r["weight_version"] == r["step"] - 1 for r in rollouts)


def test_on_policy_config_errors(tmp_path, tiny_pair, tiny_data):
    with pytest.raises(ConfigError, match="multiple of on_policy.samples_per_prompt 3"):
        _on_policy(tmp_path, tiny_pair, tiny_data, **{"on_policy.samples_per_prompt": 3})
    with pytest.raises(ConfigError, match="use on_policy.max_staleness"):
        _on_policy(tmp_path, tiny_pair, tiny_data, **{"controller.prefetch_steps": 1})


def test_on_policy_resume_continues_exactly(tmp_path, tiny_pair, tiny_data, ray_session):
    """Stopped after a checkpoint at step 2 and resumed to step 4, a run generates the same rollouts and trains the
    same losses as an uninterrupted 4-step run: the rollout engine restarts from the checkpoint's weights, the
    sampler from its position, and rollouts.jsonl keeps only the steps the checkpoint covers."""
    from kdscale.controller.driver import train

    constant_lr = {"optim.warmup_steps": 0, "optim.min_lr_ratio": 1.0, "run.save_every": 2}  # same schedule for both
    train(_on_policy(tmp_path / "full", tiny_pair, tiny_data, **{"run.max_steps": 4, **constant_lr}))
    train(_on_policy(tmp_path / "part", tiny_pair, tiny_data, **{"run.max_steps": 3, **constant_lr}))
    # The checkpoint of step 3 (the final save) is deleted to resume from step 2: step 3's rollouts and metrics
    # were already written once, and must be replaced, not duplicated.
    import shutil

    part_run = tmp_path / "part" / "run"
    shutil.rmtree(part_run / "checkpoints" / "step_000003")  # the newest complete checkpoint is now step 2's
    train(_on_policy(tmp_path / "part", tiny_pair, tiny_data, **{"run.max_steps": 4, **constant_lr}))

    full, part = _rollouts(tmp_path / "full" / "run"), _rollouts(part_run)
    assert [r["step"] for r in part] == [r["step"] for r in full] and len(full) == 4 * 8
    for a, b in zip(full, part):
        assert (a["sample_id"], a["completion_ids"], a["weight_version"]) == (
            b["sample_id"], b["completion_ids"], b["weight_version"])  # fmt: skip

    def losses(run: Path) -> dict[int, float]:
        return {m["step"]: m["train/loss"] for m in read_metrics(run / "metrics.jsonl") if "train/loss" in m}

    full_losses, part_losses = losses(tmp_path / "full" / "run"), losses(part_run)
    assert sorted(part_losses) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert part_losses[step] == pytest.approx(full_losses[step], rel=1e-5), step
    ledger = [json.loads(line)["step"] for line in (part_run / "ledger.jsonl").read_text().splitlines()]
    assert ledger == [1, 2, 3, 4]
