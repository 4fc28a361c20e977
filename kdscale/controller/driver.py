"""The Ray driver loop of off-policy distillation. Reads top to bottom; every synchronization is a visible wait.

Per step: lay the global batch out per student data-parallel rank, send each micro-batch's token ids to the teacher
pool, route the returned object refs to the ranks that consume that shard, train, log, checkpoint.

Overlap: off-policy teacher outputs do not depend on the student, so the teacher work of the next
``controller.prefetch_steps`` steps is submitted before the current step trains; the object store holds at most
that many steps (plus the held-out set), because each step's outputs are released once it has trained.
Fault tolerance: the pool re-sends the work of a dead teacher replica; a step whose refs a rank cannot read is not
trained by any rank and is retried. A dead student rank stops the run with the last good checkpoint named.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from kdscale.checkpoint import run_checkpoints
from kdscale.cli_errors import RunFailed
from kdscale.config.load import ConfigError, dump_config
from kdscale.config.schema import KDConfig
from kdscale.controller.cluster import ray_cluster
from kdscale.controller.placement import PlacementPlan, cluster_nodes, plan_placement
from kdscale.controller.preflight import preflight
from kdscale.controller.prepare import PreparedModels, prepare_models
from kdscale.controller.teacher_pool import TeacherPool, TeacherPoolError, TeacherWork
from kdscale.data.batch import StepLayout, kd_token_kwargs
from kdscale.observability.logging import get_logger
from kdscale.observability.metrics import MetricsWriter, read_metrics
from kdscale.observability.plot import plot_loss_curve
from kdscale.teacher import engine_kwargs, numerics_settings


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


@dataclass
class _Student:
    """A student rank's actor, the data-parallel shard it trains and whether it reads that shard's teacher outputs."""

    dp_rank: int
    consumes: bool
    handle: Any
    node_id: str | None


@dataclass
class _PlannedStep:
    """A step whose teacher work is submitted: its layout, work keys per shard, and sampler position."""

    step: int
    epoch: int
    step_in_epoch: int
    layout: StepLayout
    keys: list[list[tuple]]


@dataclass
class RunView:
    """What ``on_step_end`` sees of a running distillation: the teacher pool and the student ranks' actors."""

    pool: TeacherPool
    student_handles: list
    rollout_worker: Any = None  # algorithm=on_policy: the RolloutWorker actor


