"""Config loading: strict keys with "did you mean", overrides, discriminated sections, CLI validate errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdscale.cli import main
from kdscale.config.load import ConfigError, apply_overrides, load_config


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _base(tmp_path: Path, teacher: Path, student: Path) -> dict:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(8)))
    return {
        "run": {"name": "t", "output_dir": str(tmp_path / "run")},
        "teacher": {"engine": "hf", "model_path": str(teacher)},
        "student": {"backend": "fsdp2", "model_path": str(student), "num_ranks": 2},
        "data": {"train_path": str(train), "global_batch_size": 4, "max_seq_len": 256},
    }


def test_unknown_keys_suggest_the_right_one(tmp_path, tiny_pair):
    cfg = _base(tmp_path, *tiny_pair)
    cfg["run"]["max_step"] = 3
    cfg["loss"] = {"divergnce": "jsd"}
    cfg["student"]["num_rank"] = 2
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, cfg))
    text = str(err.value)
    assert "run.max_step: unknown key; did you mean 'max_steps'?" in text
    assert "loss.divergnce: unknown key; did you mean 'divergence'?" in text
    assert "student.num_rank: unknown key; did you mean 'num_ranks'?" in text
    assert "3 problem(s)" in text


def test_discriminators_select_the_section_schema(tmp_path, tiny_pair):
    cfg = _base(tmp_path, *tiny_pair)
    cfg["teacher"]["engine"] = "hff"
    with pytest.raises(ConfigError, match=r"teacher.engine: 'hff' is not one of 'hf', 'sglang'. did you mean 'hf'\?"):
        load_config(_write(tmp_path, cfg))
    cfg = _base(tmp_path, *tiny_pair)
    cfg["student"]["tensor_parallel_size"] = 2  # a Megatron key is not valid in the fsdp2 section
    with pytest.raises(ConfigError, match="student.tensor_parallel_size: unknown key"):
        load_config(_write(tmp_path, cfg))


def test_every_problem_is_reported_with_values(tmp_path, tiny_pair):
    cfg = _base(tmp_path, *tiny_pair)
    cfg["optim"] = {"lr": -1}
    cfg["loss"] = {"temperature": 0}
    del cfg["data"]
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, cfg))
    assert err.value.problems == [
        "loss.temperature: Input should be greater than 0 (got 0)",
        "optim.lr: Input should be greater than 0 (got -1)",
        "data: required, but missing",
    ]


def test_overrides_parse_yaml_values_and_create_sections():
    raw = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=3e-4", "student.init_from_teacher_layers=[0, 2]",
                                                   "run.max_steps=5", "ray.address=null"])
    assert raw == {"optim": {"lr": 3e-4}, "student": {"init_from_teacher_layers": [0, 2]},
                   "run": {"max_steps": 5}, "ray": {"address": None}}
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="'lr' is a value, not a section"):
        apply_overrides({"optim": {"lr": 1}}, ["optim.lr.x=2"])


def test_student_needs_exactly_one_source(tmp_path, tiny_pair):
    cfg = _base(tmp_path, *tiny_pair)
    cfg["student"]["init_from_teacher_layers"] = [0, 1]
    with pytest.raises(ConfigError, match="set exactly one of student.model_path"):
        load_config(_write(tmp_path, cfg))


def test_validate_prints_the_resolved_config(tmp_path, tiny_pair, capsys):
    path = _write(tmp_path, _base(tmp_path, *tiny_pair))
    assert main(["validate", str(path), "optim.lr=2e-4"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["optim"]["lr"] == 2e-4
    assert resolved["loss"]["divergence"] == "forward_kl"  # defaults filled in
    assert resolved["student"]["num_ranks"] == 2


def test_cross_checks_collect_every_problem(tmp_path, tiny_pair, capsys):
    cfg = _base(tmp_path, *tiny_pair)
    cfg["teacher"]["model_path"] = str(tmp_path / "nope")
    cfg["data"]["global_batch_size"] = 3  # not divisible by 2 ranks
    cfg["data"]["eval_path"] = str(tmp_path / "missing.jsonl")
    assert main(["validate", str(_write(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err
    assert "data.eval_path: file" in err and "does not exist" in err
    assert "teacher.model_path:" in err and "nope" in err
    assert "data.global_batch_size 3 is not divisible by student.num_ranks 2" in err
    assert "Traceback" not in err


def test_layers_out_of_range_are_named(tmp_path, tiny_pair, capsys):
    cfg = _base(tmp_path, *tiny_pair)
    cfg["student"] = {"backend": "fsdp2", "init_from_teacher_layers": [0, 7], "num_ranks": 2}
    assert main(["validate", str(_write(tmp_path, cfg))]) == 2
    assert "the teacher has 4 layers" in capsys.readouterr().err


def test_bad_config_via_the_console_script_has_no_traceback(tmp_path, tiny_pair):
    cfg = _base(tmp_path, *tiny_pair)
    cfg["optim"] = {"learning_rate": 1e-3}
    path = _write(tmp_path, cfg)
    proc = subprocess.run([sys.executable, "-m", "kdscale.cli", "train", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "optim.learning_rate: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a rejected config


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_warmup_longer_than_the_run_is_a_preflight_problem():
    from kdscale.config.load import load_config
    from kdscale.controller.preflight import preflight

    cfg = load_config(None, ["teacher.engine=hf", "teacher.model_path=t", "student.backend=fsdp2",
                             "student.model_path=s", "data.train_path=d.jsonl", "run.max_steps=2",
                             "optim.warmup_steps=4"])
    assert any("optim.warmup_steps (4) exceeds run.max_steps (2)" in p for p in preflight(cfg))


def test_cross_tokenizer_config(tmp_path, tiny_pair):
    cfg = _base(tmp_path, *tiny_pair)
    assert load_config(_write(tmp_path, cfg)).cross_tokenizer.enabled is False  # the default: one tokenizer
    cfg["cross_tokenizer"] = {"method": "dskd", "projector_ce_weight": 0.5}
    loaded = load_config(_write(tmp_path, cfg))
    assert loaded.cross_tokenizer.enabled and loaded.cross_tokenizer.projector_ce_weight == 0.5
    cases = [
        ({"student": {"backend": "megatron", "model_path": str(tiny_pair[1])}},
         "not yet supported with student.backend=megatron"),
        ({"algorithm": "on_policy"}, "not yet supported with algorithm=on_policy"),
        ({"student": {"backend": "fsdp2", "init_from_teacher_layers": [0]}}, "needs a student with its own tokenizer"),
        ({"cross_tokenizer": {"method": "dskd", "min_aligned_fraction": 1.5}}, "min_aligned_fraction"),
        ({"cross_tokenizer": {"method": "shared_vocb"}}, "shared_vocab"),
    ]  # fmt: skip
    for change, message in cases:
        bad = {**cfg, **change}
        with pytest.raises(ConfigError, match=message):
            load_config(_write(tmp_path, bad))
