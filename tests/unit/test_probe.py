"""``kdscale probe-teacher`` on a tiny teacher: the hf engine against the float32 reference, its table, the CLI
with --json and --max-mean-kl, and its user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdscale.cli import main
from kdscale.config.load import load_config
from kdscale.teacher.probe import format_probe_table, probe_teacher

PROMPTS = [
    "What is two plus two?",
    "Name a primary colour.",
    "Explain gravity in one sentence.",
    "Write a haiku about the sea.",
]
RESPONSES = [
    "Two plus two is four.",
    "Red is a primary colour.",
    "Gravity pulls masses toward each other.",
    "waves fold into foam, salt wind carries gull voices, the tide keeps its time. " * 6,
]
COLUMNS = ("seq", "sample", "length", "tokens", "mean KL", "max KL", "top-1 agree", "max |dh|")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_pair) -> Path:
    teacher, student = tiny_pair
    root = tmp_path_factory.mktemp("probe")
    eval_path = root / "eval.jsonl"
    rows = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES)]
    rows.insert(
        1, {"messages": [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": RESPONSES[0]}]}
    )
    eval_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "run": {"name": "probe", "output_dir": str(root / "run"), "cache_dir": str(root / "cache")},
        "teacher": {"engine": "hf", "model_path": str(teacher), "dtype": "float32", "device": "cpu"},
        "student": {"backend": "fsdp2", "model_path": str(student)},
        "data": {"train_path": str(eval_path), "eval_path": str(eval_path), "max_seq_len": 128},
    }
    path = root / "probe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_float32_hf_engine_matches_reference(config_file):
    result = probe_teacher(load_config(config_file), num_sequences=3, max_tokens=64)
    assert result["engine"] == "hf" and result["dtype"] == "float32" and result["reference_dtype"] == "float32"
    assert result["num_sequences"] == len(result["sequences"]) == 3
    assert [s["sample_id"] for s in result["sequences"]] == [0, 1, 2]
    assert result["all"]["num_tokens"] == sum(s["num_tokens"] for s in result["sequences"]) > 0
    assert result["all"]["mean_kl"] < 1e-6 and result["all"]["max_kl"] < 1e-6
    assert result["all"]["top1_agreement"] == 100.0
    assert result["all"]["max_abs_hidden_diff"] < 1e-4


def test_bf16_engine_differs_a_little_and_table_has_columns(config_file):
    cfg = load_config(config_file, ["teacher.dtype=bfloat16"])
    result = probe_teacher(cfg, num_sequences=5, max_tokens=48)
    assert max(s["length"] for s in result["sequences"]) == 48  # the long haiku row is cut
    assert result["num_sequences"] == 5
    assert 0 < result["all"]["mean_kl"] < 1e-2
    assert result["all"]["max_kl"] >= result["all"]["mean_kl"]
    assert result["all"]["max_abs_hidden_diff"] > 0
    table = format_probe_table(result)
    assert "engine hf (dtype bfloat16)" in table and "float32 reference" in table and result["model_dir"] in table
    header = next(line for line in table.splitlines() if line.startswith("seq"))
    assert [header.find(c) for c in COLUMNS] == sorted(header.find(c) for c in COLUMNS) and -1 not in [
        header.find(c) for c in COLUMNS
    ]
    body = table.splitlines()[table.splitlines().index(header) + 2 :]
    assert [line.split()[0] for line in body if not line.startswith("-")] == ["0", "1", "2", "3", "4", "all"]
    widths = {len(line) for line in body if not line.startswith("-")}
    assert len(widths) == 1  # aligned


def test_cli_prints_table_and_writes_json(config_file, tmp_path, capsys):
    out = tmp_path / "sub" / "probe.json"
    code = main(
        [
            "probe-teacher",
            str(config_file),
            "teacher.attn_implementation=eager",
            "--num-sequences",
            "2",
            "--max-tokens",
            "32",
            "--json",
            str(out),
            "--max-mean-kl",
            "1e-3",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean KL" in printed and "top-1 agree" in printed and "\nall " in printed
    saved = json.loads(out.read_text())
    assert saved["num_sequences"] == 2 and saved["all"]["top1_agreement"] == 100.0
    assert [p.name for p in out.parent.iterdir()] == ["probe.json"]  # no temp file left


def test_cli_max_mean_kl_exceeded_exits_1(config_file, capsys):
    code = main(
        [
            "probe-teacher",
            str(config_file),
            "teacher.dtype=bfloat16",
            "--num-sequences",
            "1",
            "--max-tokens",
            "40",
            "--max-mean-kl",
            "0",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "mean KL" in captured.out  # the table is printed before the verdict
    assert "kdscale probe-teacher: failed:" in captured.err and "exceeds --max-mean-kl 0" in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-sequences", "0"], "--num-sequences must be at least 1, got 0"),
        (["--max-tokens", "1"], "--max-tokens must be at least 2"),
        (["--max-mean-kl", "-1"], "--max-mean-kl must be >= 0"),
        (["--max-tokens", "8"], "no row has a response token within the first 8 tokens"),
    ],
)
def test_cli_bad_options_are_one_clear_error(config_file, capsys, argv, message):
    assert main(["probe-teacher", str(config_file), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdscale probe-teacher: error: ") and message in err and "Traceback" not in err


def test_cli_missing_config_is_one_clear_error(tmp_path, capsys):
    assert main(["probe-teacher", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "kdscale probe-teacher: error:" in err and "does not exist" in err
