"""On-policy samples for the driver: prompts from the training data, completions from a rollout engine holding the
student's current weights (``algorithm: on_policy``).

How a step gets its samples:
- The sampler draws the step's rows (``data.global_batch_size / on_policy.samples_per_prompt`` prompts); a prompt is
  a row's tokens before its first target (the chat template's prompt, generation prompt included).
- With probability ``on_policy.lmbda`` (drawn per step from the run seed, so a resumed run draws the same) the step
  trains on rollouts: ``samples_per_prompt`` completions per prompt, kept as generated (token ids and finish reason;
  a truncated completion gets no EOS; see ``kdscale.algorithms.rollout``). Otherwise it trains on the rows'
  dataset responses (GKD's mixing).
- Weights: after every optimizer step the student's full weights (rank 0, Hugging Face names) go to the rollout
  worker through the object store, in buckets of ``on_policy.weight_sync_bucket_mb``. The worker runs its calls in
  order, so a generation queued after a sync uses those weights. ``on_policy.max_staleness = k`` queues the next
  k steps' generations before the current step trains: rollouts are then at most k updates old, and generation
  overlaps training.
- Every rollout is appended to ``rollouts.jsonl`` (step, sample id, prompt length, completion ids, finish reason,
  weight version): with the ledger's per-sample digests this shows each sample trained exactly as generated.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

from kdscale.observability.logging import get_logger

ROLLOUT_ID_BASE = 1 << 40  # sample ids of rollouts: ROLLOUT_ID_BASE + step * global_batch_size + index


@dataclass
class _Planned:
    step: int
    epoch: int
    step_in_epoch: int  # the sampler position before this step's draw
    indices: list[int]
    on_policy: bool
    call: Any = None  # ObjectRef of the generate call


class OnPolicySource:
    """Draws each step's prompts, queues their generation on the rollout worker, hands the samples to the driver."""

    def __init__(self, cfg: Any, models: Any, sampler: Any, train_samples: list, run_dir: Path, *, device: str,
                 num_threads: int | None, actor_options: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        # Ray options of the rollout worker: its slot in the placement plan (GPUs, node); default one GPU anywhere
        self.actor_options = actor_options if actor_options is not None else (
            {"num_gpus": 1} if device == "cuda" else {})
        self.policy = cfg.on_policy
        self.sampler = sampler
        self.train_samples = train_samples
        self.models = models
        self.device = device
        self.num_threads = num_threads
        self.rollouts_path = run_dir / "rollouts.jsonl"
        self.log = get_logger("kdscale.on_policy")
        self.worker: Any = None
        self._planned: deque[_Planned] = deque()
        self._next_step: int | None = None
        self._syncs: list[Any] = []
        self.max_prompt_len = max(1, cfg.data.max_seq_len - self.policy.max_new_tokens)

    # ------------------------------------------------------------------ lifecycle

    def start(self, start_step: int) -> None:
        from kdscale.controller.actors import RolloutWorker

        p = self.policy
        kwargs: dict[str, Any] = {"model_path": str(self.models.student_dir), "dtype": p.dtype, "device": self.device,
                                  "bucket_bytes": p.weight_sync_bucket_mb * 2**20,
                                  "token_vocab_size": int(self.models.vocab_size)}
        if p.rollout_engine == "hf":
            kwargs["num_threads"] = p.num_threads or self.num_threads
        else:
            kwargs.update(num_threads=p.num_threads, seed=self.cfg.run.seed)
        self.worker = RolloutWorker.options(**self.actor_options).remote(p.rollout_engine, kwargs, p.num_threads or self.num_threads)
        ray.get(self.worker.start.remote(), timeout=self.cfg.ray.timeout_s)
        self._next_step = start_step + 1
        if self.rollouts_path.exists():  # a resumed run keeps the rollouts of the steps it keeps
            keep = [line for line in self.rollouts_path.read_text().splitlines()
                    if line and start_step and json.loads(line)["step"] <= start_step]
            self.rollouts_path.write_text("".join(line + "\n" for line in keep))
        self.log.info(f"rollout worker ready ({p.rollout_engine} on {self.device}); lambda {p.lmbda}, "
                      f"{p.samples_per_prompt} sample(s) per prompt, max staleness {p.max_staleness}")

    def shutdown(self) -> None:
        if self.worker is not None:
            try:
                ray.get(self.worker.shutdown.remote(), timeout=120)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                self.log.warning(f"rollout worker shutdown incomplete: {exc}")

    def handles(self) -> list[Any]:
        return [self.worker] if self.worker is not None else []

    # ------------------------------------------------------------------ weights

    def sync_weights(self, students: list, version: int) -> None:
        """Queue the student's current weights on the rollout worker as ``version`` (collective on the ranks)."""
        calls = [s.handle.hf_state_dict.remote() for s in students]
        bucket = self.policy.weight_sync_bucket_mb * 2**20
        # rank 0's result goes to the worker by reference (never through the driver); the other ranks return None
        self._syncs.append(self.worker.update_weights.remote(calls[0], version, bucket))
        ray.get(calls[1:], timeout=self.cfg.ray.timeout_s)

    # ------------------------------------------------------------------ samples

    def fill(self, up_to_step: int, total_steps: int) -> None:
        """Draw prompts and queue generation for every step up to ``up_to_step`` (at most ``total_steps``)."""
        while self._next_step <= min(up_to_step, total_steps):
            step = self._next_step
            step_in_epoch = self.sampler.step_in_epoch
            epoch_drawn, indices = self.sampler.next_step()
            on = bool(np.random.default_rng([self.cfg.run.seed, step]).random() < self.policy.lmbda)
            planned = _Planned(step, epoch_drawn, step_in_epoch, list(indices), on)
            if on:
                prompts = [self._prompt(self.train_samples[i]) for i in indices]
                planned.call = self.worker.generate.remote(prompts, self._params(step))
            self._planned.append(planned)
            self._next_step += 1

    def take(self, step: int) -> tuple[int, int, list, dict[str, float]]:
        """The samples of ``step``: (epoch, sampler position before its draw, samples, rollout metrics)."""
        planned = self._planned.popleft()
        assert planned.step == step, (planned.step, step)
        sync_s = sum(ray.get(self._syncs, timeout=self.cfg.ray.timeout_s)) if self._syncs else 0.0
        self._syncs = []
        if not planned.on_policy:
            samples = [self.train_samples[i] for i in planned.indices]
            return planned.epoch, planned.step_in_epoch, samples, {"rollout/on_policy": 0.0,
                                                                   "time/weight_sync_s": sync_s}
        start = time.perf_counter()
        out = ray.get(planned.call, timeout=self.cfg.ray.timeout_s)
        wait_s = time.perf_counter() - start
        rollouts = out["rollouts"]
        base = ROLLOUT_ID_BASE + step * self.cfg.data.global_batch_size
        samples = [r.to_tokenized_sample(base + i) for i, r in enumerate(rollouts)]
        self._record(step, samples, rollouts)
        lengths = [len(r.completion_ids) for r in rollouts]
        versions = [r.weight_version for r in rollouts]
        return planned.epoch, planned.step_in_epoch, samples, {
            "rollout/on_policy": 1.0,
            "rollout/num_samples": float(len(rollouts)),
            "rollout/mean_completion_tokens": float(np.mean(lengths)),
            "rollout/stop_fraction": float(np.mean([r.finish_reason == "stop" for r in rollouts])),
            "rollout/staleness": float((step - 1) - min(versions)),
            "time/rollout_s": float(out["seconds"]),
            "time/rollout_wait_s": wait_s,
            "time/weight_sync_s": sync_s,
        }

    def _prompt(self, sample: Any) -> list[int]:
        targets = np.flatnonzero(sample.loss_mask)
        end = int(targets[0]) if targets.size else len(sample.input_ids)
        return [int(t) for t in sample.input_ids[: max(1, min(end, self.max_prompt_len))]]

    def _params(self, step: int) -> dict[str, Any]:
        p = self.policy
        return {"n": p.samples_per_prompt, "max_new_tokens": p.max_new_tokens, "temperature": p.temperature,
                "top_p": p.top_p, "top_k": p.top_k, "seed": self.cfg.run.seed * 1_000_003 + step}

    def _record(self, step: int, samples: list, rollouts: list) -> None:
        with self.rollouts_path.open("a") as f:
            for sample, r in zip(samples, rollouts):
                f.write(json.dumps({
                    "step": step, "sample_id": int(sample.sample_id), "prompt_len": len(r.prompt_ids),
                    "prompt_ids": list(r.prompt_ids), "completion_ids": list(r.completion_ids),
                    "finish_reason": r.finish_reason, "weight_version": r.weight_version,
                }) + "\n")