def train(cfg: KDConfig, *, on_step_end: Callable[[int, RunView], None] | None = None) -> RunSummary:
    """Run (or resume) the distillation described by ``cfg``.

    ``on_step_end(step, view)`` is called after each trained step: an extension point (the fault-tolerance tests
    use it to kill a teacher replica or a student rank mid-run).
    """
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
    data = _load_datasets(cfg, models)
    train_samples, eval_samples = data.train, data.eval
    from kdscale.data import StepSampler, build_step_layout

    on_policy = cfg.algorithm == "on_policy"
    sampler = StepSampler(  # on-policy: a step draws its prompts, each sampled samples_per_prompt times
        num_samples=len(train_samples), seed=cfg.run.seed, shuffle=cfg.data.shuffle,
        global_batch_size=cfg.data.global_batch_size // (cfg.on_policy.samples_per_prompt if on_policy else 1),
    )
    total_steps = cfg.run.max_steps or sampler.steps_per_epoch * cfg.run.num_epochs

    def layout(samples: list, step: int, epoch: int, teacher_samples: dict | None = None) -> StepLayout:
        return build_step_layout(
            samples, dp_size=cfg.student.dp_size, max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch,
            pad_token_id=_pad_id(models.tokenizer), step=step, epoch=epoch, packing=cfg.data.packing,
            teacher_samples=teacher_samples,
            teacher_pad_token_id=_pad_id(models.teacher_tokenizer) if teacher_samples is not None else None,
        )

    with ray_cluster(cfg, run_dir):
        plan = _plan(cfg)
        prefetch_steps = _prefetch_steps(cfg, plan)
        sleep_between_steps = _sleep_between_steps(cfg, plan)
        if sleep_between_steps and cfg.controller.prefetch_steps:
            log.warning(f"controller.prefetch_steps={cfg.controller.prefetch_steps} ignored: the teacher sleeps between "
                        "steps (teacher.sleep_between_steps), so it cannot work ahead")
        pool = _start_teachers(cfg, models, plan, prefetch_steps=prefetch_steps,
                               sleep_between_steps=sleep_between_steps)
        students = _start_students(cfg, models, total_steps, plan, data.shared_vocab)
        source = None
        if on_policy:
            from kdscale.controller.on_policy import OnPolicySource

            source = OnPolicySource(cfg, models, sampler, train_samples, run_dir, device=_device(cfg.student.device),
                                    num_threads=_default_threads(cfg, "teacher"),
                                    actor_options=plan.actor_options(plan.rollout))
        consumer_nodes = _consumer_nodes(students, cfg.student.dp_size)
        _open_cache(cfg, models, pool)
        start_step = 0
        if resume_from is not None:
            state = run_checkpoints.read_state(resume_from)
            ray.get([s.handle.load.remote(str(resume_from)) for s in students], timeout=cfg.ray.timeout_s)
            sampler.load_state_dict(state["sampler"])
            start_step = state["step"]
            log.info(f"resumed from {resume_from} at step {start_step}")
        if source is not None:
            source.start(start_step)
            source.sync_weights(students, start_step)
            source.fill(start_step + 1 + cfg.on_policy.max_staleness, total_steps)

        metrics = MetricsWriter(run_dir, total_steps=total_steps, log_every=cfg.run.log_every,
                                progress_bar=cfg.run.progress_bar, start_step=start_step)
        metrics.truncate_after(start_step)
        ledger = _Ledger(run_dir / "ledger.jsonl", start_step)
        eval_layout = layout(eval_samples, 0, 0, data.teacher_eval) if eval_samples else None
        eval_keys = _submit(pool, eval_layout, "eval", consumer_nodes) if eval_layout else None
        last_saved = start_step if resume_from is not None else None

        def failed(what: str, exc: BaseException) -> RunFailed:
            latest = run_checkpoints.latest_checkpoint(run_dir)
            where = (f"last good checkpoint: {latest} (`kdscale train` with the same config resumes from it)"
                     if latest is not None else "no checkpoint was written yet (set run.save_every to save "
                     "periodically)")
            return RunFailed(f"{what}: {exc}\nthe run stopped; {where}")

        try:
            if eval_layout and start_step == 0:
                _evaluate(students, pool, eval_layout, eval_keys, 0, metrics, cfg)

            planned: deque[_PlannedStep] = deque()
            next_to_plan = start_step + 1
            for step in range(start_step + 1, total_steps + 1):
                step_start = time.perf_counter()
                if sleep_between_steps:
                    pool.set_awake(True)
                rollout_metrics: dict[str, float] = {}
                while next_to_plan <= min(step + prefetch_steps, total_steps):
                    if source is not None:
                        epoch, step_in_epoch, step_samples, rollout_metrics = source.take(next_to_plan)
                    else:
                        step_in_epoch = sampler.step_in_epoch
                        epoch, indices = sampler.next_step()
                        step_samples = [train_samples[i] for i in indices]
                    step_layout = layout(step_samples, next_to_plan, epoch, data.teacher_train)
                    keys = _submit(pool, step_layout, next_to_plan, consumer_nodes)
                    planned.append(_PlannedStep(next_to_plan, epoch, step_in_epoch, step_layout, keys))
                    next_to_plan += 1
                current = planned.popleft()
                assert current.step == step
                inflight_bytes = pool.inflight_bytes()
                resubmitted_before = pool.num_resubmitted
                if sleep_between_steps:  # the teacher's memory goes back to the student while it trains
                    pool.wait([k for shard in current.keys for k in shard])
                    pool.set_awake(False)
                results, teacher, teacher_wait_s = _train_step(students, pool, current, cfg)
                pool.release(k for shard in current.keys for k in shard)
                if source is not None:  # the rollout engine gets this step's weights before later generations
                    source.sync_weights(students, step)
                    source.fill(step + 1 + cfg.on_policy.max_staleness, total_steps)
                last_position = sampler.position_after(current.epoch, current.step_in_epoch)
                metrics.step(step, _step_metrics(
                    results, current, teacher, teacher_wait_s=teacher_wait_s,
                    step_s=time.perf_counter() - step_start, inflight_bytes=inflight_bytes,
                    resubmitted=pool.num_resubmitted - resubmitted_before, replicas_alive=pool.num_alive,
                ) | rollout_metrics)
                ledger.write(step, current.epoch, students, results)
                if on_step_end is not None:
                    on_step_end(step, RunView(pool, [s.handle for s in students],
                                              source.worker if source is not None else None))
                if eval_layout and cfg.run.eval_every and step % cfg.run.eval_every == 0 and step != total_steps:
                    _evaluate(students, pool, eval_layout, eval_keys, step, metrics, cfg)
                if cfg.run.save_every and step % cfg.run.save_every == 0:
                    _save(cfg, run_dir, students, step, sampler, last_position)
                    last_saved = step

            if last_saved != total_steps:
                _save(cfg, run_dir, students, total_steps, sampler, last_position)
            if eval_layout:
                _evaluate(students, pool, eval_layout, eval_keys, total_steps, metrics, cfg)
        except ray.exceptions.RayActorError as exc:
            _kill_all(students, pool, source)
            rollout_died = source is not None and getattr(exc, "actor_id", None) == source.worker._actor_id.hex()
            raise failed("the rollout worker died" if rollout_died else "a student rank died", exc) from exc
        except TeacherPoolError as exc:
            _kill_all(students, pool, source)
            raise failed("the teacher pool failed", exc) from exc
        hf_dir = None
        if cfg.run.export_hf:
            hf_dir = run_dir / "hf_student"
            ray.get([s.handle.export_hf.remote(str(hf_dir)) for s in students], timeout=cfg.ray.timeout_s)
            metrics.info(f"student exported as a Hugging Face model: {hf_dir}")
        if pool.cache is not None:
            pool.cache.log_stats()
        metrics.close()
        ray.get([s.handle.shutdown.remote() for s in students], timeout=cfg.ray.timeout_s)
        pool.shutdown()
        if source is not None:
            source.shutdown()
        _kill_all(students, pool, source)  # their processes end now, also in a cluster that outlives the run

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


