"""The Ray driver loop of off-policy distillation. Reads top to bottom; every synchronization is a visible ray.get.

Per step: lay the global batch out per student data-parallel rank, send each micro-batch's token ids to a teacher
replica, route the returned object refs to the ranks that consume that shard, train, log, checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from kdscale.checkpoint import run_checkpoints
from kdscale.config.load import ConfigError, dump_config
from kdscale.config.schema import KDConfig
from kdscale.controller.cluster import ray_cluster
from kdscale.controller.preflight import preflight
from kdscale.controller.prepare import PreparedModels, prepare_models
from kdscale.data.batch import StepLayout
from kdscale.observability.logging import get_logger
from kdscale.observability.metrics import MetricsWriter, read_metrics
from kdscale.observability.plot import plot_loss_curve


@dataclass
class RunSummary:
    """What a finished run reports (also written to <run>/summary.json)."""

    run_dir: str
    steps: int
    eval_kl_before: float | None
    eval_kl_after: float | None
    train_tokens_per_s: float
    wall_s: float
    hf_export: str | None


def train(cfg: KDConfig) -> RunSummary:
    """Run (or resume) the distillation described by ``cfg``."""
    log = get_logger()
    started = time.perf_counter()
    problems = preflight(cfg)
    if problems:
        raise ConfigError("(cross-checks)", problems)
    run_dir = Path(cfg.run_dir)
    resume_from = _resume_point(cfg, run_dir)
    if resume_from is not None:
        _check_resumable(cfg, run_checkpoints.read_state(resume_from), resume_from)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(run_dir / "config.yaml", dump_config(cfg))

    models = prepare_models(cfg)
    train_samples, eval_samples = _load_datasets(cfg, models)
    from kdscale.data import StepSampler, build_step_layout

    sampler = StepSampler(
        num_samples=len(train_samples), global_batch_size=cfg.data.global_batch_size, seed=cfg.run.seed,
        shuffle=cfg.data.shuffle,
    )
    total_steps = cfg.run.max_steps or sampler.steps_per_epoch * cfg.run.num_epochs
    dp_size = cfg.student.dp_size

    def layout(samples: list, step: int, epoch: int) -> StepLayout:
        return build_step_layout(
            samples, dp_size=dp_size, max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch,
            pad_token_id=_pad_id(models.tokenizer), step=step, epoch=epoch,
        )

    with ray_cluster(cfg, run_dir):
        teachers = _start_teachers(cfg, models)
        students = _start_students(cfg, models, total_steps)
        start_step = 0
        if resume_from is not None:
            state = run_checkpoints.read_state(resume_from)
            ray.get([s.load.remote(str(resume_from)) for _, _, s in students], timeout=cfg.ray.timeout_s)
            sampler.load_state_dict(state["sampler"])
            start_step = state["step"]
            log.info(f"resumed from {resume_from} at step {start_step}")

        metrics = MetricsWriter(run_dir, total_steps=total_steps, log_every=cfg.run.log_every,
                                progress_bar=cfg.run.progress_bar, start_step=start_step)
        metrics.truncate_after(start_step)
        eval_layout = layout(eval_samples, 0, 0) if eval_samples else None
        eval_refs = _teacher_refs(teachers, eval_layout, cfg.ray.timeout_s) if eval_layout else None
        if eval_layout and start_step == 0:
            _evaluate(students, eval_layout, eval_refs, 0, metrics, cfg)

        last_saved = start_step
        for step in range(start_step + 1, total_steps + 1):
            step_start = time.perf_counter()
            epoch, samples = sampler.next_step()
            step_layout = layout([train_samples[i] for i in samples], step, epoch)
            teacher_refs = _teacher_refs(teachers, step_layout, cfg.ray.timeout_s)
            teacher_wait_s = time.perf_counter() - step_start
            results = ray.get(
                [
                    student.train_step.remote(step_layout.shards[dp], teacher_refs[dp] if consumes else [],
                                              step_layout.global_num_loss_tokens)
                    for dp, consumes, student in students
                ],
                timeout=cfg.ray.timeout_s,
            )
            del teacher_refs  # the step consumed them: release the object-store memory
            metrics.step(step, _step_metrics(results, step_layout, teacher_wait_s, time.perf_counter() - step_start, epoch))
            if eval_layout and cfg.run.eval_every and step % cfg.run.eval_every == 0 and step != total_steps:
                _evaluate(students, eval_layout, eval_refs, step, metrics, cfg)
            if cfg.run.save_every and step % cfg.run.save_every == 0:
                _save(cfg, run_dir, students, step, sampler)
                last_saved = step

        if last_saved != total_steps:
            _save(cfg, run_dir, students, total_steps, sampler)
        if eval_layout:
            _evaluate(students, eval_layout, eval_refs, total_steps, metrics, cfg)
        hf_dir = None
        if cfg.run.export_hf:
            hf_dir = run_dir / "hf_student"
            ray.get([s.export_hf.remote(str(hf_dir)) for _, _, s in students], timeout=cfg.ray.timeout_s)
            metrics.info(f"student exported as a Hugging Face model: {hf_dir}")
        metrics.close()
        ray.get([s.shutdown.remote() for _, _, s in students], timeout=cfg.ray.timeout_s)
        ray.get([t.shutdown.remote() for t in teachers], timeout=cfg.ray.timeout_s)

    summary = _summarize(cfg, run_dir, total_steps, hf_dir, time.perf_counter() - started)
    log.info(_summary_line(summary))
    return summary


def _resume_point(cfg: KDConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, per run.resume; refuses to mix runs silently."""
    if cfg.run.resume not in ("auto", "never"):
        return Path(cfg.run.resume)
    latest = run_checkpoints.latest_checkpoint(run_dir)
    if latest is not None and cfg.run.resume == "never":
        raise ConfigError(
            "(run directory)",
            [f"run.resume=never but {run_dir} already holds checkpoints ({latest.name}): choose another "
             "run.name / run.output_dir, delete the directory, or set run.resume=auto to continue it"],
        )
    return latest


