"""GPU benchmark for a lent GPU machine (no Ray there): the FSDP2 student step's tokens/s and MFU on a ~1B
random-initialized Llama, and the chunked loss's memory and speed against the naive full-logit loss.

Part 1 drives kdscale's FSDP2 StudentBackend directly, in this process, as a process group of world size 1 (NCCL on
a GPU, gloo on a CPU): a random Llama (hidden 2048, 18 layers, 16 heads / 8 KV heads, MLP 5632, vocabulary 49152,
untied head: ~1.05B parameters) is written to a temporary directory and loaded by the backend, which trains it with
bf16 mixed precision (fp32 master weights, AdamW), SDPA attention and the chunked loss against a random teacher
head. Each step runs ``--num-micro-batches`` micro-batches of ``--micro-batch-size`` x ``--seq-len`` tokens, every
position a loss position, with random bf16 teacher hidden states on the CPU (as the object store hands them over).
``--warmup-steps`` untimed steps, then ``--steps`` timed ones between ``torch.cuda.synchronize`` calls.

MFU = achieved model FLOPs/s / peak dense bf16 FLOPs/s, with model FLOPs per step (torchtitan / PaLM convention:
no causal discount on attention, no recomputation counted):

    tokens      x (6 x N_layers + 12 x L x H x S)        decoder matmuls fwd+bwd, attention scores and values
  + loss_tokens x (6 x V x H + 2 x V x H_teacher)        student head fwd+bwd, teacher head fwd (no gradient)

N_layers = parameters of the decoder layers (the embedding lookup is free; the head counts per loss token, as the
chunked loss applies it only at the prediction rows). The chunked loss also recomputes both logits in backward
(2 more head matmuls per loss token); those are hardware FLOPs, not model FLOPs, and are not counted. The peak is
taken from the device name (H100/H200 SXM 989 TFLOPs, A100 312, ...); ``--peak-tflops`` overrides it.

Part 2 runs benchmarks/bench_chunked_loss_memory.py's two variants (each in a fresh process): one forward+backward
of the chunked loss and of the naive loss at N=8192 tokens, V=151936, H=2048, reporting peak memory above the
inputs and wall time.

Run: python benchmarks/bench_gpu.py [--json out.json]   (about 1-2 minutes on an H100/H200)
     python benchmarks/bench_gpu.py --smoke              (tiny model and loss, CPU allowed; under a minute)
Exits 1 when the chunked and naive losses disagree, or the student loss is not finite.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_chunked_loss_memory, from any working directory
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # kdscale, without installing it

import bench_chunked_loss_memory as loss_bench  # noqa: E402

# Peak dense bf16 tensor-core TFLOPs by device-name substring, most specific first.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)

MODEL_1B = dict(hidden_size=2048, num_layers=18, num_heads=16, num_kv_heads=8, intermediate_size=5632, vocab=49152)
MODEL_SMOKE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab=512)


def peak_tflops_for(device_name: str) -> float | None:
    """Peak dense bf16 TFLOPs of a GPU by its name, or None when the name is not in :data:`PEAK_BF16_TFLOPS`."""
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment.lower() in device_name.lower():
            return tflops
    return None


def model_flops_per_step(
    *,
    layer_params: int,
    num_layers: int,
    hidden_size: int,
    seq_len: int,
    vocab: int,
    teacher_hidden_size: int,
    num_tokens: int,
    num_loss_tokens: int,
) -> float:
    """Model FLOPs of one training step (see the module docstring for the formula)."""
    per_token = 6 * layer_params + 12 * num_layers * hidden_size * seq_len
    per_loss_token = 6 * vocab * hidden_size + 2 * vocab * teacher_hidden_size
    return float(num_tokens * per_token + num_loss_tokens * per_loss_token)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_random_llama(path: Path, spec: dict, *, seq_len: int, device) -> dict[str, int]:
    """Save a random-initialized LlamaForCausalLM (bf16 safetensors) to ``path``; returns its parameter counts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        max_position_embeddings=max(seq_len, 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initializing 1B parameters is seconds on a GPU, tens of seconds on a CPU
        model = LlamaForCausalLM(config)
    counts = {
        "total": sum(p.numel() for p in model.parameters()),
        "layers": sum(p.numel() for p in model.model.layers.parameters()),
        "embedding": model.model.embed_tokens.weight.numel(),
        "head": model.lm_head.weight.numel(),
    }
    model.to(torch.bfloat16).save_pretrained(path)
    del model
    return counts


def _synthetic_step(args: argparse.Namespace, *, vocab: int, teacher_hidden_size: int, generator) -> tuple:
    """One step's micro-batches (random tokens, every position a loss position) and their random bf16 teacher
    hidden states on the CPU, as the object store hands them to a student rank."""
    import torch

    from kdscale.data.batch import MicroBatch

    shape = (args.micro_batch_size, args.seq_len)
    micro_batches, teacher_hidden = [], []
    for _ in range(args.num_micro_batches):
        input_ids = torch.randint(0, vocab, shape, generator=generator)
        micro_batch = MicroBatch(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            loss_mask=torch.ones(shape, dtype=torch.bool),
        )
        micro_batches.append(micro_batch)
        hidden = torch.randn(micro_batch.num_loss_tokens, teacher_hidden_size, generator=generator)
        teacher_hidden.append(hidden.bfloat16())
    return micro_batches, teacher_hidden


def _time_train_steps(backend, micro_batches: list, teacher_hidden: list, *, warmup: int, steps: int) -> dict:
    """Run ``warmup`` then ``steps`` timed train steps; returns losses, seconds per step and peak memory."""
    import torch

    cuda = backend.device.type == "cuda"
    num_loss_tokens = sum(mb.num_loss_tokens for mb in micro_batches)
    for _ in range(warmup):
        backend.train_step(micro_batches, teacher_hidden, global_num_loss_tokens=num_loss_tokens)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, started = [], time.perf_counter()
    for _ in range(steps):
        losses.append(backend.train_step(micro_batches, teacher_hidden, global_num_loss_tokens=num_loss_tokens).loss)
    if cuda:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - started) / steps
    if cuda:
        peak, method = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated (timed steps)"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (whole process)"
    return {"losses": losses, "step_s": step_s, "peak_memory_gib": peak / 2**30, "memory_method": method}


