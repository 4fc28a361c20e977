"""benchmarks/bench_gpu.py: the FLOPs formula, the peak table, and a --smoke run on the CPU (~15 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def test_model_flops_per_step(bench):
    flops = bench.model_flops_per_step(
        layer_params=1000, num_layers=2, hidden_size=8, seq_len=16, vocab=50, teacher_hidden_size=4,
        num_tokens=32, num_loss_tokens=30,
    )  # fmt: skip
    assert flops == 32 * (6 * 1000 + 12 * 2 * 8 * 16) + 30 * (6 * 50 * 8 + 2 * 50 * 4)


def test_peak_tflops_by_device_name(bench):
    assert bench.peak_tflops_for("NVIDIA H200") == 989.0
    assert bench.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops_for("Some Future GPU") is None


def test_smoke_run_prints_positive_figures(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--peak-tflops", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for label in ("student tokens/s", "MFU", "student peak memory (GiB)", "naive loss peak MiB / s",
                  "chunked loss peak MiB / s", "losses agree"):  # fmt: skip
        assert label in done.stdout, done.stdout
    results = json.loads(out.read_text())
    student, loss = results["student"], results["loss"]
    assert student["params"]["total"] > student["params"]["layers"] > 0
    for key in ("tokens_per_s", "step_s", "achieved_tflops", "mfu", "peak_memory_gib", "model_flops_per_step"):
        assert student[key] > 0, key
    assert len(student["losses"]) == 3 and all(0 < x < 100 for x in student["losses"])
    assert student["mfu"] == pytest.approx(student["achieved_tflops"] / 1.0)
    for key in ("naive_peak_mib", "chunked_peak_mib", "naive_s", "chunked_s"):
        assert loss[key] > 0, key
    assert loss["losses_agree"] and loss["chunked_peak_mib"] < loss["naive_peak_mib"]
