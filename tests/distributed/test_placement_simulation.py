"""Placement and routing on a simulated 2-node x 8-GPU Ray cluster (``ray.cluster_utils.Cluster``: two raylets on
this machine, each declaring 8 GPUs it does not have).

The plan's actor options (teacher replicas, student ranks and an on-policy rollout worker) go to light probe actors
that report the node and GPU Ray gave them; the teacher pool and the driver's routing run for real with fake
replicas (they put small arrays tagged with their node) and fake student ranks (they read the refs they are handed
and report what they got). The simulation runs in a child
process: a pytest session may already hold a single-node Ray instance."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _simulate() -> dict:
    from types import SimpleNamespace

    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    from kdscale.controller.driver import _run_with_teacher_outputs, _Student, _submit
    from kdscale.controller.placement import cluster_nodes, plan_placement
    from kdscale.controller.teacher_pool import TeacherPool
    from kdscale.data.layout import build_step_layout
    from kdscale.data.tokenization import TokenizedSample

    @ray.remote(num_cpus=0)
    class Probe:
        def where(self):
            return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]

    @ray.remote(num_cpus=0)
    class FakeReplica:
        def __init__(self, index):
            self.index = index
            self.node = ray.get_runtime_context().get_node_id()

        def start(self):
            return {"hidden_size": 4, "node_id": self.node}

        def forward(self, micro_batch, cache_spec=None):
            rows = micro_batch.num_loss_tokens
            array = np.full((rows, 4), self.index, dtype=np.float32)
            return {"ref": ray.put({"replica": self.index, "node": self.node, "rows": array}), "seconds": 0.0,
                    "num_tokens": micro_batch.num_tokens, "nbytes": array.nbytes}

        def ping(self):
            return True

        def shutdown(self):
            return None

    @ray.remote(num_cpus=0)
    class FakeStudent:
        def __init__(self):
            self.node = ray.get_runtime_context().get_node_id()

        def train_step(self, micro_batches, refs, global_num_loss_tokens):
            outputs = ray.get(list(refs))
            return {"node": self.node, "rows": [int(o["rows"].shape[0]) for o in outputs],
                    "expected_rows": [mb.num_loss_tokens for mb in micro_batches],
                    "replica_nodes": [o["node"] for o in outputs]}

    os.makedirs(os.path.join(os.environ["RAY_TMPDIR"], "ray"), exist_ok=True)  # the parent made a private RAY_TMPDIR
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 8, "object_store_memory": 80 * 1024 * 1024, "include_dashboard": False})
    cluster.add_node(num_cpus=2, num_gpus=8, object_store_memory=80 * 1024 * 1024)
    ray.init(address=cluster.address, logging_level="WARNING")
    out: dict = {}
    try:
        nodes = cluster_nodes()
        out["nodes"] = [n.node_id for n in nodes]
        rng = np.random.default_rng(0)
        samples = []
        for i in range(32):
            n = int(rng.integers(8, 24))
            mask = np.zeros(n, dtype=bool)
            mask[n // 2:] = True
            samples.append(TokenizedSample(i, rng.integers(0, 100, n).astype(np.int32), mask))
        cfg = SimpleNamespace(
            teacher=SimpleNamespace(num_replicas=0), controller=SimpleNamespace(max_teacher_restarts=0),
            ray=SimpleNamespace(timeout_s=120.0),
        )
        # On-policy: the rollout worker is placed too (separate: the 8th GPU of the teacher node)
        for mode, num_teachers, num_students in (("separate", 7, 8), ("colocated", 4, 16)):
            plan = plan_placement(nodes, num_teachers=num_teachers, teacher_gpus=1, num_students=num_students,
                                  student_gpus=1, mode=mode, rollout_gpus=1)
            slots = plan.teachers + plan.students + [plan.rollout]
            probes = [Probe.options(**plan.actor_options(s)).remote() for s in slots]
            placed = ray.get([p.where.remote() for p in probes], timeout=120)
            for p in probes:
                ray.kill(p)
            # Placement of the real actors: the pool's replicas and the student ranks.
            pool = TeacherPool(
                lambda i, plan=plan: FakeReplica.options(**plan.actor_options(plan.teachers[i])).remote(i),
                num_teachers, timeout_s=120.0, max_tokens_per_micro_batch=64,
            )
            pool.start()
            handles = [FakeStudent.options(**plan.actor_options(s)).remote() for s in plan.students]
            student_nodes = ray.get([h.train_step.remote([], [], 0) for h in handles], timeout=120)
            dp_size = num_students // 2  # like Megatron PP=2: only the last stage (odd ranks) consumes
            students = [_Student(rank // 2, rank % 2 == 1, h, info["node"])
                        for rank, (h, info) in enumerate(zip(handles, student_nodes))]
            consumer_nodes = [next(s.node_id for s in students if s.dp_rank == dp and s.consumes)
                              for dp in range(dp_size)]
            layout = build_step_layout(samples, dp_size=dp_size, max_tokens_per_micro_batch=64, pad_token_id=0,
                                       step=1)
            keys = _submit(pool, layout, 1, consumer_nodes)
            cfg.teacher.num_replicas = num_teachers
            results, teacher, _ = _run_with_teacher_outputs(students, pool, layout, keys, "train_step", cfg)
            out[mode] = {
                "planned": [s.node_id for s in slots],
                "placed": placed,
                "replica_nodes": [r.node_id for r in pool.replicas],
                "students": [{"dp": s.dp_rank, "consumes": s.consumes, "node": s.node_id, **r}
                             for s, r in zip(students, results)],
                "num_micro_batches": [len(shard) for shard in layout.shards],
            }
            pool.release(k for shard in keys for k in shard)
            pool.shutdown()
            for h in handles + pool.handles():
                ray.kill(h)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


@pytest.mark.slow
def test_two_nodes_by_eight_gpus_place_and_route_as_planned(tmp_path):
    code = ("import json, sys; from tests.distributed.test_placement_simulation import _simulate; "
            "print('RESULT ' + json.dumps(_simulate()))")
    ray_tmp = tempfile.mkdtemp(prefix="kdsim-", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp}
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(lines[-1][len("RESULT "):])
    first, last = out["nodes"]

    for mode in ("separate", "colocated"):
        sim = out[mode]
        # Every actor runs on the node the plan chose, and no two actors of one node got the same whole GPU.
        assert [node for node, _ in sim["placed"]] == sim["planned"]
        # Each shard's refs reach only its consuming ranks, complete and in order.
        for s in sim["students"]:
            if s["consumes"]:
                assert s["rows"] == s["expected_rows"] and len(s["rows"]) == sim["num_micro_batches"][s["dp"]]
            else:
                assert s["rows"] == []

    sep = out["separate"]
    # teacher replicas and the rollout worker on one node, the student on the other
    assert sep["planned"] == [first] * 7 + [last] * 8 + [first]
    for node in (first, last):
        gpus = [g for (n, ids) in sep["placed"] for g in ids if n == node]
        assert len(gpus) == len(set(gpus)) == 8
    assert all(s["node"] == last for s in sep["students"])
    assert all(rn == first for s in sep["students"] for rn in s["replica_nodes"])

    col = out["colocated"]
    assert sorted(col["replica_nodes"]) == sorted([first, first, last, last])
    # Colocated: every shard was computed by a replica on its consumer's node (loads are even here).
    for s in col["students"]:
        assert all(rn == s["node"] for rn in s["replica_nodes"]), s
