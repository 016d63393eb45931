"""Choosing one READY replica for a request: pins, affinity and load-balance policies.

Shared by the control plane's AssignWorker and the SDK's local route cache, so both pick the
same way. Pure functions over ``Replica`` messages plus a little per-caller state.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from llmesh.common.errors import FailedPrecondition, InvalidArgument, NotFound
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp

Policy = int  # llmesh.v1.LoadBalancePolicy value

PURPOSE_NAMES: dict[int, str] = {
    cp.PURPOSE_UNSPECIFIED: "chat",
    cp.PURPOSE_CHAT: "chat",
    cp.PURPOSE_EMBEDDING: "embedding",
    cp.PURPOSE_RERANK: "rerank",
    cp.PURPOSE_TOKENIZER: "tokenizer",
    cp.PURPOSE_APPLY_CHAT_TEMPLATE: "apply_chat_template",
    cp.PURPOSE_META: "meta",
}

POLICY_NAMES: dict[str, int] = {
    "lru": cp.LOAD_BALANCE_POLICY_LEAST_LOADED,  # Byzer-LLM's default name for it
    "least_loaded": cp.LOAD_BALANCE_POLICY_LEAST_LOADED,
    "least-loaded": cp.LOAD_BALANCE_POLICY_LEAST_LOADED,
    "round_robin": cp.LOAD_BALANCE_POLICY_ROUND_ROBIN,
    "round-robin": cp.LOAD_BALANCE_POLICY_ROUND_ROBIN,
    "random": cp.LOAD_BALANCE_POLICY_RANDOM,
}


def parse_policy(name: str | int | None) -> int:
    """Accept a policy enum value or a name ("least_loaded", "round_robin", "random", "lru")."""
    if name is None or name == "":
        return cp.LOAD_BALANCE_POLICY_LEAST_LOADED
    if isinstance(name, int):
        return name or cp.LOAD_BALANCE_POLICY_LEAST_LOADED
    try:
        return POLICY_NAMES[name.strip().lower()]
    except KeyError:
        raise InvalidArgument(
            f"unknown load-balance policy {name!r}; use one of least_loaded, round_robin, random"
        ) from None


#: Policy values as the routing decision names them.
_POLICY_RULES: dict[int, str] = {
    cp.LOAD_BALANCE_POLICY_UNSPECIFIED: "least-loaded",
    cp.LOAD_BALANCE_POLICY_LEAST_LOADED: "least-loaded",
    cp.LOAD_BALANCE_POLICY_ROUND_ROBIN: "round-robin",
    cp.LOAD_BALANCE_POLICY_RANDOM: "random",
}


@dataclass(slots=True)
class RouteDecision:
    """Why a replica was chosen, filled in by :meth:`Selector.select` when a caller passes
    one (the SDK does so only while tracing, so the hot path allocates nothing).

    Attributes:
        policy: the load-balance policy asked for (``least-loaded``, ``round-robin``,
            ``random``).
        rule: what decided: ``pinned``, ``affinity``, the policy's name, or ``control-plane``
            when the SDK had no routes cached and asked ``AssignWorker``.
        candidates: the READY replicas considered, as ``worker/index load=L/max``.
        replica: the index chosen.
        worker: the chosen replica's worker.
        address: the chosen replica's address.
    """

    policy: str = ""
    rule: str = ""
    candidates: list[str] = field(default_factory=list)
    replica: int = -1
    worker: str = ""
    address: str = ""

    def reset(self) -> None:
        """Forget an earlier pick (a retry reuses the object): nothing stale is recorded."""
        self.policy, self.rule, self.candidates = "", "", []
        self.replica, self.worker, self.address = -1, "", ""

    def chose(self, replica: common_pb2.Replica) -> None:
        """Record the replica chosen."""
        self.replica, self.worker, self.address = replica.index, replica.worker_id, replica.address


class Selector:
    """Picks replicas; holds the round-robin counters and the caller's own in-flight counts.

    Args:
        rng: random source for ties and the random policy.
        own_counts: the caller reports every request's end (:meth:`finished`), so its local
            count is exact: a replica's load is the larger of its published count and the
            caller's own in-flight requests on it (the SDK). Without it (the control plane,
            which never sees requests end) the local count holds what was sent since the
            replica last published, and a new published count starts it over.
    """

    def __init__(self, *, rng: random.Random | None = None, own_counts: bool = False) -> None:
        self._rr: dict[str, itertools.count[int]] = {}
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self.own_counts = own_counts
        # Requests this selector sent to each replica (see own_counts for which ones).
        self.local_inflight: dict[tuple[str, str, int], int] = {}

    def select(
        self,
        model: str,
        replicas: Sequence[common_pb2.Replica],
        *,
        purpose: int = cp.PURPOSE_CHAT,
        policy: int = cp.LOAD_BALANCE_POLICY_LEAST_LOADED,
        pinned_replica: int | None = None,
        purpose_pins: Mapping[str, int] | None = None,
        affinity_key: str = "",
        start: bool = False,
        decision: RouteDecision | None = None,
    ) -> common_pb2.Replica:
        """Choose one READY replica of ``model`` or raise a clear error.

        Order of precedence: an explicit replica pin, a pin by purpose, an affinity key, then
        the policy.

        Args:
            start: count the request on the chosen replica (as :meth:`started`) in the same
                step as the choice, so concurrent picks see each other: a burst of N over R
                equal replicas lands within one of N/R on each.
            decision: filled in with why the replica was chosen (for tracing); None records
                nothing.
        """
        with self._lock:
            chosen = self._choose(
                model,
                replicas,
                purpose=purpose,
                policy=policy,
                pinned_replica=pinned_replica,
                purpose_pins=purpose_pins,
                affinity_key=affinity_key,
                decision=decision,
            )
            if start:
                self._count(chosen)
        if decision is not None:
            decision.chose(chosen)
        return chosen

    def _choose(
        self,
        model: str,
        replicas: Sequence[common_pb2.Replica],
        *,
        purpose: int,
        policy: int,
        pinned_replica: int | None,
        purpose_pins: Mapping[str, int] | None,
        affinity_key: str,
        decision: RouteDecision | None = None,
    ) -> common_pb2.Replica:
        # Called with the lock held.
        if not replicas:
            raise NotFound(
                f"model {model!r} has no replicas; deploy it first (llmesh deploy --model {model})"
            )
        ready = sorted(
            (r for r in replicas if r.state == common_pb2.REPLICA_STATE_READY),
            key=lambda r: r.index,
        )
        if pinned_replica is None and purpose_pins:
            pin = purpose_pins.get(PURPOSE_NAMES.get(purpose, "chat"))
            if pin is not None:
                pinned_replica = pin
        if decision is not None:
            decision.policy = _POLICY_RULES.get(policy, str(policy))
            decision.candidates = [
                f"{r.worker_id}/{r.index} load={self._load(r)}/{r.max_concurrency}" for r in ready
            ]
        if pinned_replica is not None:
            if decision is not None:
                decision.rule = "pinned"
            for r in ready:
                if r.index == pinned_replica:
                    return r
            indexes = sorted({r.index for r in replicas})
            raise FailedPrecondition(
                f"replica {pinned_replica} of model {model!r} is not READY "
                f"(replicas: {indexes}); pin another index or wait for it to load"
            )
        if not ready:
            states = ", ".join(
                f"{r.index}:{common_pb2.ReplicaState.Name(r.state).removeprefix('REPLICA_STATE_')}"
                + (f" ({r.reason})" if r.reason else "")
                for r in replicas
            )
            raise FailedPrecondition(
                f"model {model!r} has no READY replica yet ({states}); wait for it to load"
            )
        if decision is not None:
            decision.rule = "affinity" if affinity_key else decision.policy
        if affinity_key:
            return max(ready, key=lambda r: _hrw(affinity_key, r))
        if policy == cp.LOAD_BALANCE_POLICY_ROUND_ROBIN:
            n = next(self._rr.setdefault(model, itertools.count()))
            return ready[n % len(ready)]
        if policy == cp.LOAD_BALANCE_POLICY_RANDOM:
            return self._rng.choice(ready)
        if policy not in (cp.LOAD_BALANCE_POLICY_LEAST_LOADED, cp.LOAD_BALANCE_POLICY_UNSPECIFIED):
            raise InvalidArgument(f"unknown load-balance policy value {policy}")
        # Ties go to a random replica so a burst does not pile onto index 0.
        return min(
            ready,
            key=lambda r: (self._load(r) / max(r.max_concurrency, 1), self._rng.random()),
        )

    def _load(self, r: common_pb2.Replica) -> int:
        # Requests waiting in the replica's admission queue are load too.
        local = self.local_inflight.get(_ident(r), 0)
        return r.queued + (max(r.inflight, local) if self.own_counts else r.inflight + local)

    def _count(self, r: common_pb2.Replica) -> None:
        key = _ident(r)
        self.local_inflight[key] = self.local_inflight.get(key, 0) + 1

    def started(self, r: common_pb2.Replica) -> None:
        """Count a request sent to ``r`` until :meth:`finished` (for least-loaded)."""
        with self._lock:
            self._count(r)

    def observed(self, r: common_pb2.Replica) -> None:
        """``r`` published a new in-flight count, which includes what was sent to it so far.

        Without ``own_counts`` the local count starts over; with it the local count is exact
        and stays.
        """
        if self.own_counts:
            return
        with self._lock:
            self.local_inflight.pop(_ident(r), None)

    def finished(self, r: common_pb2.Replica) -> None:
        with self._lock:
            key = _ident(r)
            n = self.local_inflight.get(key, 0) - 1
            if n > 0:
                self.local_inflight[key] = n
            else:
                self.local_inflight.pop(key, None)


def _ident(r: common_pb2.Replica) -> tuple[str, str, int]:
    return (r.model, r.worker_id, r.index)


def _hrw(key: str, r: common_pb2.Replica) -> int:
    """Rendezvous hash: a key keeps its replica for as long as that replica stays READY."""
    digest = hashlib.blake2b(f"{key}|{r.worker_id}|{r.index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