def _student_benchmark(args: argparse.Namespace, spec: dict, device: str) -> dict:
    """Part 1: FSDP2 train steps of a random Llama in a process group of world size 1; returns the figures."""
    import torch
    import torch.distributed as dist

    from kdscale.student import build_student_backend

    if device == "cuda":
        torch.cuda.set_device(0)
    backend_name = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend_name, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    vocab, hidden = spec["vocab"], spec["hidden_size"]
    generator = torch.Generator().manual_seed(1)
    try:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="kdscale-bench-") as model_dir:
            counts = _write_random_llama(Path(model_dir), spec, seq_len=args.seq_len, device=device)
            backend = build_student_backend(
                "fsdp2",
                model_path=model_dir,
                teacher_head=0.02 * torch.randn(vocab, hidden, generator=generator),
                vocab_size=vocab,
                loss={"divergence": "forward_kl", "kd_ratio": 0.9, "chunk_size": args.chunk_size},
                lr=1e-4,
                total_steps=args.warmup_steps + args.steps,
                mixed_precision=args.mixed_precision,
                teacher_head_dtype="bfloat16",
                device=device,
                attn_implementation=args.attn,
            )
            backend.setup()  # loads the model: the directory is not needed afterwards
        setup_s = time.perf_counter() - started
        micro_batches, teacher_hidden = _synthetic_step(
            args, vocab=vocab, teacher_hidden_size=hidden, generator=generator
        )
        timing = _time_train_steps(backend, micro_batches, teacher_hidden, warmup=args.warmup_steps, steps=args.steps)
        del backend
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    num_tokens = sum(mb.num_tokens for mb in micro_batches)
    num_loss_tokens = sum(mb.num_loss_tokens for mb in micro_batches)
    flops = model_flops_per_step(
        layer_params=counts["layers"],
        num_layers=spec["num_layers"],
        hidden_size=hidden,
        seq_len=args.seq_len,
        vocab=vocab,
        teacher_hidden_size=hidden,
        num_tokens=num_tokens,
        num_loss_tokens=num_loss_tokens,
    )
    return {
        "params": counts,
        "tokens_per_step": num_tokens,
        "loss_tokens_per_step": num_loss_tokens,
        "setup_s": setup_s,
        "tokens_per_s": num_tokens / timing["step_s"],
        "model_flops_per_step": flops,
        "achieved_tflops": flops / timing["step_s"] / 1e12,
        **timing,
    }


