"""``kdscale launch slurm``: write (and optionally submit) the sbatch file of a multi-node run.

Design: the sbatch file is self-contained bash. Per job it uses a private Ray temp dir (``/tmp/kdray-<job id>``) and
a port derived from the job id. It starts the Ray head on the first node and a worker on every other node, each as
a ``srun --overlap`` step running ``ray start --block``, waits until every node has joined, then runs
``kdscale train CONFIG ray.address=HEAD:PORT [overrides]`` on the first node. On exit, failure or ``scancel``, a
trap ends the Ray steps it started and removes the temp dir. It never runs ``ray stop`` or ``pkill``, which would
hit other jobs' Ray on a shared node.

Before writing anything, the config is loaded and its placement is checked against ``nodes x gpus_per_node``
with the same planner the driver uses, so a layout that cannot fit fails here and not in the queue.
``launch/slurm/kdscale.sbatch`` in the repository is this renderer's output for the placeholder arguments
(a test keeps the two identical).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATE = r"""#!/usr/bin/env bash
{sbatch_lines}
# Written by `kdscale launch slurm`. Starts Ray on every node of the job, runs `kdscale train` on the first node,
# and tears Ray down on exit, failure or cancellation (only the Ray processes this job started).
set -euo pipefail

KDSCALE_PYTHON="${{KDSCALE_PYTHON:-{python}}}"
KDSCALE_CONFIG="${{KDSCALE_CONFIG:-{config}}}"
KDSCALE_OVERRIDES=({overrides} "$@")  # arguments after the file name in `sbatch FILE key=value ...` append
RAY_CPUS_PER_NODE="${{RAY_CPUS_PER_NODE:-{cpus_per_node}}}"
RAY_GPUS_PER_NODE="${{RAY_GPUS_PER_NODE:-{gpus_per_node}}}"  # the job's GPUs per node
JOIN_TIMEOUT_S="${{JOIN_TIMEOUT_S:-{join_timeout_s}}}"
cd {workdir}