@dataclass
class _Datasets:
    """The tokenized train and eval samples; under cross-tokenizer distillation also the teacher's tokenization of
    every sample (by sample id) and the shared vocabulary."""

    train: list
    eval: list
    teacher_train: dict | None = None
    teacher_eval: dict | None = None
    shared_vocab: Any = None


def _load_datasets(cfg: KDConfig, models: PreparedModels) -> _Datasets:
    """Read and tokenize the train and eval files once, here in the driver; report rejected rows. Cross-tokenizer:
    tokenize them with the teacher's tokenizer too, align the two, log the alignment quality."""
    from kdscale.data import read_jsonl, tokenize_rows

    log = get_logger("kdscale.data")
    cross = cfg.cross_tokenizer
    out, teacher_out = [], []
    for path in (cfg.data.train_path, cfg.data.eval_path):
        if path is None:
            out.append([])
            teacher_out.append(None)
            continue
        rows, stats = read_jsonl(path, max_bad_fraction=cfg.data.max_bad_fraction)
        samples, stats = tokenize_rows(
            rows, models.tokenizer, max_seq_len=cfg.data.max_seq_len, truncation=cfg.data.truncation, stats=stats
        )
        log.info(stats.summary())
        if path == cfg.data.eval_path and cfg.data.max_eval_samples:
            samples = samples[: cfg.data.max_eval_samples]
        teacher_samples = None
        if cross.enabled:
            from kdscale.algorithms.cross_tokenizer import pair_samples

            samples, teacher_samples, report = pair_samples(
                rows, samples, models.tokenizer, models.teacher_tokenizer, max_seq_len=cfg.data.max_seq_len,
                truncation=cfg.data.truncation, teacher_chat_template=cross.teacher_chat_template,
            )  # fmt: skip
            log.info(report.summary(str(path)))
            if path == cfg.data.train_path and report.aligned_fraction < cross.min_aligned_fraction:
                raise ConfigError("(cross_tokenizer)", [
                    f"only {report.aligned_fraction:.1%} of the training set's student target tokens have an aligned "
                    f"teacher prediction, below cross_tokenizer.min_aligned_fraction={cross.min_aligned_fraction}: "
                    "check that the teacher's chat template (cross_tokenizer.teacher_chat_template) renders the "
                    "response text unchanged, or lower min_aligned_fraction",
                ])  # fmt: skip
        out.append(samples)
        teacher_out.append(teacher_samples)
    if len(out[0]) < cfg.data.global_batch_size:
        raise ConfigError(
            "(data)",
            [f"data.train_path has {len(out[0])} usable rows, fewer than data.global_batch_size "
             f"{cfg.data.global_batch_size}: add data or lower the batch size"],
        )
    data = _Datasets(out[0], out[1], teacher_out[0], teacher_out[1])
    if cross.enabled:
        from kdscale.algorithms.token_alignment import shared_vocab

        data.shared_vocab = shared_vocab(models.teacher_tokenizer, models.tokenizer)
        if not len(data.shared_vocab):
            raise ConfigError("(cross_tokenizer)", [
                "the teacher's and the student's tokenizers share no vocabulary entry: the aligned KL cannot be "
                "measured (and shared_vocab has nothing to distill); use tokenizers of the same script",
            ])  # fmt: skip
        log.info("shared vocabulary: " + ", ".join(f"{k.split('/')[-1]}={v:.4g}"
                                                    for k, v in data.shared_vocab.stats().items()))
    return data