def _loss_benchmark(args: argparse.Namespace, device: str) -> dict:
    """Part 2: bench_chunked_loss_memory.py's naive and chunked variants, each in a fresh process."""
    argv = [
        "--tokens",
        str(args.loss_tokens),
        "--vocab",
        str(args.loss_vocab),
        "--hidden",
        str(args.loss_hidden),
        "--chunk-size",
        str(args.chunk_size),
        "--device",
        device,
    ]
    results = {variant: loss_bench._run_variant(variant, argv) for variant in ("naive", "chunked")}
    naive, chunked = results["naive"], results["chunked"]
    return {
        "tokens": args.loss_tokens,
        "vocab": args.loss_vocab,
        "hidden": args.loss_hidden,
        "chunk_size": args.chunk_size,
        "method": naive["method"],
        "naive_peak_mib": naive["peak_bytes"] / 2**20,
        "chunked_peak_mib": chunked["peak_bytes"] / 2**20,
        "naive_s": naive["seconds"],
        "chunked_s": chunked["seconds"],
        "peak_ratio": chunked["peak_bytes"] / naive["peak_bytes"] if naive["peak_bytes"] > 0 else None,
        "time_ratio": chunked["seconds"] / naive["seconds"],
        "losses_agree": abs(chunked["loss"] - naive["loss"]) <= 1e-4 * max(1.0, abs(naive["loss"])),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and loss, few steps (CPU allowed)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOPs of the device (default: by name)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--steps", type=int, help="timed steps (default 10; smoke 3)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (default 3; smoke 1)")
    parser.add_argument("--seq-len", type=int, help="tokens per sample (default 2048; smoke 64)")
    parser.add_argument("--micro-batch-size", type=int, help="samples per micro-batch (default 4; smoke 2)")
    parser.add_argument("--num-micro-batches", type=int, default=2, help="micro-batches per step (default 2)")
    parser.add_argument("--mixed-precision", default="bf16", choices=["bf16", "none"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="student attention implementation")
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of the chunked loss")
    parser.add_argument("--loss-tokens", type=int, help="part 2: N (default 8192; smoke 2048)")
    parser.add_argument("--loss-vocab", type=int, help="part 2: V (default 151936; smoke 8192)")
    parser.add_argument("--loss-hidden", type=int, help="part 2: H (default 2048; smoke 64)")
    parser.add_argument("--skip-student", action="store_true", help="run part 2 only")
    parser.add_argument("--skip-loss", action="store_true", help="run part 1 only")
    return parser


def _fill_defaults(args: argparse.Namespace) -> None:
    full = dict(
        steps=10,
        warmup_steps=3,
        seq_len=2048,
        micro_batch_size=4,
        loss_tokens=8192,
        loss_vocab=151936,
        loss_hidden=2048,
    )
    smoke = dict(
        steps=3, warmup_steps=1, seq_len=64, micro_batch_size=2, loss_tokens=2048, loss_vocab=8192, loss_hidden=64
    )
    for name, value in (smoke if args.smoke else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 1 or args.warmup_steps < 0:
        raise SystemExit(f"--steps must be >= 1 and --warmup-steps >= 0, got {args.steps} and {args.warmup_steps}")


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def _table(results: dict) -> str:
    rows = []
    student = results.get("student")
    if student:
        mfu, params = student["mfu"], student["params"]
        rows += [
            ("student parameters (total / decoder layers)", f"{_count(params['total'])} / {_count(params['layers'])}"),
            ("student tokens per step", f"{student['tokens_per_step']:,}"),
            ("student step time (mean s)", f"{student['step_s']:.3f}"),
            ("student tokens/s", f"{student['tokens_per_s']:,.0f}"),
            ("achieved model TFLOPs/s", f"{student['achieved_tflops']:.4g}"),
            ("MFU", "n/a (pass --peak-tflops)" if mfu is None else f"{100 * mfu:.3g}%"),
            ("student peak memory (GiB)", f"{student['peak_memory_gib']:.2f}"),
        ]
    loss = results.get("loss")
    if loss:
        rows += [
            ("naive loss peak MiB / s", f"{loss['naive_peak_mib']:,.0f} / {loss['naive_s']:.3f}"),
            ("chunked loss peak MiB / s", f"{loss['chunked_peak_mib']:,.0f} / {loss['chunked_s']:.3f}"),
            ("chunked / naive: peak, time", f"{_fmt(loss['peak_ratio'], '.3f')}, {loss['time_ratio']:.2f}"),
            ("losses agree", "yes" if loss["losses_agree"] else "NO"),
        ]
    rows.append(("total wall time (s)", f"{results['wall_s']:.1f}"))
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(f"{name:<{width}}{value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _fill_defaults(args)
    started = time.perf_counter()
    import torch

    from kdscale.observability.logging import quiet_third_party

    quiet_third_party()

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops_for(device_name) if device == "cuda" else None)
    spec = MODEL_SMOKE if args.smoke else MODEL_1B
    results: dict = {"device": device_name, "torch": torch.__version__, "smoke": args.smoke, "peak_tflops": peak}
    print(
        f"kdscale GPU benchmark: {device_name}, torch {torch.__version__}, peak bf16 dense "
        f"{_fmt(peak, '.0f')} TFLOPs{' (smoke mode)' if args.smoke else ''}",
        flush=True,
    )
    if device == "cuda" and peak is None:
        print(f"warning: no peak TFLOPs known for {device_name!r}: MFU is n/a; pass --peak-tflops", flush=True)

    failed = False
    if not args.skip_student:
        print(
            f"part 1: FSDP2 student, random Llama (hidden {spec['hidden_size']}, {spec['num_layers']} layers, "
            f"{spec['num_heads']}/{spec['num_kv_heads']} heads, MLP {spec['intermediate_size']}, vocab "
            f"{spec['vocab']}), {args.mixed_precision} mixed precision, {args.attn} attention, "
            f"{args.num_micro_batches} micro-batches of {args.micro_batch_size} x {args.seq_len} tokens per step, "
            f"{args.warmup_steps} warm-up + {args.steps} timed steps",
            flush=True,
        )
        student = _student_benchmark(args, spec, device)
        student["mfu"] = student["achieved_tflops"] / peak if peak else None
        results["student"] = student
        print(
            f"  {_count(student['params']['total'])} parameters, set-up {student['setup_s']:.1f} s, "
            f"{student['step_s']:.3f} s/step, losses {[round(x, 4) for x in student['losses']]}",
            flush=True,
        )
        failed |= not all(math.isfinite(x) for x in student["losses"])
    if not args.skip_loss:
        print(
            f"part 2: chunked vs naive loss, forward + backward, N={args.loss_tokens} V={args.loss_vocab} "
            f"H={args.loss_hidden} fp32, chunk {args.chunk_size}",
            flush=True,
        )
        results["loss"] = _loss_benchmark(args, device)
        failed |= not results["loss"]["losses_agree"]
    results["wall_s"] = time.perf_counter() - started

    print(_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}")
    if failed:
        print("FAIL: a loss is not finite, or the chunked and naive losses disagree")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
