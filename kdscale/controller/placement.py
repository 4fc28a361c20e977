"""Placement: which node (and how many GPUs) each teacher replica and student rank gets.

Design:
- ``plan_placement`` is a pure function of the cluster's node inventory and the run's actor counts, so a plan for
  2 nodes x 8 GPUs can be checked on a laptop. The driver turns each slot into Ray actor options: ``num_gpus``
  plus a hard ``NodeAffinitySchedulingStrategy`` to the planned node; Ray picks the GPU inside the node.
- ``separate``: teacher replicas take whole GPUs on the FIRST nodes, student ranks on the LAST nodes (ranks in
  order, so a tensor-parallel group stays on one node when it fits). Nothing shares a GPU.
- ``colocated``: student ranks fill the nodes (from the last), one GPU each, at half a GPU's Ray capacity; teacher
  replicas (one GPU each) take the other half of the students' GPUs, spread evenly over the nodes that host
  students. Real GPU sharing needs an engine that sleeps while the student trains (SGLang); the ``hf`` engine
  simply shares the memory.
- ``auto``: ``separate`` when the GPUs suffice for it, else ``colocated``.
- CPU-only actors (``teacher_gpus == student_gpus == 0``) get no node constraint: Ray spreads them.
- On-policy runs add one rollout worker (``rollout_gpus`` > 0 on GPUs): under ``separate`` it takes whole GPUs
  right after the teacher replicas; under ``colocated`` the free half of a student's GPU that hosts no teacher
  replica (an error if every student GPU already hosts one).

Errors show the arithmetic that failed and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["teacher", "student", "rollout"]


@dataclass(frozen=True)
class NodeInfo:
    """One alive Ray node: its id, address and whole GPUs."""

    node_id: str
    address: str
    num_gpus: int


@dataclass(frozen=True)
class ActorSlot:
    """Where one actor goes: ``node_id`` None means anywhere (CPU actors)."""

    role: Role
    index: int
    node_id: str | None
    num_gpus: float


@dataclass
class PlacementPlan:
    """The slots of every teacher replica and student rank, and the mode that produced them."""

    mode: str  # "cpu" | "separate" | "colocated"
    teachers: list[ActorSlot] = field(default_factory=list)
    students: list[ActorSlot] = field(default_factory=list)
    rollout: ActorSlot | None = None  # on-policy runs: the rollout worker

    def actor_options(self, slot: ActorSlot) -> dict[str, Any]:
        """Ray ``.options(...)`` for the actor of ``slot``."""
        options: dict[str, Any] = {"num_gpus": slot.num_gpus} if slot.num_gpus else {}
        if slot.node_id is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=slot.node_id, soft=False)
        return options

    def describe(self, nodes: list[NodeInfo]) -> str:
        """One line per node: which teacher replicas and student ranks it hosts."""
        rollout = " + the rollout worker" if self.rollout is not None else ""
        if self.mode == "cpu":
            return (f"placement: cpu ({len(self.teachers)} teacher replica(s), {len(self.students)} student rank(s)"
                    f"{rollout})")
        lines = [f"placement: {self.mode}"]
        for node in nodes:
            teachers = [s.index for s in self.teachers if s.node_id == node.node_id]
            students = [s.index for s in self.students if s.node_id == node.node_id]
            here = self.rollout is not None and self.rollout.node_id == node.node_id
            if teachers or students or here:
                lines.append(f"  node {node.address} ({node.num_gpus} GPUs): teacher replicas {teachers or '-'}, "
                             f"student ranks {students or '-'}" + (", the rollout worker" if here else ""))
        return "\n".join(lines)


def cluster_nodes() -> list[NodeInfo]:
    """The alive nodes of the connected Ray cluster, in a stable order (address, then id)."""
    import ray

    nodes = [
        NodeInfo(n["NodeID"], n.get("NodeManagerAddress", "?"), int(n.get("Resources", {}).get("GPU", 0)))
        for n in ray.nodes()
        if n.get("Alive")
    ]
    return sorted(nodes, key=lambda n: (n.address, n.node_id))


def plan_placement(
    nodes: list[NodeInfo],
    *,
    num_teachers: int,
    teacher_gpus: int,
    num_students: int,
    student_gpus: int,
    mode: str = "auto",
    rollout_gpus: int | None = None,
) -> PlacementPlan:
    """Place ``num_teachers`` replicas of ``teacher_gpus`` GPUs and ``num_students`` ranks of ``student_gpus`` GPUs,
    and (on-policy: ``rollout_gpus`` not None) one rollout worker of ``rollout_gpus`` GPUs.

    ``teacher_gpus``/``student_gpus`` are 0 (CPU actors) or whole GPUs per actor (a student rank uses one).
    """
    plan = _place_teachers_and_students(nodes, num_teachers, teacher_gpus, num_students, student_gpus, mode,
                                        rollout_gpus or 0)  # fmt: skip
    if rollout_gpus is not None:
        plan.rollout = _place_rollout(plan, nodes, rollout_gpus)
    return plan


def _place_teachers_and_students(nodes, num_teachers, teacher_gpus, num_students, student_gpus, mode,
                                 rollout_gpus) -> PlacementPlan:  # fmt: skip
    if mode not in ("auto", "separate", "colocated"):
        raise ValueError(f"controller.placement must be auto, separate or colocated, got {mode!r}")
    if teacher_gpus == 0 and student_gpus == 0:
        return PlacementPlan(
            "cpu",
            [ActorSlot("teacher", i, None, 0) for i in range(num_teachers)],
            [ActorSlot("student", r, None, 0) for r in range(num_students)],
        )
    if student_gpus not in (0, 1):
        raise ValueError(f"a student rank uses one GPU (got {student_gpus})")
    total = sum(n.num_gpus for n in nodes)
    need_separate = num_teachers * teacher_gpus + num_students * student_gpus + rollout_gpus
    if mode == "auto":
        mode = "separate" if total >= need_separate or student_gpus == 0 or teacher_gpus == 0 else "colocated"
    if mode == "separate" or student_gpus == 0 or teacher_gpus == 0:
        return _separate(nodes, num_teachers, teacher_gpus, num_students, student_gpus, total, need_separate)
    return _colocated(nodes, num_teachers, teacher_gpus, num_students, total)


def _separate(nodes, num_teachers, teacher_gpus, num_students, student_gpus, total, need) -> PlacementPlan:
    if total < need:
        raise ValueError(
            f"placement 'separate' needs {num_teachers} teacher replica(s) x {teacher_gpus} GPU(s) + "
            f"{num_students} student rank(s) x {student_gpus} GPU"
            + (f" + {need - num_teachers * teacher_gpus - num_students * student_gpus} for the rollout worker"
               if need > num_teachers * teacher_gpus + num_students * student_gpus else "")
            + f" = {need} GPUs but the cluster has {total} "
            f"({', '.join(f'{n.address}: {n.num_gpus}' for n in nodes)}): add nodes, lower teacher.num_replicas, "
            "or set controller.placement=colocated"
        )
    free = {n.node_id: n.num_gpus for n in nodes}
    teachers = []
    for index in range(num_teachers):  # first fit from the first node
        node = _first_fit(nodes, free, teacher_gpus)
        if node is None:
            raise ValueError(
                f"teacher replica {index} needs {teacher_gpus} GPUs on one node, and no node has that many free "
                f"(free GPUs per node: {_free_text(nodes, free)}): use fewer GPUs per replica or bigger nodes"
            )
        free[node] -= teacher_gpus
        teachers.append(ActorSlot("teacher", index, node if teacher_gpus else None, teacher_gpus))
    students = []
    for rank in range(num_students):  # first fit from the last node
        node = _first_fit(list(reversed(nodes)), free, student_gpus)
        if node is None:
            raise ValueError(
                f"student rank {rank} finds no free GPU (free GPUs per node: {_free_text(nodes, free)}): add "
                "nodes or set controller.placement=colocated"
            )
        free[node] -= student_gpus
        students.append(ActorSlot("student", rank, node if student_gpus else None, student_gpus))
    return PlacementPlan("separate", teachers, students)


def _colocated(nodes, num_teachers, teacher_gpus, num_students, total) -> PlacementPlan:
    if teacher_gpus != 1:
        raise ValueError(
            f"placement 'colocated' shares one GPU between a teacher replica and a student rank, so a replica must "
            f"use one GPU (it uses {teacher_gpus}): set controller.placement=separate"
        )
    if num_students > total:
        raise ValueError(
            f"placement 'colocated' needs one GPU per student rank: {num_students} ranks but {total} GPUs "
            f"({', '.join(f'{n.address}: {n.num_gpus}' for n in nodes)}): add nodes or lower the student's size"
        )
    if num_teachers > num_students:
        raise ValueError(
            f"placement 'colocated' puts each teacher replica on a student's GPU: {num_teachers} replicas but "
            f"{num_students} student ranks: lower teacher.num_replicas to at most {num_students} or use 'separate'"
        )
    free = {n.node_id: n.num_gpus for n in nodes}
    students = []
    for rank in range(num_students):
        node = _first_fit(list(reversed(nodes)), free, 1)
        free[node] -= 1
        students.append(ActorSlot("student", rank, node, 0.5))
    hosts = []  # student nodes, one entry per student GPU, interleaved across nodes so replicas spread evenly
    per_node = {n.node_id: [s for s in students if s.node_id == n.node_id] for n in nodes}
    while any(per_node.values()):
        for n in reversed(nodes):
            if per_node[n.node_id]:
                hosts.append(per_node[n.node_id].pop(0).node_id)
    teachers = [ActorSlot("teacher", i, hosts[i], 0.5) for i in range(num_teachers)]
    return PlacementPlan("colocated", teachers, students)


def _place_rollout(plan: PlacementPlan, nodes: list[NodeInfo], gpus: int) -> ActorSlot:
    """The rollout worker's slot in a plan of teachers and students (see the module docstring)."""
    if plan.mode == "cpu" or gpus == 0:
        return ActorSlot("rollout", 0, None, 0)
    if plan.mode == "colocated":
        if gpus != 1:
            raise ValueError(f"placement 'colocated' gives the rollout worker half of one GPU, but it needs {gpus}: "
                             "set controller.placement=separate")
        taken: dict[str, int] = {}
        for teacher in plan.teachers:
            taken[teacher.node_id] = taken.get(teacher.node_id, 0) + 1
        for student in reversed(plan.students):  # a student GPU that no teacher replica shares
            if taken.get(student.node_id, 0) > 0:
                taken[student.node_id] -= 1
                continue
            return ActorSlot("rollout", 0, student.node_id, 0.5)
        raise ValueError(
            f"placement 'colocated' shares each student GPU with at most one other actor, and all "
            f"{len(plan.students)} student GPUs already host one of the {len(plan.teachers)} teacher replicas: "
            "lower teacher.num_replicas by one to make room for the rollout worker, or add GPUs and use 'separate'"
        )
    free = {n.node_id: n.num_gpus for n in nodes}
    for slot in plan.teachers + plan.students:
        if slot.node_id is not None:
            free[slot.node_id] -= int(slot.num_gpus)
    node = _first_fit(nodes, free, gpus)
    if node is None:
        raise ValueError(
            f"the rollout worker needs {gpus} GPU(s) on one node, and no node has that many free after the teacher "
            f"replicas and student ranks (free GPUs per node: {_free_text(nodes, free)}): add a GPU or set "
            "controller.placement=colocated"
        )
    return ActorSlot("rollout", 0, node, gpus)


def _first_fit(nodes: list[NodeInfo], free: dict[str, int], gpus: int) -> str | None:
    for node in nodes:
        if free[node.node_id] >= gpus:
            return node.node_id
    return None


def _free_text(nodes: list[NodeInfo], free: dict[str, int]) -> str:
    return ", ".join(f"{n.address}: {free[n.node_id]}" for n in nodes)