def _plan(cfg: KDConfig) -> PlacementPlan:
    """Where each teacher replica and student rank goes (see kdscale.controller.placement)."""
    teacher_gpus = cfg.teacher.gpus_per_replica if _device(cfg.teacher.device) == "cuda" else 0
    student_gpus = 1 if _device(cfg.student.device) == "cuda" else 0
    nodes = cluster_nodes()
    plan = plan_placement(
        nodes, num_teachers=cfg.teacher.num_replicas, teacher_gpus=teacher_gpus,
        num_students=cfg.student.world_size, student_gpus=student_gpus, mode=cfg.controller.placement,
        rollout_gpus=(1 if _device(cfg.student.device) == "cuda" else 0) if cfg.algorithm == "on_policy" else None,
    )
    get_logger().info(plan.describe(nodes))
    return plan


def _start_teachers(cfg: KDConfig, models: PreparedModels, plan: PlacementPlan, *, prefetch_steps: int,
                    sleep_between_steps: bool) -> TeacherPool:
    from kdscale.controller.actors import TeacherReplica

    t = cfg.teacher
    device = _device(t.device)
    threads = t.num_threads or _default_threads(cfg, "teacher")
    kwargs = engine_kwargs(t, model_dir=str(models.teacher_dir), transport_dtype=cfg.transport.dtype, device=device,
                           num_threads=t.num_threads if t.engine == "sglang" else threads, seed=cfg.run.seed,
                           sleep_between_steps=sleep_between_steps)

    def make_replica(index: int):
        return TeacherReplica.options(**plan.actor_options(plan.teachers[index])).remote(t.engine, kwargs, threads)

    pool = TeacherPool(
        make_replica, t.num_replicas, timeout_s=cfg.ray.timeout_s, max_restarts=cfg.controller.max_teacher_restarts,
        max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch, engine=t.engine,
    )
    pool.start()
    get_logger().info(f"{t.num_replicas} teacher replica(s) ready ({t.engine}: {models.teacher_dir}, {threads} "
                      f"thread(s) each on CPU); prefetch {prefetch_steps} step(s)"
                      + ("; the teacher sleeps while the student trains" if sleep_between_steps else ""))
    return pool


