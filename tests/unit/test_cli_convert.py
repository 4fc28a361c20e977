"""`kdscale convert` delegates to the converters and keeps their one-message user errors."""

from __future__ import annotations

from kdscale.cli import main


def test_convert_missing_hf_dir_is_one_message(tmp_path, capsys):
    rc = main(["convert", "hf-to-mcore", "--hf-dir", str(tmp_path / "absent"), "--out-dir", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "absent" in err and "not found" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_convert_unsupported_architecture_lists_the_supported(tmp_path, capsys):
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 10}')
    (hf / "model.safetensors").write_bytes(b"")
    rc = main(["convert", "hf-to-mcore", "--hf-dir", str(hf), "--out-dir", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and "llama" in err and "qwen3" in err
