"""The sglang teacher engine's pieces that need no running engine: config section, engine arguments, the
scheduler-side array patch, the prefill-row checks, the version gate. (The engine itself: tests/e2e/test_sglang.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdscale.config.load import ConfigError, load_config
from kdscale.teacher import engine_kwargs, numerics_settings
from kdscale.teacher import sglang_engine as se


def _cfg(**teacher):
    overrides = ["teacher.engine=sglang", "teacher.model_path=/models/t", "student.backend=fsdp2",
                 "student.model_path=/models/s", "data.train_path=train.jsonl"]
    return load_config(None, overrides + [f"teacher.{key}={json.dumps(value)}" for key, value in teacher.items()])


def test_config_section_and_engine_kwargs():
    cfg = _cfg(tp_size=2, dp_size=2, ep_size=4, quantization="fp8", kv_cache_dtype="fp8_e4m3",
               mem_fraction_static=0.5, engine_args={"max_running_requests": 64})
    assert cfg.teacher.gpus_per_replica == 4
    kwargs = engine_kwargs(cfg.teacher, model_dir="/prepared", transport_dtype="bfloat16", device="cuda",
                           sleep_between_steps=True, seed=3)
    assert kwargs["model_path"] == "/prepared" and kwargs["tp_size"] == 2 and kwargs["dp_size"] == 2
    assert kwargs["quantization"] == "fp8" and kwargs["kv_cache_dtype"] == "fp8_e4m3"
    assert kwargs["enable_memory_saver"] is True and kwargs["seed"] == 3
    assert kwargs["engine_args"] == {"max_running_requests": 64}
    # the memory saver is a GPU feature: never asked for on the CPU engine
    cpu = engine_kwargs(cfg.teacher, model_dir="/p", transport_dtype="bfloat16", device="cpu", sleep_between_steps=True)
    assert cpu["enable_memory_saver"] is False
    # what changes the hidden states is in the cache fingerprint
    assert numerics_settings(cfg.teacher)["quantization"] == "fp8"


def test_config_rejects_bad_sglang_keys():
    with pytest.raises(ConfigError, match="ep_size"):
        _cfg(tp_size=2, ep_size=3)
    with pytest.raises(ConfigError, match="attn_implementation"):  # an hf-engine key under engine=sglang
        _cfg(attn_implementation="sdpa")


def test_engine_args_owned_by_kdscale_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8, "model_type": "llama"}')
    with pytest.raises(ValueError, match=r"disable_radix_cache .*always on.*remove them"):
        se.SGLangTeacherEngine(model_path=tmp_path, engine_args={"disable_radix_cache": False})
    with pytest.raises(ValueError, match=r"tp_size \(use teacher.tp_size\)"):
        se.SGLangTeacherEngine(model_path=tmp_path, engine_args={"tp_size": 2})
    engine = se.SGLangTeacherEngine(model_path=tmp_path, engine_args={"max_running_requests": 8}, device="cpu")
    assert engine.hidden_size == 8 and not engine.started


def test_tensor_to_array_keeps_bf16_bits():
    rows = torch.randn(5, 7).to(torch.bfloat16)
    array = se._tensor_to_array(rows)
    assert array.dtype == np.int16 and array.shape == (5, 7)
    assert torch.equal(torch.from_numpy(array).view(torch.bfloat16), rows)
    assert se._tensor_to_array(torch.ones(2, 3)).dtype == np.float32


class _Mode:
    def __init__(self, full: bool):
        self.full = full

    def is_full(self):
        return self.full


class _Req:
    def __init__(self, mode=True):
        self.return_hidden_states = mode
        self.hidden_states = []


class _Out:
    def __init__(self, hidden):
        self.hidden_states = hidden


def test_patched_prefill_append_returns_one_array_per_request(monkeypatch):
    """The replacement appends the request's rows as one bf16-bit array and advances the offset like SGLang."""
    hidden = torch.randn(9, 4).to(torch.bfloat16)
    first, second = _Req(), _Req()
    offset = se._append_prefill_hidden_states_as_array(
        None, req=first, logits_output=_Out(hidden), hidden_state_offset=0, capture_hidden_mode=_Mode(True),
        extend_input_len=4,
    )
    offset = se._append_prefill_hidden_states_as_array(
        None, req=second, logits_output=_Out(hidden), hidden_state_offset=offset, capture_hidden_mode=_Mode(True),
        extend_input_len=5,
    )
    assert offset == 9
    assert torch.equal(torch.from_numpy(first.hidden_states[0]).view(torch.bfloat16), hidden[:4])
    assert torch.equal(torch.from_numpy(second.hidden_states[0]).view(torch.bfloat16), hidden[4:])
    # store=False (a request not committing output) advances the offset without appending
    third = _Req()
    assert se._append_prefill_hidden_states_as_array(
        None, req=third, logits_output=_Out(hidden), hidden_state_offset=0, capture_hidden_mode=_Mode(True),
        extend_input_len=3, store=False,
    ) == 3 and third.hidden_states == []
    # other modes ("last") go to SGLang's own method
    calls = []
    monkeypatch.setattr(se, "_ORIGINAL_APPEND", lambda self, **kw: calls.append(kw) or 7)
    assert se._append_prefill_hidden_states_as_array(
        None, req=_Req("last"), logits_output=_Out(hidden), hidden_state_offset=6, capture_hidden_mode=_Mode(False),
        extend_input_len=3,
    ) == 7 and calls[0]["hidden_state_offset"] == 6