def _check_resumable(cfg: KDConfig, state: dict, checkpoint: Path) -> None:
    """A checkpoint resumes only into the student backend that wrote it (their shard formats differ)."""
    written_by = state.get("student_backend")
    if written_by is not None and written_by != cfg.student.backend:
        raise ConfigError(
            "(resume)",
            [f"{checkpoint} was written by the {written_by!r} student backend but this run uses "
             f"{cfg.student.backend!r}: use another run.name (or run.output_dir) for a fresh run, or "
             f"student.backend={written_by} to continue it"],
        )


def _load_datasets(cfg: KDConfig, models: PreparedModels) -> tuple[list, list]:
    """Read and tokenize the train and eval files once, here in the driver; report rejected rows."""
    from kdscale.data import read_jsonl, tokenize_rows

    log = get_logger("kdscale.data")
    out = []
    for path in (cfg.data.train_path, cfg.data.eval_path):
        if path is None:
            out.append([])
            continue
        rows, stats = read_jsonl(path, max_bad_fraction=cfg.data.max_bad_fraction)
        samples, stats = tokenize_rows(
            rows, models.tokenizer, max_seq_len=cfg.data.max_seq_len, truncation=cfg.data.truncation, stats=stats
        )
        log.info(stats.summary())
        if path == cfg.data.eval_path and cfg.data.max_eval_samples:
            samples = samples[: cfg.data.max_eval_samples]
        out.append(samples)
    if len(out[0]) < cfg.data.global_batch_size:
        raise ConfigError(
            "(data)",
            [f"data.train_path has {len(out[0])} usable rows, fewer than data.global_batch_size "
             f"{cfg.data.global_batch_size}: add data or lower the batch size"],
        )
    return out[0], out[1]


