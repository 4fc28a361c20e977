"""The teacher pool: N teacher replicas, work assigned by load, failures absorbed.

Design:
- A unit of work is one micro-batch of one data-parallel shard of one step (``TeacherWork``), keyed by
  ``(step, dp_rank, index)``. ``submit`` sends it to the live replica with the fewest tokens in flight, preferring
  a replica on the node of the ranks that consume that shard (when it is within one micro-batch of the least
  loaded). A replica runs its calls in order, so earlier steps finish first and later steps queue behind them:
  that queue is the prefetch.
- With a teacher-output cache, a micro-batch whose samples are all cached never reaches a replica; a replica
  writes the outputs it computes into the cache.
- ``wait(keys)`` blocks until the outputs of ``keys`` exist and returns their ``TeacherResult``s (the data stays in
  the object store; a result carries its ref). Outputs stay referenced until ``release(keys)``: the driver
  releases a step's outputs once the step has trained, so the object store holds at most the steps in flight.
- Fault tolerance: a replica's outputs are owned by the replica's process (it ``ray.put`` them), so when it dies
  its finished-but-unconsumed outputs die with it, not only its queued work. On death (a failed call, or a lost
  output reported by a student rank through ``resend``) the pool restarts the replica (up to
  ``max_restarts`` times; past that it is dropped with a warning) and re-sends every unreleased piece of work it
  owned. Work is keyed, and a key is trained only once its step's ranks all resolved their refs, so nothing is
  lost and nothing is trained twice.
- Health: a replica's ``ping`` runs in its own thread and reports its engine's health (e.g. SGLang's processes
  alive). While a wait makes no progress, the replicas it waits on are pinged every ``health_check_s``; an
  unhealthy or unresponsive one is replaced like a dead one, so a hung engine does not stall the run until
  ``timeout_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray

from kdscale.data.batch import MicroBatch
from kdscale.observability.logging import get_logger

WorkKey = tuple


class TeacherPoolError(RuntimeError):
    """The pool cannot produce the teacher outputs (no replica left, or a wait timed out)."""


@dataclass
class TeacherWork:
    """One micro-batch for the teacher, and the node of the ranks that consume its output (None: anywhere)."""

    key: WorkKey
    micro_batch: MicroBatch
    consumer_node: str | None = None

    @property
    def num_tokens(self) -> int:
        return self.micro_batch.num_tokens


@dataclass
class TeacherResult:
    """Where one micro-batch's teacher output lives, and what producing it cost."""

    ref: Any  # ray.ObjectRef, or a cache reference the channel resolves
    seconds: float  # replica compute seconds (0 for a cache hit)
    num_tokens: int  # tokens the teacher ran (0 for a cache hit)
    nbytes: int
    replica: int | None  # None: served from the cache
    node_id: str | None = None


@dataclass
class _Replica:
    index: int
    handle: Any
    node_id: str | None
    pid: int | None = None
    restarts: int = 0
    alive: bool = True
    load_tokens: int = 0
    keys: set = field(default_factory=set)  # unreleased work this replica owns (queued, running or done)


