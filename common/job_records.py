"""Training-job records in etcd: the one compare-and-swap loop both writers use.

The control plane (create, place, cancel, reap) and the trainer worker (RUNNING, progress, the
outcome) both write ``{ns}/jobs/{id}``. Every write goes through :func:`swap_job`: read the
record and its mod_revision, apply a change to a private copy, write only if the mod_revision is
still the one read (else read again and decide again), a bounded number of times. A record in a
final state is never changed, whoever put it there, and no change may make a move
:func:`llmesh.common.job_rules.can_move` refuses: with several control planes and a worker
racing, each outcome is recorded exactly once.

Transport failures surface as :class:`~llmesh.common.errors.Unavailable` (from
:class:`~llmesh.common.etcd.EtcdKV`); callers decide whether to retry (the trainer retries its
writes until etcd is back, so nothing is lost).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from llmesh.common import job_rules as rules
from llmesh.common.errors import FailedPrecondition, Unavailable
from llmesh.common.etcd import Compare, EtcdKV, Op, mod_revision_is, put_op
from llmesh.common.etcd_keys import Keys, decode, encode
from llmesh.v1 import trainer_service_pb2 as tr

__all__ = ["DEFAULT_ATTEMPTS", "Swapped", "read_job", "swap_job"]

#: Lost races before :func:`swap_job` gives up with Unavailable.
DEFAULT_ATTEMPTS = 16

#: Returns the new record from a private copy of the current one, or None to leave it.
Change = Callable[[tr.TrainingJob], tr.TrainingJob | None]
#: Reads the record and its mod_revision; (None, 0) when it does not exist.
Reader = Callable[[], Awaitable[tuple[tr.TrainingJob | None, int]]]
#: More compares and operations for the same transaction, given the new record.
Extra = Callable[[tr.TrainingJob], tuple[Sequence[Compare], Sequence[Op]]]


@dataclass(frozen=True)
class Swapped:
    """What :func:`swap_job` did.

    Args:
        record: the record as it now is (None: it does not exist).
        revision: its mod_revision (for a write: the revision written).
        written: whether this call wrote it.
    """

    record: tr.TrainingJob | None
    revision: int
    written: bool


async def read_job(kv: EtcdKV, keys: Keys, job_id: str) -> tuple[tr.TrainingJob | None, int]:
    """The job's record straight from etcd, with its mod_revision; ``(None, 0)`` if absent.

    Raises:
        Unavailable: etcd is unreachable.
    """
    got = await kv.get(keys.job(job_id))
    if not got.kvs:
        return None, 0
    job = decode(got.kvs[0].value, tr.TrainingJob)
    job.id = job_id
    return job, got.kvs[0].mod_revision


async def swap_job(
    kv: EtcdKV,
    keys: Keys,
    job_id: str,
    change: Change,
    *,
    read: Reader | None = None,
    extra: Extra | None = None,
    after_txn: Callable[[int], Awaitable[None]] | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
) -> Swapped:
    """Compare-and-swap the job record: read, ``change`` a copy, write if unchanged since.

    Args:
        kv: the etcd client the transaction goes through.
        keys: the namespace's key layout.
        job_id: the job.
        change: gets a private copy (re-run after a lost race); returns the new record or None.
        read: where the record and its revision come from (default: etcd, :func:`read_job`);
            the control plane reads its mirror.
        extra: more compares and operations for the same transaction (a placement fence, the
            artifact record).
        after_txn: awaited with each transaction's revision, won or lost (the control plane
            waits for its mirror to reach it, so the next read sees what won).
        attempts: lost races before giving up.

    Raises:
        FailedPrecondition: ``change`` moved the state in a way the job rules refuse.
        Unavailable: etcd is unreachable, or the record changed under every attempt.
    """
    key = keys.job(job_id)
    for _ in range(max(1, attempts)):
        current, revision = await (read() if read is not None else read_job(kv, keys, job_id))
        if current is None:
            return Swapped(None, 0, False)
        if rules.is_final(current.state):
            return Swapped(current, revision, False)  # final is final, whoever wrote it
        new = tr.TrainingJob()
        new.CopyFrom(current)
        new = change(new)
        if new is None:
            return Swapped(current, revision, False)
        if new.state != current.state and not rules.can_move(current.state, new.state):
            raise FailedPrecondition(
                f"training job {job_id} cannot go from {rules.state_name(current.state)} to "
                f"{rules.state_name(new.state)}"
            )
        compare = [mod_revision_is(key, revision)]
        ops = [put_op(key, encode(new))]
        if extra is not None:
            more_compare, more_ops = extra(new)
            compare += more_compare
            ops += more_ops
        response = await kv.txn(compare, ops)
        if after_txn is not None:
            await after_txn(response.header.revision)
        if response.succeeded:
            return Swapped(new, response.header.revision, True)
        # Someone wrote in between (a cancel, a placement, an outcome): read and decide again.
    raise Unavailable(
        f"training job {job_id!r} changed under each of {attempts} attempts to update it; retry"
    )
