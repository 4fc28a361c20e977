"""End to end through the Ray controller on tiny models: train, evaluate, checkpoint, export, resume; and the
user errors that must stop a run before anything heavy starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdscale.cli import main
from kdscale.config.load import load_config
from kdscale.observability.metrics import read_metrics

WORDS = ("the quick brown fox jumps over the lazy dog distillation trains a small student to imitate a large "
         "teacher two plus two is four red is a primary colour gravity pulls masses toward each other").split()


def _write_data(path: Path, n: int, seed: int) -> Path:
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 20)))
            if i % 4 == 3:
                f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": response}]}) + "\n")
            else:
                f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return _write_data(root / "train.jsonl", 32, 0), _write_data(root / "eval.jsonl", 8, 1)


def _overrides(tmp_path: Path, tiny_pair, tiny_data, **extra) -> list[str]:
    teacher, student = tiny_pair
    values = {
        "run.name": "tiny", "run.output_dir": str(tmp_path / "run"), "run.max_steps": 4, "run.save_every": 2,
        "run.cache_dir": str(tmp_path / "cache"), "run.progress_bar": False,
        "teacher.engine": "hf", "teacher.model_path": str(teacher),
        "student.backend": "fsdp2", "student.model_path": str(student), "student.num_ranks": 2,
        "student.attn_implementation": "eager", "teacher.attn_implementation": "eager",
        "data.train_path": str(tiny_data[0]), "data.eval_path": str(tiny_data[1]), "data.global_batch_size": 8,
        "data.max_seq_len": 64, "data.max_tokens_per_micro_batch": 96, "transport.dtype": "float32",
        "optim.lr": 1e-3, "loss.divergence": "jsd", "loss.kd_ratio": 0.8, "loss.chunk_size": 16,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_train_checkpoint_export_and_resume(tmp_path, tiny_pair, tiny_data, ray_session):
    from transformers import AutoModelForCausalLM

    from kdscale.controller.driver import train

    cfg = load_config(None, _overrides(tmp_path, tiny_pair, tiny_data))
    summary = train(cfg)
    run = Path(cfg.run_dir)
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/kl" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [0, 4]
    assert all(r["train/loss"] > 0 and r["transfer/bytes"] > 0 for r in steps)
    assert summary.eval_kl_before == evals[0]["eval/kl"] and summary.eval_kl_after == evals[1]["eval/kl"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000004"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(run / "hf_student")
    assert model.config.num_hidden_layers == 2

    # An interrupted run: only the step-2 checkpoint survived. Resuming reproduces steps 3 and 4 exactly.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
    cfg2 = load_config(None, _overrides(tmp_path, tiny_pair, tiny_data, **{"run.output_dir": str(resumed)}))
    train(cfg2)
    again = [r for r in read_metrics(resumed / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in again] == [3, 4]
    for a, b in zip(steps[2:], again):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6, abs=1e-7)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-5)


def test_resume_never_refuses_a_used_run_dir(tmp_path, tiny_pair, tiny_data, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    config = tmp_path / "c.yaml"
    config.write_text("{}")
    assert main(["train", str(config), *_overrides(tmp_path, tiny_pair, tiny_data, **{"run.resume": "never"})]) == 2
    err = capsys.readouterr().err
    assert "run.resume=never" in err and "step_000002" in err


def test_resume_refuses_a_checkpoint_of_the_other_backend(tmp_path, tiny_pair, tiny_data, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"step": 2, "student_backend": "fsdp2", "sampler": {}}')
    config = tmp_path / "c.yaml"
    config.write_text("{}")
    args = [a for a in _overrides(tmp_path, tiny_pair, tiny_data)
            if not a.startswith(("student.num_ranks", "student.attn_implementation"))]
    assert main(["train", str(config), *args, "student.backend=megatron"]) == 2
    err = capsys.readouterr().err
    assert "written by the 'fsdp2' student backend" in err and "run.name" in err and "Traceback" not in err


def test_malformed_data_file_stops_with_line_numbers(tmp_path, tiny_pair, tiny_data, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = Path(tiny_data[0]).read_text().splitlines()
    lines[3] = '{"prompt": "x", "respons": "y"}'
    lines[5] = "{not json"
    bad.write_text("\n".join(lines) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text("{}")
    args = _overrides(tmp_path, tiny_pair, tiny_data, **{"data.train_path": str(bad), "data.max_bad_fraction": 0.01})
    assert main(["train", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert "line 4" in err and "line 6" in err and "max_bad_fraction" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_model_path_is_one_clear_error(tmp_path, tiny_pair, tiny_data, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("{}")
    args = _overrides(tmp_path, tiny_pair, tiny_data, **{"student.model_path": str(tmp_path / "no_student")})
    assert main(["train", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert "student.model_path" in err and "no_student" in err and "not found" in err
    assert "Traceback" not in err


def test_megatron_backend_through_the_controller(tmp_path, tiny_pair, tiny_data, ray_session):
    """student.backend=megatron at PP=2: only the last pipeline stage receives teacher outputs; the first step's
    loss equals the FSDP2 run's on the same weights and data; checkpoint, resume and HF export work."""
    from transformers import AutoModelForCausalLM

    from kdscale.controller.driver import train

    common = {"run.max_steps": 3, "run.save_every": 2, "data.global_batch_size": 8, "run.eval_every": 0}
    fsdp = load_config(None, _overrides(tmp_path / "f", tiny_pair, tiny_data, **common))
    train(fsdp)
    fsdp_steps = [r for r in read_metrics(Path(fsdp.run_dir) / "metrics.jsonl") if "train/loss" in r]

    mega_args = _overrides(tmp_path / "m", tiny_pair, tiny_data, **common)
    mega_args = [a for a in mega_args if not a.startswith(("student.num_ranks", "student.attn_implementation"))]
    mega_args += ["student.backend=megatron", "student.pipeline_parallel_size=2"]
    mega = load_config(None, mega_args)
    summary = train(mega)
    steps = [r for r in read_metrics(Path(mega.run_dir) / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["train/loss"] == pytest.approx(fsdp_steps[0]["train/loss"], rel=1e-4)
    hidden_size = 96  # the tiny teacher's; fp32 transport
    for r in steps:  # the refs went to the one consuming rank (the last stage), not to both
        assert r["transfer/bytes"] == r["train/num_loss_tokens"] * hidden_size * 4
    run = Path(mega.run_dir)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert AutoModelForCausalLM.from_pretrained(summary.hf_export).config.num_hidden_layers == 2

    # resume from step 2 at the same layout reproduces step 3
    resumed = tmp_path / "m_resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
    train(load_config(None, [*mega_args, f"run.output_dir={resumed}"]))
    again = [r for r in read_metrics(resumed / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in again] == [3]
    assert again[0]["train/loss"] == pytest.approx(steps[2]["train/loss"], rel=1e-6)
