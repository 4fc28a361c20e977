"""A real Slurm: the shortened quickstart submitted with `kdscale launch slurm --submit` to a one-node cluster on
localhost, and a cancelled job. Opt-in (KDSCALE_TEST_SLURM=1; root): the module first runs
`bash tools/dev/slurm_local.sh start`, which installs slurmctld, slurmd and munge from Debian's packages if missing,
configures the node and starts the daemons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdscale.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("KDSCALE_TEST_SLURM") != "1",
                       reason="opt-in: bash tools/dev/slurm_local.sh, then KDSCALE_TEST_SLURM=1"),
]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def local_slurm():
    """Install Slurm from Debian's packages if missing and start the one-node cluster (a no-op when it runs)."""
    proc = subprocess.run(["bash", str(ROOT / "tools" / "dev" / "slurm_local.sh"), "start"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _submit(tmp_path: Path, capsys, *overrides: str) -> tuple[str, Path]:
    run_dir = tmp_path / "run"
    args = ["launch", "slurm", str(ROOT / "configs" / "quickstart.yaml"), f"run.output_dir={run_dir}",
            f"run.cache_dir={os.environ.get('KDSCALE_TEST_CACHE', ROOT / '.kdscale_cache')}", "run.progress_bar=false",
            *overrides, "--nodes", "1", "--python", sys.executable, "--out", str(tmp_path / "job.sbatch"), "--submit"]
    capsys.readouterr()
    assert main(args) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert job_id.isdigit(), job_id
    return job_id, run_dir


def _wait_gone(job_id: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"job {job_id} still queued/running after {timeout_s}s"
        time.sleep(3)


def _ray_processes_of(job_id: str) -> list[int]:
    """Processes whose command line names the job's private Ray temp dir."""
    tag = f"kdray-{job_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_quickstart_job_completes_with_metrics_and_a_checkpoint_and_leaves_no_ray(tmp_path, capsys):
    job_id, run_dir = _submit(tmp_path, capsys, "run.max_steps=2", "optim.warmup_steps=1", "run.eval_every=0", "data.eval_path=null",
                              "run.export_hf=false")
    _wait_gone(job_id, 900)
    log = next(tmp_path.glob(f"*-{job_id}.log")).read_text()
    assert "all 1 node(s) joined Ray" in log, log[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2], log[-3000:]
    assert (run_dir / "checkpoints" / "step_000002").is_dir()
    time.sleep(2)
    assert _ray_processes_of(job_id) == []
    assert not Path(f"/tmp/kdray-{job_id}").exists()


def test_cancelled_job_leaves_no_ray(tmp_path, capsys):
    job_id, _ = _submit(tmp_path, capsys, "run.max_steps=40")
    deadline = time.monotonic() + 600
    log_path = tmp_path / f"kdscale-{job_id}.log"
    while "all 1 node(s) joined Ray" not in (log_path.read_text() if log_path.exists() else ""):
        assert time.monotonic() < deadline, "the job never brought Ray up"
        time.sleep(2)
    assert _ray_processes_of(job_id)  # Ray of this job is running
    subprocess.run(["scancel", job_id], check=True)
    _wait_gone(job_id, 180)
    deadline = time.monotonic() + 60
    while _ray_processes_of(job_id) and time.monotonic() < deadline:
        time.sleep(2)
    assert _ray_processes_of(job_id) == []