def _start_teachers(cfg: KDConfig, models: PreparedModels) -> list:
    from kdscale.controller.actors import TeacherReplica

    t = cfg.teacher
    kwargs = {
        "model_path": str(models.teacher_dir),
        "dtype": t.dtype,
        "transport_dtype": cfg.transport.dtype,
        "attn_implementation": t.attn_implementation,
        "max_tokens_per_forward": t.max_tokens_per_forward,
    }
    device = _device(t.device)
    kwargs["device"] = device
    threads = t.num_threads or os.cpu_count()
    options = {"num_gpus": 1} if device == "cuda" else {}
    teachers = [TeacherReplica.options(**options).remote(t.engine, kwargs, threads) for _ in range(t.num_replicas)]
    ray.get([r.start.remote() for r in teachers], timeout=cfg.ray.timeout_s)
    get_logger().info(f"{len(teachers)} teacher replica(s) ready ({t.engine}: {models.teacher_dir})")
    return teachers


def _start_students(cfg: KDConfig, models: PreparedModels, total_steps: int) -> list:
    from kdscale.controller.actors import StudentRank

    s = cfg.student
    device = _device(s.device)
    world = s.world_size
    threads = s.num_threads_per_rank or max(1, (os.cpu_count() or 1) // world)
    options = {"num_gpus": 1} if device == "cuda" else {}
    ranks = [StudentRank.options(**options).remote(r, world, threads, device) for r in range(world)]
    master_addr, master_port = ray.get(ranks[0].address.remote(), timeout=cfg.ray.timeout_s)
    kwargs = _student_backend_kwargs(cfg, models, total_steps)
    infos = ray.get(
        [
            r.setup.remote(
                master_addr=master_addr, master_port=master_port, backend=s.backend, backend_kwargs=kwargs,
                teacher_model_dir=str(models.teacher_dir),
                timeout_s=cfg.ray.timeout_s,
            )
            for r in ranks
        ],
        timeout=cfg.ray.timeout_s,
    )
    get_logger().info(f"{len(ranks)} student rank(s) ready ({s.backend} on {device}; teacher outputs of each DP "
                      f"shard go to ranks {infos[0]['layout']})")
    return [(info["dp_rank"], info["consumes_teacher_outputs"], rank) for rank, info in zip(ranks, infos)]


def _student_backend_kwargs(cfg: KDConfig, models: PreparedModels, total_steps: int) -> dict[str, Any]:
    s, o = cfg.student, cfg.optim
    kwargs = {
        "model_path": str(models.student_dir),
        "vocab_size": models.vocab_size,
        "loss": cfg.loss.model_dump(),
        "lr": o.lr,
        "weight_decay": o.weight_decay,
        "betas": tuple(o.betas),
        "eps": o.eps,
        "grad_clip": o.grad_clip,
        "warmup_steps": o.warmup_steps,
        "total_steps": total_steps,
        "min_lr_ratio": o.min_lr_ratio,
        "mixed_precision": s.mixed_precision,
        "seed": cfg.run.seed,
        "teacher_head_dtype": s.teacher_head_dtype,
    }
    if s.backend == "fsdp2":
        kwargs.update(activation_checkpointing=s.activation_checkpointing, attn_implementation=s.attn_implementation)
    else:
        kwargs.update(
            tensor_parallel_size=s.tensor_parallel_size,
            pipeline_parallel_size=s.pipeline_parallel_size,
            virtual_pipeline_parallel_size=s.virtual_pipeline_parallel_size,
            use_distributed_optimizer=s.use_distributed_optimizer,
            recompute_activations=s.recompute_activations,
            make_vocab_size_divisible_by=s.make_vocab_size_divisible_by,
        )
    return kwargs


def _teacher_refs(teachers: list, layout: StepLayout, timeout_s: float) -> list[list]:
    """Send every micro-batch of every DP shard to a teacher replica (round-robin); wait until all are done;
    return, per shard, the refs of the hidden states in the object store (the data itself stays there)."""
    calls, n = [], 0
    for shard in layout.shards:
        shard_calls = []
        for micro_batch in shard:
            shard_calls.append(teachers[n % len(teachers)].forward.remote(micro_batch))
            n += 1
        calls.append(shard_calls)
    return [ray.get(shard_calls, timeout=timeout_s) for shard_calls in calls]


def _step_metrics(results: list[dict], layout: StepLayout, teacher_wait_s: float, step_s: float, epoch: int) -> dict:
    first = results[0]  # loss, kd, ce, grad norm, lr are global (all-reduced) and equal on every rank
    return {
        "epoch": epoch,
        "train/loss": first["loss"],
        "train/kd": first["kd"],
        "train/ce": first["ce"],
        "train/lr": first["lr"],
        "train/grad_norm": first["grad_norm"],
        "train/num_loss_tokens": layout.global_num_loss_tokens,
        "train/num_tokens": first["num_tokens"],
        "time/teacher_wait_s": teacher_wait_s,
        "time/student_s": max(r["student_s"] for r in results),
        "time/transfer_s": max(r["transfer_s"] for r in results),
        "time/step_s": step_s,
        "transfer/bytes": sum(r["transfer_bytes"] for r in results),
        "throughput/tokens_per_s": first["num_tokens"] / step_s,
    }


def _evaluate(students: list, layout: StepLayout, refs: list[list], step: int, metrics: MetricsWriter,
              cfg: KDConfig) -> float:
    results = ray.get(
        [s.evaluate.remote(layout.shards[dp], refs[dp] if consumes else [], layout.global_num_loss_tokens)
         for dp, consumes, s in students],
        timeout=cfg.ray.timeout_s,
    )
    kl = float(results[0]["kl"])
    metrics.write({"step": step, "eval/kl": kl, "eval/loss": float(results[0]["loss"]),
                   "eval/num_loss_tokens": layout.global_num_loss_tokens})
    metrics.info(f"eval @ step {step}: held-out KL(teacher||student) = {kl:.4f} nats/token "
                 f"over {layout.global_num_loss_tokens} tokens")
    return kl


def _save(cfg: KDConfig, run_dir: Path, students: list, step: int, sampler) -> None:
    tmp = run_checkpoints.begin(run_dir, step)
    ray.get([s.save.remote(str(tmp)) for _, _, s in students], timeout=cfg.ray.timeout_s)
    state = {"sampler": sampler.state_dict(), "student_backend": cfg.student.backend}
    final = run_checkpoints.commit(run_dir, tmp, step, state, keep=cfg.run.keep_checkpoints)
    get_logger().info(f"checkpoint saved: {final}")


def _summarize(cfg: KDConfig, run_dir: Path, steps: int, hf_dir: Path | None, wall_s: float) -> RunSummary:
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval/kl" in r]
    train_rows = [r for r in records if "train/loss" in r]
    tokens = sum(r["train/num_tokens"] for r in train_rows)
    seconds = sum(r["time/step_s"] for r in train_rows)
    if cfg.run.plot and records:
        plot_loss_curve(records, run_dir / "loss_curve.png", title=f"kdscale: {cfg.run.name}")
    summary = RunSummary(
        run_dir=str(run_dir),
        steps=steps,
        eval_kl_before=evals[0]["eval/kl"] if evals and evals[0]["step"] == 0 else None,
        eval_kl_after=evals[-1]["eval/kl"] if evals else None,
        train_tokens_per_s=tokens / seconds if seconds else 0.0,
        wall_s=wall_s,
        hf_export=str(hf_dir) if hf_dir else None,
    )
    _write_atomically(run_dir / "summary.json", json.dumps(summary.__dict__, indent=2))
    return summary


def _summary_line(s: RunSummary) -> str:
    kl = ""
    if s.eval_kl_before is not None and s.eval_kl_after is not None:
        kl = f" | held-out KL(teacher||student): {s.eval_kl_before:.4f} -> {s.eval_kl_after:.4f} nats/token"
    return f"done: {s.steps} steps in {s.wall_s:.0f}s{kl} | {s.train_tokens_per_s:.0f} train tok/s | run dir {s.run_dir}"


def _device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