def _start_students(cfg: KDConfig, models: PreparedModels, total_steps: int, plan: PlacementPlan,
                    shared: Any = None) -> list[_Student]:
    from kdscale.controller.actors import StudentRank

    s = cfg.student
    device = _device(s.device)
    world = s.world_size
    threads = s.num_threads_per_rank or _default_threads(cfg, "student")
    ranks = [
        StudentRank.options(**plan.actor_options(plan.students[r])).remote(r, world, threads, device)
        for r in range(world)
    ]
    master_addr, master_port = ray.get(ranks[0].address.remote(), timeout=cfg.ray.timeout_s)
    kwargs = _student_backend_kwargs(cfg, models, total_steps)
    if shared is not None:  # cross-tokenizer: the aligned-row loss (the teacher's hidden size comes from its head)
        kwargs["cross_tokenizer"] = {
            "method": cfg.cross_tokenizer.method, "projector_ce_weight": cfg.cross_tokenizer.projector_ce_weight,
            "student_ids": shared.student_ids.tolist(), "teacher_ids": shared.teacher_ids.tolist(),
        }  # fmt: skip
    infos = ray.get(
        [
            r.setup.remote(
                master_addr=master_addr, master_port=master_port, backend=s.backend, backend_kwargs=kwargs,
                teacher_model_dir=str(models.teacher_dir),
                timeout_s=cfg.ray.timeout_s, record_digests=cfg.algorithm == "on_policy",
            )
            for r in ranks
        ],
        timeout=cfg.ray.timeout_s,
    )
    get_logger().info(f"{len(ranks)} student rank(s) ready ({s.backend} on {device}; teacher outputs of each DP "
                      f"shard go to ranks {infos[0]['layout']})")
    return [_Student(i["dp_rank"], i["consumes_teacher_outputs"], r, i["node_id"]) for r, i in zip(ranks, infos)]


def _kill_all(students: list[_Student], pool: TeacherPool, source: Any = None) -> None:
    """Stop every actor of the run at once (the survivors of a failed step may be blocked in a collective)."""
    for handle in [s.handle for s in students] + pool.handles() + (source.handles() if source is not None else []):
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
    if pool.engine == "sglang":
        here = ray.get_runtime_context().get_node_id()
        _sweep_sglang_files([r.pid for r in pool.replicas if r.pid is not None and r.node_id == here])


