"""Placement plans are a pure function of the node inventory: checked here for cluster shapes no CI machine has."""

from __future__ import annotations

import pytest

from kdscale.controller.placement import NodeInfo, plan_placement

A, B, C = "a" * 56, "b" * 56, "c" * 56  # Ray node ids are 28-byte hex strings
TWO_BY_EIGHT = [NodeInfo(A, "10.0.0.1", 8), NodeInfo(B, "10.0.0.2", 8)]


def _nodes_of(slots):
    return [s.node_id for s in slots]


def test_separate_puts_the_teacher_on_the_first_node_and_the_student_on_the_last():
    plan = plan_placement(TWO_BY_EIGHT, num_teachers=8, teacher_gpus=1, num_students=8, student_gpus=1)
    assert plan.mode == "separate"
    assert _nodes_of(plan.teachers) == [A] * 8
    assert _nodes_of(plan.students) == [B] * 8
    assert all(s.num_gpus == 1 for s in plan.teachers + plan.students)
    options = plan.actor_options(plan.students[3])
    assert options["num_gpus"] == 1
    assert options["scheduling_strategy"].node_id == B and options["scheduling_strategy"].soft is False
    assert "10.0.0.1 (8 GPUs): teacher replicas [0, 1, 2, 3, 4, 5, 6, 7]" in plan.describe(TWO_BY_EIGHT)


def test_multi_gpu_teacher_replicas_stay_within_one_node():
    nodes = TWO_BY_EIGHT + [NodeInfo(C, "10.0.0.3", 8)]
    plan = plan_placement(nodes, num_teachers=3, teacher_gpus=4, num_students=8, student_gpus=1)
    assert _nodes_of(plan.teachers) == [A, A, B]
    assert _nodes_of(plan.students) == [C] * 8
    with pytest.raises(ValueError, match="needs 16 GPUs on one node"):
        plan_placement(TWO_BY_EIGHT, num_teachers=1, teacher_gpus=16, num_students=0, student_gpus=1,
                       mode="separate")


def test_auto_falls_back_to_colocated_and_spreads_the_replicas():
    plan = plan_placement(TWO_BY_EIGHT, num_teachers=4, teacher_gpus=1, num_students=16, student_gpus=1)
    assert plan.mode == "colocated"
    assert _nodes_of(plan.students) == [B] * 8 + [A] * 8
    assert sorted(_nodes_of(plan.teachers)) == [A, A, B, B]
    assert all(s.num_gpus == 0.5 for s in plan.teachers + plan.students)


def test_errors_show_the_arithmetic_and_the_fix():
    with pytest.raises(ValueError, match=r"8 teacher replica\(s\) x 1 GPU\(s\) \+ 16 student rank\(s\) x 1 GPU = 24 "
                                         r"GPUs but the cluster has 16.*controller.placement=colocated"):
        plan_placement(TWO_BY_EIGHT, num_teachers=8, teacher_gpus=1, num_students=16, student_gpus=1,
                       mode="separate")
    with pytest.raises(ValueError, match="17 ranks but 16 GPUs"):
        plan_placement(TWO_BY_EIGHT, num_teachers=1, teacher_gpus=1, num_students=17, student_gpus=1,
                       mode="colocated")
    with pytest.raises(ValueError, match="at most 2"):
        plan_placement(TWO_BY_EIGHT, num_teachers=3, teacher_gpus=1, num_students=2, student_gpus=1,
                       mode="colocated")
    with pytest.raises(ValueError, match="set controller.placement=separate"):
        plan_placement(TWO_BY_EIGHT, num_teachers=1, teacher_gpus=2, num_students=2, student_gpus=1,
                       mode="colocated")


def test_cpu_actors_are_not_pinned():
    plan = plan_placement(TWO_BY_EIGHT, num_teachers=2, teacher_gpus=0, num_students=3, student_gpus=0)
    assert plan.mode == "cpu" and _nodes_of(plan.teachers + plan.students) == [None] * 5
    assert plan.actor_options(plan.students[0]) == {}


def test_the_rollout_worker_has_a_slot_of_its_own():
    # separate: one more whole GPU, after the teacher replicas; counted in the arithmetic of the error
    plan = plan_placement(TWO_BY_EIGHT, num_teachers=7, teacher_gpus=1, num_students=8, student_gpus=1, rollout_gpus=1)
    assert plan.mode == "separate" and plan.rollout.node_id == A and plan.rollout.num_gpus == 1
    assert plan.actor_options(plan.rollout)["scheduling_strategy"].node_id == A
    assert "the rollout worker" in plan.describe(TWO_BY_EIGHT)
    taken = [s.node_id for s in plan.teachers + plan.students + [plan.rollout]]
    assert taken.count(A) == 8 and taken.count(B) == 8  # no GPU given twice
    with pytest.raises(ValueError, match=r"\+ 1 for the rollout worker = 17 GPUs"):
        plan_placement(TWO_BY_EIGHT, num_teachers=8, teacher_gpus=1, num_students=8, student_gpus=1, rollout_gpus=1,
                       mode="separate")
    # auto: 8 + 8 + 1 > 16 GPUs, so colocated; the rollout shares the one student GPU without a teacher replica
    plan = plan_placement(TWO_BY_EIGHT, num_teachers=15, teacher_gpus=1, num_students=16, student_gpus=1,
                          rollout_gpus=1)
    assert plan.mode == "colocated" and plan.rollout.num_gpus == 0.5
    hosts = [s.node_id for s in plan.teachers] + [plan.rollout.node_id]
    assert hosts.count(A) == 8 and hosts.count(B) == 8  # every student GPU shared by exactly one other actor
    with pytest.raises(ValueError, match="lower teacher.num_replicas by one"):
        plan_placement(TWO_BY_EIGHT, num_teachers=16, teacher_gpus=1, num_students=16, student_gpus=1,
                       rollout_gpus=1)
    # CPU: anywhere; off-policy: no rollout slot
    assert plan_placement(TWO_BY_EIGHT, num_teachers=1, teacher_gpus=0, num_students=1, student_gpus=0,
                          rollout_gpus=0).rollout.node_id is None
    assert plan_placement(TWO_BY_EIGHT, num_teachers=1, teacher_gpus=1, num_students=1, student_gpus=1).rollout is None
