"""Does prefetching overlap teacher and student work? The quickstart, shortened, with and without prefetch.

Runs ``kdscale train`` (fresh run directories, no held-out evaluation, export or plot) once per
``controller.prefetch_steps`` value and prints, per run, the mean per-step teacher compute, student compute, teacher
wait and step time (first step skipped as warm-up), and the overlap ratio sum(teacher + student) / sum(step): above 1
means the step took less than teacher time + student time, i.e. the two overlapped.

    python benchmarks/bench_overlap.py [--steps 12] [--prefetch 0 2] [--config configs/quickstart.yaml]
                                       [--override key=value ...]

On a machine where teacher and student share few cores, overlap trades one stage's speed for the other's: pass
``--override teacher.num_threads=1 --override student.num_threads_per_rank=1`` to give each its own core.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(config: str, steps: int, prefetch: int, overrides: list[str], workdir: Path) -> tuple[dict, float]:
    """Train once; returns the report summary of the run and its wall time."""
    from kdscale.observability.report import read_records, summarize

    run_dir = workdir / f"prefetch{prefetch}"
    args = [
        sys.executable, "-m", "kdscale.cli", "train", config,
        f"run.name=bench-overlap-p{prefetch}", f"run.output_dir={run_dir}", f"run.max_steps={steps}",
        "run.save_every=0", "run.eval_every=0", "data.eval_path=null", "run.export_hf=false", "run.plot=false",
        "run.progress_bar=false", "run.resume=never", f"controller.prefetch_steps={prefetch}", *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"kdscale train failed (prefetch {prefetch}):\n{proc.stderr[-4000:]}")
    return summarize(read_records(run_dir / "metrics.jsonl"), skip_first=1), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prefetch", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--override", action="append", default=[], metavar="key=value")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdscale-bench-overlap-") as tmp:
        for prefetch in args.prefetch:
            summary, wall = run_one(args.config, args.steps, prefetch, args.override, Path(tmp))
            rows.append((prefetch, summary, wall))
            print(f"prefetch {prefetch}: done in {wall:.0f}s", file=sys.stderr)
    print(f"{args.config}, {args.steps} steps (first skipped), overrides: {' '.join(args.override) or 'none'}")
    header = ("prefetch", "teacher s/step", "student s/step", "wait s/step", "step s/step", "(teacher+student)/step",
              "tok/s")
    print(" | ".join(header))
    for prefetch, summary, _ in rows:
        stages = summary["stages"]
        mean = {name: stages[name]["mean_s"] for name in ("teacher_compute", "student", "teacher_wait", "step")}
        print(" | ".join([
            f"{prefetch:>8}", f"{mean['teacher_compute']:>14.2f}", f"{mean['student']:>14.2f}",
            f"{mean['teacher_wait']:>11.2f}", f"{mean['step']:>11.2f}", f"{summary['overlap_ratio']:>22.2f}",
            f"{stages['step']['tokens_per_s']:>5.0f}",
        ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
