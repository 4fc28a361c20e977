"""kdscale.checkpoint.hf_io (resolve, GGUF cache, head reading, atomic writes) and student init from teacher layers."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kdscale.checkpoint import hf_io
from kdscale.checkpoint.hf_io import (
    ModelPathError,
    hidden_size,
    materialize_hf_dir,
    read_model_config,
    read_output_head,
    resolve_model_path,
    save_hf_model_atomically,
    vocab_size,
    write_safetensors_sharded,
)
from kdscale.student import init_from_teacher
from kdscale.student.init_from_teacher import derive_student_from_teacher, student_config
from tests.fixtures import make_tiny_llama, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory, tokenizer):
    return make_tiny_llama(tmp_path_factory.mktemp("untied"), tokenizer=tokenizer, num_layers=4)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, tokenizer):
    return make_tiny_llama(tmp_path_factory.mktemp("tied"), tokenizer=tokenizer, tie_word_embeddings=True, seed=1)


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ resolve


def test_resolve_hf_dir_and_gguf(untied_dir, tmp_path):
    assert resolve_model_path(str(untied_dir)) == Path(untied_dir)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_path(str(gguf)) == gguf


def test_resolve_missing_path_names_path_and_expectation(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelPathError, match="not found: expected a Hugging Face model directory") as info:
        resolve_model_path(str(missing))
    assert str(missing) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_resolve_rejects_dir_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(ModelPathError, match="without config.json"):
        resolve_model_path(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelPathError, match="not a .gguf"):
        materialize_hf_dir(str(other), cache_dir=tmp_path / "cache")


def test_resolve_pkg_scheme():
    expected = Path(importlib.util.find_spec("json").origin)
    assert resolve_model_path("pkg://json/__init__.py") == expected
    xml_dir = Path(importlib.util.find_spec("xml").origin).parent
    assert resolve_model_path("pkg://xml.etree/ElementTree.py") == xml_dir / "etree" / "ElementTree.py"
    with pytest.raises(ModelPathError, match="not found in installed package 'json'"):
        resolve_model_path("pkg://json/missing.gguf")
    with pytest.raises(ModelPathError, match="not installed"):
        resolve_model_path("pkg://kdscale_no_such_package_xyz/model.gguf")
    with pytest.raises(ModelPathError, match="pkg://<python_package>/<relative file>"):
        resolve_model_path("pkg://json")


# ------------------------------------------------------------------------------------------------ config


def test_read_model_config_and_sizes(untied_dir, tmp_path):
    config = read_model_config(untied_dir)
    assert hidden_size(config) == 64
    assert vocab_size(config) == config["vocab_size"]
    assert hidden_size({"text_config": {"hidden_size": 32}}) == 32
    with pytest.raises(ModelPathError, match="'hidden_size'"):
        hidden_size({"model_type": "x"})
    with pytest.raises(ModelPathError, match="config.json not found"):
        read_model_config(tmp_path)


# ------------------------------------------------------------------------------------------------ output head


@pytest.mark.parametrize("tied", [False, True])
def test_read_output_head(tied, tied_dir, untied_dir):
    model_dir = tied_dir if tied else untied_dir
    model = _load(model_dir)
    head = read_output_head(model_dir)
    assert head.dtype == torch.float32
    assert torch.equal(head, model.lm_head.weight)
    if tied:
        assert torch.equal(head, model.model.embed_tokens.weight)
    else:
        assert not torch.equal(head, model.model.embed_tokens.weight)
    assert read_output_head(model_dir, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("tied", [False, True])
def test_read_output_head_sharded(tied, tied_dir, untied_dir, tmp_path):
    model = _load(tied_dir if tied else untied_dir)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert torch.equal(read_output_head(tmp_path), model.lm_head.weight)


def test_read_output_head_builds_no_model(untied_dir, monkeypatch):
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("read_output_head must not instantiate a model")

    monkeypatch.setattr(PreTrainedModel, "__init__", refuse)
    assert read_output_head(untied_dir).shape[1] == 64


def test_read_output_head_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4, "vocab_size": 8}))
    save_file({"encoder.weight": torch.zeros(8, 4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelPathError, match="no output head.*encoder.weight"):
        read_output_head(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4, "tie_word_embeddings": False}))
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelPathError, match="tie_word_embeddings=false"):
        read_output_head(tmp_path)


# ------------------------------------------------------------------------------------------------ materialize


def test_materialize_returns_hf_dir(untied_dir, tmp_path):
    assert materialize_hf_dir(str(untied_dir), cache_dir=tmp_path / "cache") == Path(untied_dir)
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text("{}")
    with pytest.raises(ModelPathError, match="only safetensors"):
        materialize_hf_dir(str(bin_only), cache_dir=tmp_path / "cache")


def _fake_convert(calls):
    def convert(gguf_path, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text(json.dumps({"from": str(gguf_path)}))

    return convert


def test_materialize_gguf_converts_once_and_reuses(tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    calls: list[Path] = []
    monkeypatch.setattr(hf_io, "_convert_gguf", _fake_convert(calls))
    cache = tmp_path / "cache"
    first = materialize_hf_dir(str(gguf), cache_dir=cache)
    second = materialize_hf_dir(str(gguf), cache_dir=cache)
    assert first == second and len(calls) == 1
    assert first.parent == cache and first.name.startswith("tiny.Q4-")
    assert json.loads((first / "config.json").read_text()) == {"from": str(gguf)}
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary directory left
    os.utime(gguf, ns=(0, 10**9))  # an edited file converts again into another directory
    assert materialize_hf_dir(str(gguf), cache_dir=cache) != first and len(calls) == 2


def test_materialize_gguf_race_uses_winner(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    target = cache / hf_io._gguf_cache_name(gguf)

    def convert_and_lose(gguf_path, out_dir):  # another process renames its result in while we convert
        (out_dir / "config.json").write_text('{"mine": true}')
        target.mkdir(parents=True)
        (target / "config.json").write_text('{"theirs": true}')

    monkeypatch.setattr(hf_io, "_convert_gguf", convert_and_lose)
    assert materialize_hf_dir(str(gguf), cache_dir=cache) == target
    assert json.loads((target / "config.json").read_text()) == {"theirs": True}
    assert [p.name for p in cache.iterdir()] == [target.name]


def test_materialize_gguf_failure_leaves_nothing(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def broken(gguf_path, out_dir):
        raise RuntimeError("bad gguf")

    monkeypatch.setattr(hf_io, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="bad gguf"):
        materialize_hf_dir(str(gguf), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


# ------------------------------------------------------------------------------------------------ writing


def test_save_model_atomically(untied_dir, tokenizer, tmp_path):
    model = _load(untied_dir)
    out = save_hf_model_atomically(model, None, tokenizer, tmp_path / "export")
    reloaded = _load(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(ModelPathError, match="overwrite=True"):
        save_hf_model_atomically(model, None, tokenizer, out)
    torch.nn.init.zeros_(model.lm_head.weight)
    save_hf_model_atomically(model, None, tokenizer, out, overwrite=True)
    assert torch.count_nonzero(read_output_head(out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_save_state_dict_atomically_sharded_with_tokenizer_dir(untied_dir, tmp_path):
    from transformers import AutoTokenizer

    model = _load(untied_dir)
    out = save_hf_model_atomically(
        model.state_dict(), read_model_config(untied_dir), untied_dir, tmp_path / "sd", max_shard_size="30KB"
    )
    assert (out / "model.safetensors.index.json").is_file()
    reloaded = _load(out)
    assert torch.equal(reloaded.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
    assert AutoTokenizer.from_pretrained(out).chat_template is not None


def test_save_failure_leaves_nothing(tmp_path):
    with pytest.raises(AttributeError):
        save_hf_model_atomically({"w": "not a tensor"}, {"model_type": "llama"}, None, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="needs its config"):
        save_hf_model_atomically({}, None, None, tmp_path / "bad")


def test_write_safetensors_sharded_handles_shared_storage(tmp_path):
    shared = torch.arange(6.0).reshape(2, 3)
    files = write_safetensors_sharded([("a", shared), ("b", shared), ("c", torch.ones(4))], tmp_path)
    assert [f.name for f in files] == ["model.safetensors"]
    index = hf_io.safetensors_key_index(tmp_path)
    assert sorted(index) == ["a", "b", "c"]
    assert torch.equal(hf_io.read_tensor(files[0], "b"), shared)


# ------------------------------------------------------------------------------------------------ student init


def test_derive_student_from_teacher_layers(untied_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    warnings: list[str] = []
    monkeypatch.setattr(init_from_teacher.logger, "warning", warnings.append)
    out = derive_student_from_teacher(untied_dir, tmp_path / "student", layers=[0, 3])
    assert warnings == []  # the meta-device structure check ran
    teacher = _load(untied_dir)
    from transformers import AutoModelForCausalLM

    student, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    for student_layer, teacher_layer in ((0, 0), (1, 3)):
        s_params = dict(student.model.layers[student_layer].named_parameters())
        for name, param in teacher.model.layers[teacher_layer].named_parameters():
            assert torch.equal(s_params[name], param), name
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(untied_dir).chat_template
    assert (out / "generation_config.json").is_file()
    assert json.loads((out / "kdscale_student_init.json").read_text())["layers"] == [0, 3]
    with pytest.raises(ModelPathError, match="already exists"):
        derive_student_from_teacher(untied_dir, out, layers=[1])
    derive_student_from_teacher(untied_dir, out, layers=[1], overwrite=True)
    assert read_model_config(out)["num_hidden_layers"] == 1


@pytest.mark.parametrize(
    ("layers", "message"),
    [([], "empty"), ([0, 4], r"\[4\] out of range"), ([1, 1], "repeated"), ([3, 0], "increasing"), ([0.5], "integers")],
)
def test_derive_student_validates_layers(untied_dir, tmp_path, layers, message):
    with pytest.raises(ValueError, match=message):
        derive_student_from_teacher(untied_dir, tmp_path / "s", layers=layers)
    assert not (tmp_path / "s").exists()


def test_student_config_per_layer_entries():
    config = {
        "num_hidden_layers": 4,
        "layer_types": ["full", "sliding", "full", "sliding"],
        "mlp_only_layers": [0, 3],
        "max_window_layers": 2,
        "architectures": ["XForCausalLM"],
        "hidden_size": 8,
    }
    out = student_config(config, [1, 3])
    assert out["num_hidden_layers"] == 2
    assert out["layer_types"] == ["sliding", "sliding"]
    assert out["mlp_only_layers"] == [1]
    assert out["max_window_layers"] == 1  # teacher layer 1 < 2 is kept, 3 is not
    assert out["architectures"] == ["XForCausalLM"] and config["num_hidden_layers"] == 4


def test_derive_student_keeps_layer_types(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=2,
    )
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "teacher")
    teacher_types = Qwen2Config.from_pretrained(tmp_path / "teacher").layer_types
    assert teacher_types[1] != teacher_types[2]  # full attention below max_window_layers, sliding above
    out = derive_student_from_teacher(tmp_path / "teacher", tmp_path / "student", layers=[1, 2])
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.layer_types == [teacher_types[1], teacher_types[2]]


def test_derive_student_rejects_inexpressible_structure(tmp_path, tokenizer):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=2,
        num_experts_per_tok=1,
        decoder_sparse_step=2,  # layers 1 and 3 are MoE, 0 and 2 dense
    )
    Qwen2MoeForCausalLM(config).save_pretrained(tmp_path / "teacher")
    derive_student_from_teacher(tmp_path / "teacher", tmp_path / "ok", layers=[2, 3])  # dense, MoE: expressible
    with pytest.raises(ValueError, match="student layer 0 would not have the structure of teacher layer 1"):
        derive_student_from_teacher(tmp_path / "teacher", tmp_path / "bad", layers=[1, 3])
    assert not (tmp_path / "bad").exists()
