"""The Slurm launcher: the rendered sbatch file, run for 4 nodes against stand-ins for srun/scontrol/python that
record every command, and the placement check before anything is written."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kdscale.cli import main
from kdscale.launch.slurm import SlurmJob, check_fits, generic_job, render_sbatch

ROOT = Path(__file__).resolve().parents[2]

FAKE_SRUN = """#!/usr/bin/env bash
trap 'echo "stopped $*" >> "$LOG"; exit 0' TERM
echo "srun $*" >> "$LOG"
args=("$@")
for i in "${!args[@]}"; do
  if [[ "${args[$i]}" == "hostname" ]]; then echo "10.0.0.1"; exit 0; fi
  if [[ "${args[$i]}" == "start" ]]; then
    while true; do sleep 0.1; done
  fi
done
exit 0
"""
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$LOG"
if [[ "$1" == "-" ]]; then  # the wait for the nodes: like Ray's, it returns once every node's start step runs
  cat > /dev/null
  for _ in $(seq 100); do
    [[ $(grep -c " start " "$LOG") -ge 4 ]] && exit 0
    sleep 0.1
  done
  exit 1
fi
exit "${TRAIN_STATUS:-0}"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
printf 'gpu-a\\ngpu-b\\ngpu-c\\ngpu-d\\n'
"""


def _run_rendered(tmp_path: Path, train_status: int = 0) -> tuple[int, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("fakepython", FAKE_PYTHON), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    job = SlurmJob(config="configs/x.yaml", overrides=["run.max_steps=2", "run.name=with space"], nodes=4,
                   gpus_per_node=8, partition="gpu", python=str(bin_dir / "fakepython"), workdir=str(tmp_path))
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(job))
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-[a-d]", "TRAIN_STATUS": str(train_status)}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, log.read_text().splitlines()


def test_four_nodes_start_a_head_three_workers_train_once_and_stop_only_their_own_ray(tmp_path):
    status, log = _run_rendered(tmp_path)
    assert status == 0
    port = 20000 + 4242 % 20000
    starts = [line for line in log if line.startswith("srun") and " start " in line]
    head = [line for line in starts if "--head" in line]
    workers = [line for line in starts if "--head" not in line]
    assert len(head) == 1 and "-w gpu-a" in head[0] and f"--port={port}" in head[0]
    assert sorted(line.split("-w ")[1].split()[0] for line in workers) == ["gpu-b", "gpu-c", "gpu-d"]
    assert all(f"--address=10.0.0.1:{port}" in line for line in workers)
    assert all("--temp-dir=/tmp/kdray-4242" in line and "--block" in line and "--num-gpus=8" in line
               for line in starts)
    train = [line for line in log if "kdscale.cli train" in line]
    assert train == [f"python -m kdscale.cli train configs/x.yaml ray.address=10.0.0.1:{port} run.max_steps=2 "
                     "run.name=with space"]
    joined = [line for line in log if line.startswith("python - ")]
    assert joined == [f"python - 10.0.0.1:{port} 4 300"]  # waits for all 4 nodes before training
    assert sum(line.startswith("stopped") for line in log) == 4  # every Ray step it started, no other
    assert sum("rm -rf /tmp/kdray-4242" in line for line in log) == 4


def test_a_failed_training_still_tears_ray_down_and_fails_the_job(tmp_path):
    status, log = _run_rendered(tmp_path, train_status=3)
    assert status == 3
    assert sum(line.startswith("stopped") for line in log) == 4


def test_the_rendered_file_has_the_job_shape_and_no_global_kill():
    text = render_sbatch(SlurmJob(config="c.yaml", nodes=4, gpus_per_node=8, partition="gpu", time="04:00:00",
                                  extra_sbatch=["--qos=high"]))
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=04:00:00", "#SBATCH --qos=high", "trap cleanup EXIT"):
        assert line in text
    assert "pkill" not in text and "ray stop" not in text


def test_the_repository_template_is_the_renderers_output():
    assert (ROOT / "launch" / "slurm" / "kdscale.sbatch").read_text() == render_sbatch(generic_job())


def test_placement_is_checked_before_writing(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("teacher: {engine: hf, model_path: t}\nstudent: {backend: fsdp2, model_path: s, device: cuda, "
                      "num_ranks: 8}\ndata: {train_path: d.jsonl}\n")
    plan = check_fits(SlurmJob(config=str(config), nodes=2, gpus_per_node=8, overrides=["teacher.device=cuda"]))
    assert "placement: separate" in plan
    with pytest.raises(ValueError, match="9 GPUs but the cluster has 8"):
        check_fits(SlurmJob(config=str(config), nodes=1, gpus_per_node=8,
                            overrides=["teacher.device=cuda", "controller.placement=separate"]))


def test_cli_writes_the_file_and_refuses_a_submit_without_sbatch(tmp_path, capsys, monkeypatch):
    out = tmp_path / "job.sbatch"
    assert main(["launch", "slurm", "configs/quickstart.yaml", "run.max_steps=3", "--nodes", "2", "--out",
                 str(out)]) == 0
    text = out.read_text()
    assert "#SBATCH --nodes=2" in text and "run.max_steps=3" in text
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main(["launch", "slurm", "configs/quickstart.yaml", "--nodes", "1", "--out", str(out), "--submit"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err


def test_local_launcher_explains_its_usage():
    proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage: bash launch/local.sh CONFIG" in proc.stderr
    env = {**os.environ, "KDSCALE_VENV": "/nonexistent-venv"}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "configs/quickstart.yaml"], capture_output=True,
                          text=True, timeout=30, env=env)
    assert proc.returncode == 2 and "run bash tools/dev/install.sh first" in proc.stderr
