"""Selector: pins, affinity and policies over Replica messages."""

from __future__ import annotations

import random

import pytest

from llmesh.common.errors import FailedPrecondition, InvalidArgument, NotFound
from llmesh.common.routing import RouteDecision, Selector, parse_policy
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp

READY = common_pb2.REPLICA_STATE_READY


def replica(index: int, *, state: int = READY, inflight: int = 0) -> common_pb2.Replica:
    return common_pb2.Replica(
        model="m",
        index=index,
        worker_id=f"w{index}",
        state=state,
        inflight=inflight,
        max_concurrency=8,
    )


def test_least_loaded_counts_local_assignments_until_the_replica_publishes() -> None:
    selector = Selector(rng=random.Random(0))
    replicas = [replica(0, inflight=3), replica(1, inflight=0)]
    picks = []
    for _ in range(4):
        chosen = selector.select("m", replicas)
        selector.started(chosen)
        picks.append(chosen.index)
    assert picks[:3] == [1, 1, 1]  # 0+3 local ties 3 published, then both are picked
    # Replica 1 publishes a count that includes what was sent; the local count starts over.
    selector.observed(replicas[1])
    assert selector.local_inflight.get(("m", "w1", 1)) is None
    assert selector.select("m", [replica(0, inflight=3), replica(1, inflight=1)]).index == 1


def test_round_robin_and_random() -> None:
    selector = Selector(rng=random.Random(1))
    replicas = [replica(0), replica(1), replica(2, state=common_pb2.REPLICA_STATE_LOADING)]
    rr = [
        selector.select("m", replicas, policy=cp.LOAD_BALANCE_POLICY_ROUND_ROBIN).index
        for _ in range(4)
    ]
    assert rr == [0, 1, 0, 1]
    picks = {
        selector.select("m", replicas, policy=cp.LOAD_BALANCE_POLICY_RANDOM).index
        for _ in range(50)
    }
    assert picks == {0, 1}


def test_pins_and_affinity() -> None:
    selector = Selector()
    replicas = [replica(0), replica(1)]
    assert selector.select("m", replicas, pinned_replica=1).index == 1
    pins = {"tokenizer": 0}
    assert (
        selector.select("m", replicas, purpose=cp.PURPOSE_TOKENIZER, purpose_pins=pins).index == 0
    )
    home = selector.select("m", replicas, affinity_key="k").index
    assert all(selector.select("m", replicas, affinity_key="k").index == home for _ in range(5))
    assert selector.select("m", [replicas[1 - home]], affinity_key="k").index == 1 - home


def test_errors() -> None:
    selector = Selector()
    with pytest.raises(NotFound):
        selector.select("m", [])
    loading = [replica(0, state=common_pb2.REPLICA_STATE_LOADING)]
    with pytest.raises(FailedPrecondition, match="no READY replica"):
        selector.select("m", loading)
    with pytest.raises(FailedPrecondition, match="replica 3"):
        selector.select("m", [replica(0)], pinned_replica=3)
    with pytest.raises(InvalidArgument):
        parse_policy("fastest")
    assert parse_policy("lru") == cp.LOAD_BALANCE_POLICY_LEAST_LOADED


# -- the routing decision (recorded only when the caller passes one: tracing) ---------------


@pytest.mark.parametrize(
    ("kwargs", "rule", "chosen"),
    [
        ({}, "least-loaded", 1),
        ({"pinned_replica": 0}, "pinned", 0),
        ({"purpose_pins": {"chat": 2}}, "pinned", 2),
        ({"affinity_key": "user-7"}, "affinity", None),
        ({"policy": cp.LOAD_BALANCE_POLICY_ROUND_ROBIN}, "round-robin", 0),
        ({"policy": cp.LOAD_BALANCE_POLICY_RANDOM}, "random", None),
    ],
)
def test_decision_names_the_rule_the_candidates_and_the_choice(
    kwargs: dict, rule: str, chosen: int | None
) -> None:
    replicas = [
        replica(0, inflight=3),
        replica(1, inflight=1),
        replica(2, inflight=2),
        replica(3, state=common_pb2.REPLICA_STATE_LOADING),
    ]
    decision = RouteDecision()
    picked = Selector(rng=random.Random(0)).select("m", replicas, decision=decision, **kwargs)
    assert decision.rule == rule
    policy = kwargs.get("policy", cp.LOAD_BALANCE_POLICY_LEAST_LOADED)
    assert (
        decision.policy
        == {
            cp.LOAD_BALANCE_POLICY_LEAST_LOADED: "least-loaded",
            cp.LOAD_BALANCE_POLICY_ROUND_ROBIN: "round-robin",
            cp.LOAD_BALANCE_POLICY_RANDOM: "random",
        }[policy]
    )
    # Only READY replicas are candidates, each with the load the selector compared.
    assert decision.candidates == ["w0/0 load=3/8", "w1/1 load=1/8", "w2/2 load=2/8"]
    assert (decision.replica, decision.worker) == (picked.index, picked.worker_id)
    if chosen is not None:
        assert picked.index == chosen


def test_no_decision_records_nothing_and_picks_the_same() -> None:
    replicas = [replica(0, inflight=3), replica(1, inflight=1)]
    a = Selector(rng=random.Random(5)).select("m", replicas)
    b = Selector(rng=random.Random(5)).select("m", replicas, decision=RouteDecision())
    assert a.index == b.index == 1


def test_a_reused_decision_keeps_nothing_from_the_earlier_pick() -> None:
    """A retry reuses the request's decision; a pick that fills only some fields (the control
    plane's answer names no candidates) must not carry the earlier pick's."""
    decision = RouteDecision()
    Selector().select("m", [replica(0), replica(1)], decision=decision)
    assert decision.candidates and decision.policy
    decision.reset()
    assert decision == RouteDecision()
