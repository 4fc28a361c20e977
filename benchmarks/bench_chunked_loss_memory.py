"""Peak memory and wall time of the chunked hidden-state loss vs the naive full-logit loss, forward + backward.

Each variant runs in a fresh subprocess, so one variant's allocations and allocator caches cannot hide in the
other's numbers. In the subprocess the inputs are allocated first (student/teacher hidden states and heads),
one small warm-up step initializes thread pools and kernels, then the peak is reset and one forward + backward
is measured:

- CPU: peak resident set size above the resident size just before the step. The kernel's high-water mark
  (VmHWM) is reset by writing 5 to /proc/self/clear_refs; where that is not allowed, the lifetime peak
  (ru_maxrss) is used instead, which can only over-state the step's peak.
- CUDA: ``torch.cuda.max_memory_allocated`` above ``memory_allocated`` just before the step.

Both variants produce the same loss and the same gradients (checked on small shapes by tests/unit/test_losses.py);
both peaks include the parameter gradients (``.grad`` of the student head, [V, H]) that any loss produces.

Run: python benchmarks/bench_chunked_loss_memory.py [--tokens 4096 --vocab 49152 --hidden 576 --chunk-size 1024]
Exits 1 when chunked peak > 0.25 x naive peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MAX_RATIO = 0.25
VOCAB_PADDING = 128  # the heads carry padding rows past the real vocabulary, as real checkpoints do


def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(args: argparse.Namespace) -> dict:
    """One variant, one process: returns peak bytes above the pre-step baseline and the step's wall time."""
    import torch

    from kdscale.losses import chunked_distill_loss, naive_distill_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    n, v, h = args.tokens, args.vocab, args.hidden
    student_hidden = torch.randn(n, h, device=device).requires_grad_()
    student_head = torch.nn.Parameter(0.05 * torch.randn(v + VOCAB_PADDING, h, device=device))
    teacher_hidden = torch.randn(n, h, device=device)
    teacher_head = 0.05 * torch.randn(v + 2 * VOCAB_PADDING, h, device=device)
    labels = torch.randint(0, v, (n,), device=device)
    kwargs = dict(vocab_size=v, divergence=args.divergence, temperature=args.temperature, kd_ratio=args.kd_ratio)

    def step(rows: int) -> float:
        if args.variant == "chunked":
            out = chunked_distill_loss(
                student_hidden[:rows], student_head, teacher_hidden[:rows], teacher_head, labels[:rows],
                chunk_size=args.chunk_size, **kwargs,
            )  # fmt: skip
        else:
            student_logits = student_hidden[:rows] @ student_head.T
            with torch.no_grad():
                teacher_logits = teacher_hidden[:rows] @ teacher_head.T
            out = naive_distill_loss(student_logits, teacher_logits, labels[:rows], **kwargs)
            del student_logits, teacher_logits
        out.loss.backward()
        return float(out.loss.detach())

    step(min(n, 64))  # warm-up: thread pools, kernel caches, and the .grad buffers both variants keep
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        exact = _reset_cpu_peak()
        baseline = _rss_bytes("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loss = step(n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak, method = torch.cuda.max_memory_allocated() - baseline, "cuda max_memory_allocated"
    elif exact:
        peak, method = _rss_bytes("VmHWM") - baseline, "VmHWM (reset) - VmRSS"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline, "ru_maxrss delta"
    return {"variant": args.variant, "peak_bytes": peak, "seconds": seconds, "loss": loss, "method": method}


def _run_variant(variant: str, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--variant", variant]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"the {variant} variant failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda also reports max_memory_allocated)")
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--kd-ratio", type=float, default=0.9)
    parser.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_worker(args)))
        return 0

    argv = sys.argv[1:]
    results = {variant: _run_variant(variant, argv) for variant in ("naive", "chunked")}
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(
        f"N={args.tokens} tokens, V={args.vocab} (+padding), H={args.hidden}, fp32, chunk_size={args.chunk_size}, "
        f"divergence={args.divergence}, device={args.device}; one [N, V] fp32 tensor = {logits_mib:.0f} MiB; "
        f"peak measured as {results['naive']['method']}"
    )
    print(f"{'variant':<10}{'peak MiB':>12}{'time s':>10}{'loss':>14}")
    for r in results.values():
        print(f"{r['variant']:<10}{r['peak_bytes'] / 2**20:>12.0f}{r['seconds']:>10.2f}{r['loss']:>14.6f}")
    ratio = results["chunked"]["peak_bytes"] / results["naive"]["peak_bytes"]
    print(f"chunked peak / naive peak = {ratio:.3f}")
    if abs(results["chunked"]["loss"] - results["naive"]["loss"]) > 1e-4 * max(1.0, abs(results["naive"]["loss"])):
        print("FAIL: the two variants disagree on the loss")
        return 1
    if ratio > MAX_RATIO:
        print(f"FAIL: chunked peak is more than {MAX_RATIO} x the naive peak")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