class TeacherPool:
    """Teacher replicas behind one submit/wait/release interface (see the module docstring)."""

    def __init__(
        self,
        make_replica: Callable[[int], Any],
        num_replicas: int,
        *,
        timeout_s: float,
        max_restarts: int = 2,
        cache: Any = None,
        max_tokens_per_micro_batch: int = 0,
        health_check_s: float = 30.0,
        engine: str | None = None,
    ) -> None:
        self._make_replica = make_replica
        self.num_replicas = num_replicas
        self.timeout_s = timeout_s
        self.max_restarts = max_restarts
        self.cache = cache
        self.slack_tokens = max_tokens_per_micro_batch
        self.log = get_logger("kdscale.teacher_pool")
        self.replicas: list[_Replica] = []
        self.hidden_size: int | None = None
        self._work: dict[WorkKey, TeacherWork] = {}
        self._calls: dict[WorkKey, tuple[ray.ObjectRef, int]] = {}  # pending: key -> (call ref, replica index)
        self._results: dict[WorkKey, TeacherResult] = {}
        self.num_resubmitted = 0
        self.num_restarts = 0
        self.health_check_s = health_check_s
        self.engine = engine  # the engine name, for engine-specific cleanup by the driver
        self._last_health_check = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create every replica and wait until each has loaded its model."""
        handles = [self._make_replica(i) for i in range(self.num_replicas)]
        infos = ray.get([h.start.remote() for h in handles], timeout=self.timeout_s)
        for index, (handle, info) in enumerate(zip(handles, infos)):
            self.replicas.append(_Replica(index, handle, info["node_id"], pid=info.get("pid")))
        self.hidden_size = infos[0]["hidden_size"]

    def shutdown(self) -> None:
        """Stop the live replicas (best effort: a dead one is already gone)."""
        calls = [r.handle.shutdown.remote() for r in self.replicas if r.alive]
        try:
            ray.get(calls, timeout=min(self.timeout_s, 120))
        except (ray.exceptions.RayError, TimeoutError) as exc:
            self.log.warning(f"teacher replica shutdown incomplete: {exc}")

    @property
    def num_alive(self) -> int:
        return sum(r.alive for r in self.replicas)

    def handles(self) -> list[Any]:
        """Actor handles of the replicas, by index (a restarted replica has a new handle)."""
        return [r.handle for r in self.replicas]

    # ------------------------------------------------------------------ work

    def submit(self, works: Iterable[TeacherWork]) -> None:
        """Queue each micro-batch on a replica (or take it from the cache); returns at once."""
        for work in works:
            if work.key in self._work:
                raise KeyError(f"teacher work {work.key} was already submitted")
            self._work[work.key] = work
            if self.cache is not None and (hit := self._from_cache(work)) is not None:
                self._results[work.key] = hit
                continue
            self._dispatch(work)

    def wait(self, keys: list[WorkKey]) -> list[TeacherResult]:
        """Block until every key's output exists (re-sending around dead replicas); results in key order."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            pending = [self._calls[k][0] for k in keys if k not in self._results]
            if not pending:
                return [self._results[k] for k in keys]
            self._collect(pending, deadline)

    def release(self, keys: Iterable[WorkKey]) -> None:
        """Forget the outputs of ``keys`` (their object-store memory is freed once no rank holds them)."""
        for key in keys:
            call = self._calls.pop(key, None)
            work = self._work.pop(key, None)
            if call is not None and work is not None:  # released before it finished
                self.replicas[call[1]].load_tokens -= work.num_tokens
            self._results.pop(key, None)
            for replica in self.replicas:
                replica.keys.discard(key)

    def resend(self, keys: Iterable[WorkKey]) -> int:
        """Outputs of ``keys`` were lost (a consuming rank could not read them): check their replicas, restart the
        dead ones (which re-sends all their work) and re-send the rest. Returns how many keys were re-sent."""
        keys = [k for k in keys if k in self._work]
        owners = {self._results[k].replica for k in keys if k in self._results and self._results[k].replica is not None}
        for index in sorted(owners):
            if not self._is_alive(self.replicas[index]):
                self._replace(self.replicas[index], reason="its outputs became unreadable")
        count = 0
        for key in keys:
            result = self._results.get(key)
            if result is not None and result.replica is None:
                self.log.warning(f"a cached teacher output of {key} could not be read; recomputing it ({result.ref})")
            if key in self._results or key not in self._calls:  # still considered done, or dropped above
                self._results.pop(key, None)
                self._dispatch(self._work[key])
                count += 1
        self.num_resubmitted += count
        return count

    def set_awake(self, awake: bool) -> None:
        """Wake every live replica (before teacher work) or put it to sleep (while the student trains), releasing
        its accelerator memory (``teacher.sleep_between_steps``)."""
        calls = [(r.handle.wake if awake else r.handle.sleep).remote() for r in self.replicas if r.alive]
        try:
            ray.get(calls, timeout=self.timeout_s)
        except ray.exceptions.RayActorError:
            pass  # a dead replica is found, restarted and its work re-sent when its outputs are waited for
        except TimeoutError as exc:
            raise TeacherPoolError(
                f"teacher replicas did not {'wake' if awake else 'sleep'} within ray.timeout_s={self.timeout_s:.0f}s"
            ) from exc

    def check_health(self, indices: Iterable[int] | None = None) -> list[int]:
        """Ping the live replicas (all, or ``indices``); restart (or drop) the unhealthy or unresponsive ones and
        re-send their work. Returns the indices replaced."""
        replaced = []
        for replica in [self.replicas[i] for i in (indices if indices is not None else range(len(self.replicas)))]:
            if replica.alive and not self._is_alive(replica):
                self._replace(replica, reason="it failed its health check")
                replaced.append(replica.index)
        return replaced

    def inflight_bytes(self) -> int:
        """Bytes of finished, unreleased teacher outputs in the object store (cache hits excluded)."""
        return sum(r.nbytes for r in self._results.values() if r.replica is not None)

    def num_pending(self) -> int:
        return len(self._calls)

    # ------------------------------------------------------------------ internals

    def _from_cache(self, work: TeacherWork) -> TeacherResult | None:
        ref = self.cache.lookup(work.micro_batch)
        if ref is None:
            return None
        nbytes = sum(ref.num_rows) * ref.hidden_size * (2 if ref.dtype == "bfloat16" else 4)
        return TeacherResult(ref=ref, seconds=0.0, num_tokens=0, nbytes=nbytes, replica=None)

    def _dispatch(self, work: TeacherWork) -> None:
        replica = self._choose(work)
        spec = self.cache.spec if self.cache is not None else None
        call = replica.handle.forward.remote(work.micro_batch, spec)
        self._calls[work.key] = (call, replica.index)
        replica.load_tokens += work.num_tokens
        replica.keys.add(work.key)

    def _choose(self, work: TeacherWork) -> _Replica:
        alive = [r for r in self.replicas if r.alive]
        if not alive:
            raise TeacherPoolError("no teacher replica is left alive: see the warnings above for why they died")
        best = min(alive, key=lambda r: (r.load_tokens, r.index))
        local = [r for r in alive if work.consumer_node is not None and r.node_id == work.consumer_node]
        if local:
            best_local = min(local, key=lambda r: (r.load_tokens, r.index))
            if best_local.load_tokens <= best.load_tokens + self.slack_tokens:
                return best_local
        return best

    def _collect(self, pending: list[ray.ObjectRef], deadline: float) -> None:
        """Wait for at least one of ``pending`` (and take every other finished call on the way)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            stuck = sorted({self._calls[k][1] for k in self._calls if self._calls[k][0] in pending})
            raise TeacherPoolError(
                f"teacher outputs not ready after ray.timeout_s={self.timeout_s:.0f}s ({len(pending)} micro-batches "
                f"pending on replica(s) {stuck}): raise ray.timeout_s for very long sequences, or check the "
                "replicas' logs"
            )
        ready, _ = ray.wait(pending, num_returns=1, timeout=min(remaining, 5.0))
        if not ready:
            if time.monotonic() - self._last_health_check >= self.health_check_s:
                self._last_health_check = time.monotonic()
                self.check_health(sorted({self._calls[k][1] for k in self._calls if self._calls[k][0] in pending}))
            return
        all_calls = [call for call, _ in self._calls.values()]
        done, _ = ray.wait(all_calls, num_returns=len(all_calls), timeout=0)
        by_call = {call: key for key, (call, _) in self._calls.items()}
        for call in done:
            key = by_call.get(call)
            if key is None or key not in self._calls or self._calls[key][0] != call:
                continue  # re-sent while handling an earlier call of this batch (its replica died)
            self._finish(key)

    def _finish(self, key: WorkKey) -> None:
        call, index = self._calls.pop(key)
        replica = self.replicas[index]
        replica.load_tokens -= self._work[key].num_tokens
        try:
            out = ray.get(call, timeout=self.timeout_s)
        except ray.exceptions.RayActorError as exc:  # _replace re-sends it with the replica's other work
            self._replace(replica, reason=type(exc).__name__)
            return
        if self.cache is not None:
            self.cache.record_store(out.get("cache_bytes", 0))
        self._results[key] = TeacherResult(
            ref=out["ref"], seconds=out["seconds"], num_tokens=out["num_tokens"], nbytes=out["nbytes"],
            replica=index, node_id=replica.node_id,
        )

    def _is_alive(self, replica: _Replica) -> bool:
        if not replica.alive:
            return False
        try:
            health = ray.get(replica.handle.ping.remote(), timeout=min(self.timeout_s, 60))
        except (ray.exceptions.RayError, TimeoutError):
            return False
        if isinstance(health, dict) and not health.get("healthy", True):
            self.log.warning(f"teacher replica {replica.index} is unhealthy: {health.get('reason', health)}")
            return False
        return True

    def _replace(self, replica: _Replica, *, reason: str) -> None:
        """The replica died: restart it (or drop it) and re-send all unreleased work it owned."""
        owned = [k for k in self._work if k in replica.keys]  # in submission order
        replica.alive = False
        replica.keys = set()
        replica.load_tokens = 0
        for key in owned:
            self._calls.pop(key, None)
            self._results.pop(key, None)
        if replica.restarts < self.max_restarts:
            self.log.warning(
                f"teacher replica {replica.index} died ({reason}); restarting it (restart {replica.restarts + 1} of "
                f"at most {self.max_restarts}) and re-sending its {len(owned)} unconsumed micro-batch(es)"
            )
            try:
                ray.kill(replica.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            try:
                handle = self._make_replica(replica.index)
                info = ray.get(handle.start.remote(), timeout=self.timeout_s)
                replica.handle, replica.node_id, replica.alive = handle, info["node_id"], True
                replica.pid = info.get("pid")
                replica.restarts += 1
                self.num_restarts += 1
            except (ray.exceptions.RayError, TimeoutError) as exc:
                self.log.warning(f"teacher replica {replica.index} could not be restarted ({exc}); dropping it")
        else:
            self.log.warning(
                f"teacher replica {replica.index} died ({reason}) after {replica.restarts} restart(s) "
                f"(controller.max_teacher_restarts={self.max_restarts}); dropping it, {self.num_alive} left; "
                f"re-sending its {len(owned)} unconsumed micro-batch(es)"
            )
        for key in owned:
            self._dispatch(self._work[key])
        self.num_resubmitted += len(owned)
