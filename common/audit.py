"""The audit log: one entry per admin call (who, what, when, from where, outcome).

Entries go to the server log always and, on servers with etcd access (control plane, trainer
workers), to ``{ns}/audit/{time_ns:020d}-{random}`` (JSON), so keys sort by time and
``llmesh audit`` reads the newest with one range request. Replica processes have no etcd access:
their admin calls (the node agent's drain and adapter loads) are logged only.

Entries are written before the call's answer goes back; a failed write is logged and does not
undo a deploy that already committed.

Only calls by a valid token are entries (admin calls, and admin calls refused to a user
token); calls without a valid token go to the server log only (see
:mod:`llmesh.common.auth_interceptor`), so nobody without a token can write to etcd.

The prefix is bounded by count, not time: each server trims it to the newest
``max_entries`` (default :data:`MAX_ENTRIES`) after every :data:`TRIM_EVERY`-th entry it writes
(one count-only read, and when over, one keys-only read and one range delete). A count, not a
lease TTL, because a flood of calls by a valid token would grow etcd without limit within any
TTL; the newest entries are the ones an investigation reads first. Between trims the prefix may
exceed the bound by up to ``TRIM_EVERY`` entries per server.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from aetcd import rpc
from aetcd.utils import prefix_range_end
from google.protobuf.message import Message

from llmesh.common.etcd import EtcdKV, put_op
from llmesh.common.etcd_keys import Keys

log = logging.getLogger("llmesh.audit")

_MAX_STRING = 200
#: Audit entries kept in etcd (the newest); older ones are deleted by the periodic trim.
MAX_ENTRIES = 10_000
#: A server trims the audit prefix after every this many entries it writes.
TRIM_EVERY = 100
_MAX_FIELDS = 40


@dataclass
class AuditEntry:
    """One admin call.

    Attributes:
        time: Unix time the call ended.
        who: the token's name and id, or why there was none.
        token_id: the token id ("" when none was valid).
        role: the token's role ("" when none was valid).
        method: the full RPC name.
        request: the request's fields that say what was asked (strings cut at 200 chars).
        peer: where the call came from (gRPC peer string).
        code: the outcome's status code name (``OK``, ``PERMISSION_DENIED``, ...).
        message: the status message, empty on success.
        server: which server recorded it.
    """

    time: float
    who: str
    token_id: str
    role: str
    method: str
    request: dict[str, Any] = field(default_factory=dict)
    peer: str = ""
    code: str = "OK"
    message: str = ""
    server: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> AuditEntry:
        raw = json.loads(data)
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)


def _scalar(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= _MAX_STRING else value[:_MAX_STRING] + "…"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return value


def summarize(request: Any) -> dict[str, Any]:
    """What a request asked for: its set scalar fields, one level of nested messages.

    Enough to say which model, job or worker an admin call was about, without copying large
    values (strings are cut; repeated fields give their length).
    """
    if not isinstance(request, Message):
        return {}
    out: dict[str, Any] = {}
    for desc, value in request.ListFields()[:_MAX_FIELDS]:
        if desc.is_repeated:
            out[desc.name] = f"<{len(value)} items>"
        elif desc.message_type is not None:
            out[desc.name] = {
                d.name: (f"<{len(v)} items>" if d.is_repeated else _scalar(v))
                for d, v in value.ListFields()[:_MAX_FIELDS]
                if d.message_type is None or d.is_repeated
            }
        else:
            out[desc.name] = _scalar(value)
    return out


class AuditLog:
    """Where a server records admin calls.

    Args:
        kv: etcd, or None to log only (replica processes).
        keys: the namespace's key layout.
        server: this server's name in each entry (e.g. ``control-plane``, ``trainer w1``).
        timeout: seconds an etcd write may take before it is given up (and logged).
        max_entries: entries kept in etcd, the newest (see the module docstring).
        trim_every: trim after every this many entries written here.
    """

    def __init__(
        self,
        kv: EtcdKV | None,
        keys: Keys,
        *,
        server: str = "",
        timeout: float = 2.0,
        max_entries: int = MAX_ENTRIES,
        trim_every: int = TRIM_EVERY,
    ) -> None:
        self.kv = kv
        self.keys = keys
        self.server = server
        self.timeout = timeout
        self.max_entries = max_entries
        self.trim_every = max(1, trim_every)
        # Starts at the threshold: the first entry a server writes trims what earlier runs left.
        self._since_trim = self.trim_every - 1

    async def record(self, entry: AuditEntry) -> None:
        """Log the entry and append it in etcd (failures are logged, never raised)."""
        entry.server = entry.server or self.server
        log.info(
            "audit: %s called %s from %s: %s%s %s",
            entry.who,
            entry.method,
            entry.peer,
            entry.code,
            f" ({entry.message})" if entry.message else "",
            json.dumps(entry.request, sort_keys=True),
        )
        if self.kv is None:
            return
        key = self.keys.audit_entry(time.time_ns(), secrets.token_hex(3))
        try:
            await self.kv.txn([], [put_op(key, entry.to_json())], timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - the call's own outcome stands
            log.warning("audit entry for %s could not be written to etcd: %s", entry.method, exc)
            return
        self._since_trim += 1
        if self._since_trim >= self.trim_every:
            self._since_trim = 0
            try:
                await self.trim()
            except Exception as exc:  # noqa: BLE001 - retried after the next TRIM_EVERY entries
                log.warning("could not trim the audit log in etcd: %s", exc)

    async def trim(self) -> int:
        """Delete all but the newest ``max_entries`` entries; returns how many were deleted."""
        assert self.kv is not None
        prefix = self.keys.audit
        end = prefix_range_end(prefix)
        count = rpc.RequestOp(
            request_range=rpc.RangeRequest(key=prefix, range_end=end, count_only=True)
        )
        response = await self.kv.txn([], [count], timeout=self.timeout)
        total = response.responses[0].response_range.count
        if total <= self.max_entries:
            return 0
        # The newest entry to delete: keys sort by time, so it and all below it are older
        # than the max_entries kept.
        newest_first = rpc.RangeRequest(
            key=prefix,
            range_end=end,
            limit=self.max_entries + 1,
            keys_only=True,
            sort_order=rpc.RangeRequest.DESCEND,
            sort_target=rpc.RangeRequest.KEY,
        )
        response = await self.kv.txn(
            [], [rpc.RequestOp(request_range=newest_first)], timeout=self.timeout
        )
        kvs = response.responses[0].response_range.kvs
        if len(kvs) <= self.max_entries:
            return 0
        cut = kvs[-1].key + b"\0"  # range_end is exclusive: delete up to and including it
        delete = rpc.RequestOp(
            request_delete_range=rpc.DeleteRangeRequest(key=prefix, range_end=cut)
        )
        response = await self.kv.txn([], [delete], timeout=self.timeout)
        return response.responses[0].response_delete_range.deleted


async def read_audit(kv: EtcdKV, keys: Keys, *, limit: int = 50) -> list[AuditEntry]:
    """The newest ``limit`` audit entries (0: all), oldest first."""
    response = await kv.range_prefix(keys.audit, limit=limit, newest_first=True)
    entries = []
    for item in response.kvs:
        try:
            entries.append(AuditEntry.from_json(item.value))
        except (ValueError, TypeError) as exc:
            log.warning("skipping unreadable audit entry %s: %s", item.key, exc)
    entries.reverse()
    return entries