job="${{SLURM_JOB_ID:?run this file with sbatch}}"
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
num_nodes=${{#nodes[@]}}
head_node=${{nodes[0]}}
port=$((20000 + job % 20000))
ray_tmp="/tmp/kdray-$job"
ray_steps=()

cleanup() {{
  local status=$?
  trap - EXIT TERM INT
  echo "kdscale-slurm: stopping the Ray steps of job $job" >&2
  for pid in "${{ray_steps[@]}}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${{ray_steps[@]}}"; do wait "$pid" 2>/dev/null || true; done
  for node in "${{nodes[@]}}"; do
    srun --overlap --nodes=1 --ntasks=1 -w "$node" rm -rf "$ray_tmp" 2>/dev/null || true
  done
  exit "$status"
}}
trap cleanup EXIT
trap 'exit 143' TERM INT

head_ip=$(srun --overlap --nodes=1 --ntasks=1 -w "$head_node" hostname -I | awk '{{print $1}}')
ray_args=(--num-cpus="$RAY_CPUS_PER_NODE" --num-gpus="$RAY_GPUS_PER_NODE" --temp-dir="$ray_tmp" --block
          --disable-usage-stats --include-dashboard=false)
echo "kdscale-slurm: job $job, $num_nodes node(s): ${{nodes[*]}}; Ray head $head_node ($head_ip:$port)" >&2
srun --overlap --nodes=1 --ntasks=1 -w "$head_node" \
  "$KDSCALE_PYTHON" -m ray.scripts.scripts start --head --node-ip-address="$head_ip" --port="$port" \
  "${{ray_args[@]}}" &
ray_steps+=($!)
for node in "${{nodes[@]:1}}"; do
  srun --overlap --nodes=1 --ntasks=1 -w "$node" \
    "$KDSCALE_PYTHON" -m ray.scripts.scripts start --address="$head_ip:$port" "${{ray_args[@]}}" &
  ray_steps+=($!)
done

"$KDSCALE_PYTHON" - "$head_ip:$port" "$num_nodes" "$JOIN_TIMEOUT_S" <<'PY'
import sys, time
address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
import ray
while True:
    try:
        ray.init(address=address, logging_level="ERROR")
        break
    except Exception as exc:  # the head is still starting
        if time.monotonic() > deadline:
            sys.exit(f"kdscale-slurm: no Ray head at {{address}} after {{timeout:.0f}}s: {{exc}}")
        time.sleep(2)
while (alive := sum(n["Alive"] for n in ray.nodes())) < want:
    if time.monotonic() > deadline:
        sys.exit(f"kdscale-slurm: only {{alive}} of {{want}} nodes joined Ray within {{timeout:.0f}}s")
    time.sleep(2)
print(f"kdscale-slurm: all {{want}} node(s) joined Ray", file=sys.stderr)
PY

RAY_ADDRESS="$head_ip:$port" "$KDSCALE_PYTHON" -m kdscale.cli train "$KDSCALE_CONFIG" \
  "ray.address=$head_ip:$port" "${{KDSCALE_OVERRIDES[@]}}"
"""


@dataclass
class SlurmJob:
    """What the sbatch file needs: the run and the job's shape."""

    config: str
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "kdscale"
    output: str = "kdscale-%j.log"
    python: str = sys.executable
    workdir: str = "."
    join_timeout_s: int = 300
    extra_sbatch: list[str] = field(default_factory=list)


def render_sbatch(job: SlurmJob) -> str:
    """The sbatch file of ``job`` (bash with #SBATCH headers)."""
    lines = [
        f"#SBATCH --job-name={job.job_name}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={job.output}",
    ]
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_node:
        lines.append(f"#SBATCH --cpus-per-task={job.cpus_per_node}")
    for key, value in (("partition", job.partition), ("time", job.time), ("account", job.account)):
        if value:
            lines.append(f"#SBATCH --{key}={value}")
    lines += [f"#SBATCH {option}" for option in job.extra_sbatch]
    return TEMPLATE.format(
        sbatch_lines="\n".join(lines),
        python=job.python,
        config=job.config,
        overrides=" ".join(shlex.quote(o) for o in job.overrides),
        cpus_per_node=job.cpus_per_node or "$(nproc)",
        gpus_per_node=job.gpus_per_node or "${SLURM_GPUS_ON_NODE:-0}",
        join_timeout_s=job.join_timeout_s,
        workdir=f'"{job.workdir}"' if job.workdir.startswith("$") else shlex.quote(job.workdir),
    )


def generic_job() -> SlurmJob:
    """The job of the repository's ``launch/slurm/kdscale.sbatch``: everything from the environment and ``sbatch``
    options (``KDSCALE_CONFIG``, ``KDSCALE_PYTHON``, ``--nodes``, ``--gpus-per-node``), overrides as arguments."""
    return SlurmJob(
        config="configs/quickstart.yaml", python="python", workdir="${SLURM_SUBMIT_DIR:-.}",
        gpus_per_node=0, output="kdscale-%j.log",
    )


def check_fits(job: SlurmJob) -> str:
    """Load the config with its overrides and plan its placement on ``nodes x gpus_per_node``; returns the plan
    as text, or raises a ValueError naming what does not fit."""
    from kdscale.config.load import load_config
    from kdscale.controller.placement import NodeInfo, plan_placement

    cfg = load_config(job.config, job.overrides)
    if cfg.ray.address is not None:
        raise ValueError("the config sets ray.address; the sbatch file starts its own Ray cluster and sets it: "
                         "remove ray.address")
    nodes = [NodeInfo(f"{i:056x}", f"node{i}", job.gpus_per_node) for i in range(job.nodes)]
    uses_gpus = cfg.student.device == "cuda" or cfg.teacher.device == "cuda" or (
        job.gpus_per_node > 0 and "auto" in (cfg.student.device, cfg.teacher.device))
    plan = plan_placement(
        nodes, num_teachers=cfg.teacher.num_replicas, teacher_gpus=cfg.teacher.gpus_per_replica if uses_gpus else 0,
        num_students=cfg.student.world_size, student_gpus=1 if uses_gpus else 0, mode=cfg.controller.placement,
    )
    return plan.describe(nodes)


def main(argv: list[str] | None = None) -> int:
    """``kdscale launch slurm CONFIG [overrides] --nodes N [--gpus-per-node G] ... [--submit]``."""
    parser = argparse.ArgumentParser(prog="kdscale launch slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--cpus-per-node", type=int, help="CPUs Ray may use per node (default: all of the node)")
    parser.add_argument("--partition")
    parser.add_argument("--time", help="Slurm time limit, e.g. 04:00:00")
    parser.add_argument("--account")
    parser.add_argument("--job-name", default="kdscale")
    parser.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                        help="an extra #SBATCH option, e.g. --qos=high (repeatable)")
    parser.add_argument("--python", default=sys.executable, help="python of the environment with kdscale on the nodes")
    parser.add_argument("--out", help="where to write the sbatch file (default: <run dir>/launch.sbatch)")
    parser.add_argument("--submit", action="store_true", help="submit it with sbatch")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
    from kdscale.config.load import load_config

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.run_dir) / "launch.sbatch"
    job = SlurmJob(
        config=str(Path(args.config).resolve()), overrides=args.overrides, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node, partition=args.partition,
        time=args.time, account=args.account, job_name=args.job_name,
        output=str((out.parent / f"{args.job_name}-%j.log").resolve()), python=args.python,
        workdir=str(Path.cwd()), extra_sbatch=args.sbatch_option,
    )
    print(check_fits(job), file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(render_sbatch(job))
    tmp.chmod(0o755)
    tmp.replace(out)
    print(f"wrote {out}", file=sys.stderr)
    if args.submit:
        try:
            proc = subprocess.run(["sbatch", "--parsable", str(out)], capture_output=True, text=True)
        except FileNotFoundError:
            raise ValueError(f"sbatch is not on PATH: run this on a Slurm login node, or submit {out} yourself "
                             "(drop --submit)") from None
        if proc.returncode != 0:
            raise ValueError(f"sbatch refused {out}: {proc.stderr.strip() or proc.stdout.strip()}")
        print(proc.stdout.strip())
    return 0