def test_prefill_rows_checks():
    rows = np.zeros((6, 4), dtype=np.int16)
    assert se.prefill_rows([rows], 6) is rows
    # chunks in order, then decode steps (lists) ignored
    joined = se.prefill_rows([rows[:4], rows[4:], [0.0] * 4], 6)
    assert joined.shape == (6, 4)
    with pytest.raises(se.TeacherEngineError, match="max_new_tokens=0"):
        se.prefill_rows([], 6)
    with pytest.raises(se.TeacherEngineError, match="Python lists: the array patch"):
        se.prefill_rows([[[0.0] * 4] * 6], 6)
    with pytest.raises(se.TeacherEngineError, match="5 prefill hidden-state rows for a prompt of 6 tokens"):
        se.prefill_rows([rows[:5]], 6)


def test_version_gate(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.4.9")
    with pytest.raises(se.SGLangUnavailableError, match=r"SGLang 0.4.9 is installed; kdscale supports >=0.5.23,<0.6"):
        se.check_sglang()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(se.SGLangUnavailableError, match="install_sglang_cpu.sh"):
        se.check_sglang()
    assert se._version_tuple("0.5.23.post1") == (0, 5, 23) and se._version_tuple("0.6.0rc1") == (0, 6, 0)


def test_cpu_environment_names_a_bad_shim_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KDSCALE_SGLANG_SHIMS", str(tmp_path / "missing"))
    with pytest.raises(se.SGLangUnavailableError, match="KDSCALE_SGLANG_SHIMS"):
        se.prepare_cpu_environment()


def test_preflight_names_a_missing_or_unsupported_sglang_and_the_cpu_shims(monkeypatch, tmp_path):
    import importlib.metadata

    from kdscale.controller.preflight import _sglang_problems

    cfg = _cfg(device="cpu")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert "install_sglang_cpu.sh" in _sglang_problems(cfg)[0]
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.6.1")
    assert "SGLang 0.6.1 is installed; kdscale supports >=0.5.23,<0.6" in _sglang_problems(cfg)[0]
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.5.23")
    monkeypatch.delenv("KDSCALE_SGLANG_SHIMS", raising=False)
    assert "KDSCALE_SGLANG_SHIMS" in _sglang_problems(cfg)[0]
    monkeypatch.setenv("KDSCALE_SGLANG_SHIMS", str(tmp_path))
    assert _sglang_problems(cfg) == []
    monkeypatch.delenv("KDSCALE_SGLANG_SHIMS")
    assert _sglang_problems(_cfg(device="cuda")) == []  # on GPUs no shims are needed