def _sweep_sglang_files(pids: list[int], wait_s: float = 10.0) -> None:
    """Once the killed replicas on this node have exited, remove the /dev/shm files their SGLang engines left (a
    replica that shut down cleanly left none; one killed mid-run, or on another node, is swept by the next engine
    that starts there)."""
    import psutil

    from kdscale.teacher.sglang_engine import sweep_dead_engine_files

    deadline = time.monotonic() + wait_s
    while any(psutil.pid_exists(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    sweep_dead_engine_files()


def _sleep_between_steps(cfg: KDConfig, plan: PlacementPlan | None = None) -> bool:
    """teacher.sleep_between_steps (sglang), or its default: on when teacher replicas and student ranks share GPUs."""
    setting = getattr(cfg.teacher, "sleep_between_steps", False)
    if setting is not None:
        return bool(setting)
    return plan is not None and plan.mode == "colocated" and _device(cfg.teacher.device) == "cuda"


def _prefetch_steps(cfg: KDConfig, plan: PlacementPlan | None = None) -> int:
    """controller.prefetch_steps, or its default: 2 when a GPU does either side's work, 0 when both share CPU cores
    (measured on the 2-core quickstart: overlapping them split the cores and ran 14% slower than one after the
    other). Always 0 while the teacher sleeps between steps (its memory is released while the student trains)."""
    if _sleep_between_steps(cfg, plan):
        return 0  # train() warns once if controller.prefetch_steps asked for more
    if cfg.algorithm == "on_policy":
        return 0  # a step's samples exist once its rollouts do (on_policy.max_staleness overlaps those instead)
    if cfg.controller.prefetch_steps is not None:
        return cfg.controller.prefetch_steps
    on_gpu = "cuda" in (_device(cfg.teacher.device), _device(cfg.student.device))
    return 2 if on_gpu else 0


def _default_threads(cfg: KDConfig, role: str) -> int:
    """torch threads per actor when the config leaves them unset. Without prefetch the teacher and the student run
    one after the other, so the replicas split the cores among themselves and so do the student ranks; with
    prefetch they run at the same time and every actor gets an equal share (oversubscribed cores made the teacher
    4x slower on the 2-core quickstart)."""
    cores = os.cpu_count() or 1
    replicas, ranks = cfg.teacher.num_replicas, cfg.student.world_size
    if _prefetch_steps(cfg) > 0:
        return max(1, cores // (replicas + ranks))
    return max(1, cores // (replicas if role == "teacher" else ranks))


def _consumer_nodes(students: list[_Student], dp_size: int) -> list[str | None]:
    """Per DP shard, the node of the (first) rank that consumes its teacher outputs."""
    nodes: list[str | None] = [None] * dp_size
    for student in students:
        if student.consumes and nodes[student.dp_rank] is None:
            nodes[student.dp_rank] = student.node_id
    return nodes


def _open_cache(cfg: KDConfig, models: PreparedModels, pool: TeacherPool) -> None:
    """Attach the teacher-output cache to the pool when teacher_cache.enabled."""
    if not cfg.teacher_cache.enabled:
        return
    from kdscale.teacher.cache import TeacherOutputCache, data_fingerprint, teacher_fingerprint

    settings = numerics_settings(cfg.teacher)
    root = Path(cfg.teacher_cache.dir.replace("{cache_dir}", cfg.run.cache_dir))
    pool.cache = TeacherOutputCache.open(
        root,
        teacher_fingerprint=teacher_fingerprint(models.teacher_dir, engine=cfg.teacher.engine, settings=settings),
        teacher_description={"engine": cfg.teacher.engine, "model_path": cfg.teacher.model_path, **settings},
        transport_dtype=cfg.transport.dtype,
        hidden_size=pool.hidden_size,
        data_fingerprint=data_fingerprint(cfg.data.train_path),
    )
    get_logger().info(f"teacher-output cache: {pool.cache.spec.path}")


def _submit(pool: TeacherPool, layout: StepLayout, step: int | str, consumer_nodes: list) -> list[list[tuple]]:
    """Send every micro-batch of every DP shard to the pool; returns the work keys per shard.

    Micro-batches go in rounds across the shards (the first of every shard, then the second...), so that the
    demand of every node arrives interleaved and the pool can keep each node's work on that node's replicas."""
    work = layout.teacher_work  # cross-tokenizer: the teacher's own tokenization of the same samples
    keys = [[(step, dp_rank, index) for index in range(len(shard))] for dp_rank, shard in enumerate(work)]
    rounds = max((len(shard) for shard in work), default=0)
    pool.submit(
        TeacherWork(keys[dp_rank][index], shard[index], consumer_nodes[dp_rank])
        for index in range(rounds)
        for dp_rank, shard in enumerate(work)
        if index < len(shard)
    )
    return keys


def _run_with_teacher_outputs(students: list[_Student], pool: TeacherPool, layout: StepLayout, keys: list[list],
                              method: str, cfg: KDConfig) -> tuple[list[dict], list, float]:
    """Wait for the teacher outputs of ``keys``, route each shard's refs to its consuming ranks and call
    ``method`` (train_step or evaluate) on every rank; retry with re-sent work while a rank reports lost refs.
    Returns (the ranks' results, the teacher results, seconds blocked waiting for the teacher)."""
    flat = [k for shard in keys for k in shard]
    wait_s = 0.0
    for _attempt in range(1 + cfg.teacher.num_replicas * (cfg.controller.max_teacher_restarts + 1)):
        start = time.perf_counter()
        teacher = pool.wait(flat)
        wait_s += time.perf_counter() - start
        by_key = dict(zip(flat, teacher))
        results = _get_all(
            [
                getattr(s.handle, method).remote(
                    layout.shards[s.dp_rank], [by_key[k].ref for k in keys[s.dp_rank]] if s.consumes else [],
                    layout.global_num_loss_tokens, **kd_token_kwargs(layout.global_num_kd_tokens),
                )
                for s in students
            ],
            timeout_s=cfg.ray.timeout_s,
        )
        lost = {keys[s.dp_rank][i] for s, r in zip(students, results) for i in r.get("lost", ())}
        if not any("lost" in r for r in results):
            return results, teacher, wait_s
        if not lost:
            raise TeacherPoolError("a rank of another shard could not read its teacher outputs, but none reported "
                                   "which; this is a bug")
        count = pool.resend(lost)
        get_logger().warning(f"{len(lost)} teacher output(s) of step {layout.step} were unreadable (their replica "
                             f"died); re-sent {count} and retrying the step")
    raise TeacherPoolError(f"step {layout.step}: teacher outputs kept getting lost; giving up")


def _get_all(calls: list, *, timeout_s: float) -> list:
    """``ray.get`` of every call, but raising the FIRST failure at once: when one rank dies, the others block in
    their collectives, and a plain ``ray.get`` of the list would wait for them until the timeout."""
    deadline = time.monotonic() + timeout_s
    remaining = list(calls)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"{len(remaining)} student rank call(s) did not finish within ray.timeout_s="
                               f"{timeout_s:.0f}s")
        ray.get(ready)  # raises the failure, if it is one
    return ray.get(calls)


def _train_step(students: list[_Student], pool: TeacherPool, planned: _PlannedStep,
                cfg: KDConfig) -> tuple[list[dict], list, float]:
    return _run_with_teacher_outputs(students, pool, planned.layout, planned.keys, "train_step", cfg)


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


def _step_metrics(results: list[dict], planned: _PlannedStep, teacher: list, *, teacher_wait_s: float,
                  step_s: float, inflight_bytes: int, resubmitted: int, replicas_alive: int) -> dict:
    first = results[0]  # loss, kd, ce, grad norm, lr are global (all-reduced) and equal on every rank
    teacher_s = sum(t.seconds for t in teacher)
    teacher_tokens = sum(t.num_tokens for t in teacher)
    student_s = max(r["student_s"] for r in results)
    return {
        "epoch": planned.epoch,
        "train/loss": first["loss"],
        "train/kd": first["kd"],
        "train/ce": first["ce"],
        "train/lr": first["lr"],
        "train/grad_norm": first["grad_norm"],
        "train/num_loss_tokens": planned.layout.global_num_loss_tokens,
        **_aligned_metrics(planned.layout, "train"),
        "train/num_tokens": first["num_tokens"],
        "time/teacher_s": teacher_s,
        "time/teacher_wait_s": teacher_wait_s,
        "time/student_s": student_s,
        "time/transfer_s": max(r["transfer_s"] for r in results),
        "time/step_s": step_s,
        "transfer/bytes": sum(r["transfer_bytes"] for r in results),
        "teacher/num_tokens": teacher_tokens,
        "teacher/cache_hits": sum(t.replica is None for t in teacher),
        "teacher/resubmitted": resubmitted,
        "teacher/replicas_alive": replicas_alive,
        "objectstore/inflight_bytes": inflight_bytes,
        "throughput/tokens_per_s": first["num_tokens"] / step_s,
        "throughput/teacher_tokens_per_s": teacher_tokens / teacher_s if teacher_s else 0.0,
        "throughput/student_tokens_per_s": first["num_tokens"] / student_s if student_s else 0.0,
    }


def _evaluate(students: list[_Student], pool: TeacherPool, layout: StepLayout, keys: list[list], step: int,
              metrics: MetricsWriter, cfg: KDConfig) -> float:
    results, _, _ = _run_with_teacher_outputs(students, pool, layout, keys, "evaluate", cfg)
    kl = float(results[0]["kl"])
    metrics.write({"step": step, "eval/kl": kl, "eval/loss": float(results[0]["loss"]),
                   "eval/num_loss_tokens": layout.global_num_loss_tokens, **_aligned_metrics(layout, "eval")})
    if layout.global_num_kd_tokens is None:
        metrics.info(f"eval @ step {step}: held-out KL(teacher||student) = {kl:.4f} nats/token "
                     f"over {layout.global_num_loss_tokens} tokens")
    else:
        metrics.info(f"eval @ step {step}: held-out aligned KL(teacher||student) on the shared vocabulary = "
                     f"{kl:.4f} nats/token over {layout.global_num_kd_tokens} aligned tokens (of "
                     f"{layout.global_num_loss_tokens})")
    return kl


def _aligned_metrics(layout: StepLayout, prefix: str) -> dict[str, float]:
    """Cross-tokenizer: the aligned predictions of a step and their share of the student's targets."""
    if layout.global_num_kd_tokens is None:
        return {}
    return {f"{prefix}/num_aligned_tokens": layout.global_num_kd_tokens,
            f"{prefix}/aligned_fraction": layout.global_num_kd_tokens / max(layout.global_num_loss_tokens, 1)}


def _save(cfg: KDConfig, run_dir: Path, students: list[_Student], step: int, sampler, position: dict) -> None:
    """Checkpoint the students at ``step``; ``position`` is the sampler position after that step (the sampler
    itself may have run ahead for prefetching)."""
    tmp = run_checkpoints.begin(run_dir, step)
    ray.get([s.handle.save.remote(str(tmp)) for s in students], timeout=cfg.ray.timeout_s)
    state = {"sampler": {**sampler.state_dict(), **position}, "student_backend": cfg.student.backend}
    final = run_checkpoints.commit(run_dir, tmp, step, state, keep=cfg.run.keep_checkpoints)
    get_logger().info(f"checkpoint saved: {final}")


class _Ledger:
    """``ledger.jsonl``: per trained step, the sample ids each data-parallel shard trained, as reported by its
    ranks (the audit trail that nothing was lost or trained twice, e.g. across teacher failures)."""

    def __init__(self, path: Path, start_step: int) -> None:
        self.path = path
        if path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line and start_step and json.loads(line)["step"] <= start_step]
            _write_atomically(path, "".join(line + "\n" for line in keep))

    def write(self, step: int, epoch: int, students: list[_Student], results: list[dict]) -> None:
        per_dp: dict[int, list[int]] = {}
        digests: dict[int, list[int]] = {}
        for student, result in zip(students, results):
            if student.consumes:
                per_dp.setdefault(student.dp_rank, result["sample_ids"])
                if "sample_digests" in result:
                    digests.setdefault(student.dp_rank, result["sample_digests"])
        record = {"step": step, "epoch": epoch, "sample_ids": [per_dp[dp] for dp in sorted(per_dp)]}
        if digests:  # on-policy: what each sample trained on (see kdscale.data.batch.sample_digest)
            record["sample_digests"] = [digests[dp] for dp in sorted(digests)]
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


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
