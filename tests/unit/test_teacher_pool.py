"""The teacher pool with fake replicas (no model): assignment by load and node, release, failover, clear errors."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import ray
import torch

from kdscale.controller.teacher_pool import TeacherPool, TeacherPoolError, TeacherWork
from kdscale.data.batch import MicroBatch


@ray.remote(num_cpus=0)
class FakeReplica:
    """Returns a [num_loss_tokens, 2] array filled with its index; optionally sleeps per call."""

    def __init__(self, index: int, node: str, delay_s: float = 0.0):
        self.index, self.node, self.delay_s = index, node, delay_s

    def start(self):
        return {"hidden_size": 2, "node_id": self.node}

    def forward(self, micro_batch, cache_spec=None):
        import time

        time.sleep(self.delay_s)
        array = np.full((micro_batch.num_loss_tokens, 2), self.index, dtype=np.float32)
        return {"ref": ray.put(array), "seconds": self.delay_s, "num_tokens": micro_batch.num_tokens,
                "nbytes": array.nbytes}

    def ping(self):
        return True

    def pid(self):
        return os.getpid()

    def shutdown(self):
        return None


def _mb(num_tokens: int) -> MicroBatch:
    loss_mask = torch.zeros(1, num_tokens, dtype=torch.bool)
    loss_mask[0, num_tokens // 2:] = True
    return MicroBatch(torch.zeros(1, num_tokens, dtype=torch.int64), torch.ones(1, num_tokens, dtype=torch.int64),
                      loss_mask, sample_ids=[num_tokens])


def _pool(nodes, *, delay_s=0.0, max_restarts=1, timeout_s=60.0, slack=0):
    made = []

    def make(index):
        made.append(index)
        return FakeReplica.remote(index, nodes[index], delay_s)

    pool = TeacherPool(make, len(nodes), timeout_s=timeout_s, max_restarts=max_restarts,
                       max_tokens_per_micro_batch=slack)
    pool.start()
    return pool, made


def _replica_of(pool, results):
    return [int(ray.get(r.ref)[0, 0]) if r.num_tokens else None for r in results]


def test_work_goes_to_the_least_loaded_replica(ray_session):
    pool, _ = _pool(["n0", "n1"])
    works = [TeacherWork(("s", i), _mb(n)) for i, n in enumerate([100, 10, 10, 10, 80])]
    pool.submit(works)
    results = pool.wait([w.key for w in works])
    # 100 -> r0 (tie, lower index); 10, 10, 10 -> r1 (loads 10, 20, 30 < 100); 80 -> r1 (30 < 100)
    assert _replica_of(pool, results) == [0, 1, 1, 1, 1]
    assert [r.replica for r in results] == [0, 1, 1, 1, 1]
    assert [r.num_tokens for r in results] == [100, 10, 10, 10, 80]
    assert pool.inflight_bytes() == sum(r.nbytes for r in results) > 0
    pool.release(w.key for w in works)
    assert pool.inflight_bytes() == 0 and pool.num_pending() == 0
    assert all(r.load_tokens == 0 for r in pool.replicas)
    pool.shutdown()


def test_a_replica_on_the_consumers_node_is_preferred_within_the_slack(ray_session):
    pool, _ = _pool(["n0", "n1"], slack=50)
    works = [TeacherWork(("s", i), _mb(20), consumer_node="n1") for i in range(4)]
    pool.submit(works)
    # r1 takes the first three (loads 0, 20, 40 are within 50 of r0's 0), the fourth goes to r0 (60 > 0 + 50)
    assert [r.replica for r in pool.wait([w.key for w in works])] == [1, 1, 1, 0]
    pool.release(w.key for w in works)
    pool.shutdown()


def test_a_killed_replica_is_restarted_and_its_work_resent(ray_session):
    pool, made = _pool(["n0", "n1"], delay_s=0.3, max_restarts=1)
    pid = ray.get(pool.handles()[0].pid.remote())  # before the work: an actor runs its calls in order
    works = [TeacherWork(("s", i), _mb(10)) for i in range(6)]
    pool.submit(works)
    os.kill(pid, signal.SIGKILL)
    results = pool.wait([w.key for w in works])
    assert all(ray.get(r.ref).shape == (5, 2) for r in results)  # every output is readable
    assert made == [0, 1, 0]  # replica 0 was made again
    assert pool.num_restarts == 1 and pool.num_resubmitted >= 1 and pool.num_alive == 2
    pool.release(w.key for w in works)
    pool.shutdown()


def test_outputs_lost_after_they_were_produced_are_recomputed_on_resend(ray_session):
    pool, _ = _pool(["n0"], max_restarts=1)
    works = [TeacherWork(("s", i), _mb(10)) for i in range(2)]
    pool.submit(works)
    pool.wait([w.key for w in works])  # both done on replica 0, which owns the outputs
    os.kill(ray.get(pool.handles()[0].pid.remote()), signal.SIGKILL)
    assert pool.resend([w.key for w in works]) == 0  # the restart already re-sent them
    results = pool.wait([w.key for w in works])
    assert [ray.get(r.ref).shape for r in results] == [(5, 2), (5, 2)]
    assert pool.num_restarts == 1
    pool.shutdown()


def test_no_replica_left_is_one_clear_error(ray_session):
    pool, _ = _pool(["n0"], delay_s=0.3, max_restarts=0)
    pid = ray.get(pool.handles()[0].pid.remote())
    works = [TeacherWork(("s", 0), _mb(10))]
    pool.submit(works)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(TeacherPoolError, match="no teacher replica is left alive"):
        pool.wait([works[0].key])


def test_a_wait_past_the_timeout_names_the_replica_and_the_fix(ray_session):
    pool, _ = _pool(["n0"], delay_s=3.0)
    pool.timeout_s = 0.5
    pool.submit([TeacherWork(("s", 0), _mb(10))])
    with pytest.raises(TeacherPoolError, match=r"not ready after ray.timeout_s=0s .*replica\(s\) \[0\].*raise ray"):
        pool.wait([("s", 0)])
    pool.shutdown()


def test_a_key_is_submitted_once(ray_session):
    pool, _ = _pool(["n0"])
    pool.submit([TeacherWork(("s", 0), _mb(4))])
    with pytest.raises(KeyError, match="already submitted"):
        pool.submit([TeacherWork(("s", 0), _mb(4))])
    pool.release([("s", 0)])
    pool.shutdown()


@ray.remote(num_cpus=0, concurrency_groups={"health": 1})
class HangingReplica:
    """Its first life hangs in forward and reports itself unhealthy (as an SGLang engine whose scheduler died
    would); restarted, it answers. Records sleep/wake calls."""

    def __init__(self, index: int, hang: bool):
        self.index, self.hang, self.calls = index, hang, []

    def start(self):
        return {"hidden_size": 2, "node_id": "n0"}

    def forward(self, micro_batch, cache_spec=None):
        import time

        if self.hang:
            time.sleep(3600)
        array = np.full((micro_batch.num_loss_tokens, 2), self.index, dtype=np.float32)
        return {"ref": ray.put(array), "seconds": 0.0, "num_tokens": micro_batch.num_tokens, "nbytes": array.nbytes}

    @ray.method(concurrency_group="health")
    def ping(self):
        return {"healthy": not self.hang, "reason": "engine process(es) [123] exited"}

    def sleep(self):
        self.calls.append("sleep")

    def wake(self):
        self.calls.append("wake")

    def recorded(self):
        return self.calls

    def shutdown(self):
        return None


def test_an_unhealthy_replica_is_replaced_while_its_work_hangs(ray_session):
    lives = []

    def make(index):
        lives.append(index)
        return HangingReplica.remote(index, hang=len(lives) == 1)

    pool = TeacherPool(make, 1, timeout_s=120.0, max_restarts=1, health_check_s=1.0)
    pool.start()
    works = [TeacherWork(("s", i), _mb(8)) for i in range(2)]
    pool.submit(works)
    results = pool.wait([w.key for w in works])  # would hang for the timeout without the health check
    assert len(lives) == 2 and pool.num_restarts == 1 and pool.num_resubmitted == 2
    assert [r.num_tokens for r in results] == [8, 8]
    pool.set_awake(False)
    pool.set_awake(True)
    assert ray.get(pool.handles()[0].recorded.remote()) == ["sleep", "wake"]
    pool.shutdown()
