"""tools/dev/make_cross_tokenizer_student.py: a real student with its own tokenizer that kdscale can tokenize with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdscale.data import read_jsonl, tokenize_rows
from tests.fixtures import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "dev" / "make_cross_tokenizer_student.py"
TRAIN = REPO / "data" / "quickstart" / "train.jsonl"


@pytest.fixture(scope="module")
def tool():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def student_dir(tool, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "xtok"
    assert tool.make_student([TRAIN], out, seed=0) == out
    return out


def test_loads_offline_with_its_own_tokenizer_and_template(student_dir):
    tokenizer = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(student_dir, local_files_only=True)

    assert tokenizer.is_fast
    assert 259 < len(tokenizer) <= 2048
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert "<|im_end|>" not in tokenizer.get_vocab() and "<|im_start|>" not in tokenizer.get_vocab()
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s>### System:\nBe brief.</s>\n### User:\nHi</s>\n### Assistant:\n"

    assert model.get_output_embeddings().weight.shape == (len(tokenizer), 128)
    assert model.config.vocab_size == len(tokenizer)
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings is False
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert json.loads((student_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )


def test_kdscale_tokenizes_every_row(student_dir):
    tokenizer = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
    rows, stats = read_jsonl(TRAIN)
    assert {row.format for row in rows} == {"prompt_response", "messages"}  # both row formats are exercised

    samples, stats = tokenize_rows(rows, tokenizer, max_seq_len=512, stats=stats)

    assert stats.dropped == [] and stats.num_truncated == 0
    assert [s.sample_id for s in samples] == [row.sample_id for row in rows]
    for sample, row in zip(samples, rows):
        assert sample.input_ids[0] == tokenizer.bos_token_id
        assert sample.input_ids[-1] == tokenizer.eos_token_id and sample.loss_mask[-1]
        response = tokenizer.decode(sample.input_ids[sample.loss_mask])
        assert response == row.response + "</s>"


def test_same_seed_same_files_other_seed_other_weights(tool, student_dir, tmp_path, capsys):
    assert tool.main(["--data", str(TRAIN), "--out", str(tmp_path / "again"), "--seed", "0"]) == 0
    assert f"written to {tmp_path / 'again'}" in capsys.readouterr().out
    tool.make_student([TRAIN], tmp_path / "seed1", seed=1)

    tokenizer_json = (student_dir / "tokenizer.json").read_bytes()
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == tokenizer_json
    assert (tmp_path / "seed1" / "tokenizer.json").read_bytes() == tokenizer_json  # the seed is for the weights only
    weights = load_file(student_dir / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    seed1 = load_file(tmp_path / "seed1" / "model.safetensors")
    assert weights.keys() == again.keys() == seed1.keys()
    assert all(torch.equal(weights[name], again[name]) for name in weights)
    assert not torch.equal(weights["model.embed_tokens.weight"], seed1["model.embed_tokens.weight"])


def test_existing_dir_refused_without_force_replaced_with_it(tool, tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    with pytest.raises(tool.StudentError, match="already exists: pass --force"):
        tool.make_student([TRAIN], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    tool.make_student([TRAIN], out, vocab_size=512, force=True)
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 512
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no staging or moved-aside directory left behind


def test_row_that_breaks_the_prefix_rule_is_an_error(tool, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}.\n\nMore."} for i in range(20)]
    rows.append({"prompt": "Indented?", "response": "\n\n  indented"})  # the header's "\n" joins this whitespace
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    with pytest.raises(tool.StudentError, match="line 21: chat template: the prompt's tokens are not a prefix"):
        tool.make_student([data], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--vocab-size", "258"], "--vocab-size must be at least 259"),
        (["--hidden-size", "100", "--heads", "3"], "must be a multiple of --heads (3)"),
    ],
)
def test_bad_arguments_exit_2(tool, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        tool.main(["--data", str(TRAIN), "--out", str(tmp_path / "out"), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_missing_data_file_exits_2_without_traceback(tmp_path):
    missing = tmp_path / "nope.jsonl"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(TRAIN), "--data", str(missing), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: data file {str(missing)!r} does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
