"""The control plane's worker -> models index follows every put and delete of the mirror."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from llmesh.common.etcd_keys import Keys, encode
from llmesh.control_plane.registry import MirrorState, _apply, _Batch, _mirror
from llmesh.v1 import common_pb2

KEYS = Keys("/llmesh-test")


@dataclass
class _KV:
    """The fields of an etcd KeyValue the mirror reads."""

    key: bytes
    value: bytes
    mod_revision: int = 1


def _scan(state: MirrorState, worker_id: str) -> set[str]:
    """The index's answer computed the slow way: every assignment and replica status."""
    names = {m for m, a in state.assignments.items() if any(w == worker_id for w, _ in a)}
    names.update(m for m, r in state.replicas.items() if any(k[0] == worker_id for k in r))
    return names


def test_index_matches_a_full_scan_through_random_puts_and_deletes() -> None:
    rng = random.Random(7)
    state = MirrorState()
    workers = [f"w{i}" for i in range(4)]
    models = [f"m{i}" for i in range(5)]
    for _ in range(3000):
        worker, model, index = rng.choice(workers), rng.choice(models), rng.randrange(3)
        if rng.random() < 0.5:
            key = KEYS.assignment(worker, model, index)
            record = common_pb2.Replica(model=model, index=index, worker_id=worker)
        else:
            generation = rng.randrange(1, 3)
            key = KEYS.replica(model, worker, generation, index)
            record = common_pb2.Replica(model=model, index=index, generation=generation)
        roll = rng.random()
        if roll < 0.05:
            # An index that is not a number: the key is ignored.
            key = key.rsplit(b"/", 1)[0] + b"/x"
        # Deletes of keys that were never written happen too, as after a lost watch event; a
        # value that does not decode drops the entry it replaces.
        value = b"{not json" if roll > 0.95 else encode(record)
        kv = _KV(key, value) if roll < 0.55 or roll > 0.95 else None
        _apply(state, KEYS, key, kv, _Batch())
        for w in workers:
            assert state.models_on_worker(w) == _scan(state, w)
    # Nothing left for a worker means no entry at all, so the index does not grow with churn.
    assert set(state.worker_models) == {w for w in workers if _scan(state, w)}
    assert all(state.worker_models.values())


def test_a_worker_key_change_names_the_models_on_that_worker_only() -> None:
    state = MirrorState()
    for worker, model in (("a", "chat"), ("a", "emb"), ("b", "chat")):
        key = KEYS.assignment(worker, model, 0)
        _apply(state, KEYS, key, _KV(key, encode(common_pb2.Replica())), _Batch())
    batch = _Batch()
    _apply(state, KEYS, KEYS.worker("a"), None, batch)
    assert batch.models == {"chat", "emb"}
    batch = _Batch()
    _apply(state, KEYS, KEYS.worker("b"), None, batch)
    assert batch.models == {"chat"}


def test_an_abandoned_listing_stops_decoding() -> None:
    kvs = []
    for i in range(3000):
        key = KEYS.assignment("w", f"m{i}", 0)
        kvs.append(_KV(key, encode(common_pb2.Replica())))
    assert len(_mirror(KEYS, kvs, threading.Event()).assignments) == 3000
    abandon = threading.Event()
    abandon.set()
    assert not _mirror(KEYS, kvs, abandon).assignments
