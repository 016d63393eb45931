"""The audit log: one entry per admin call (who, what, when, from where, outcome).

Entries go to the server log always and, on servers with etcd access (control plane, trainer
workers), to ``{ns}/audit/{time_ns:020d}-{random}`` (JSON), so keys sort by time and
``llmesh audit`` reads the newest with one range request. Replica processes have no etcd access:
their admin calls (the node agent's drain and adapter loads) are logged only.

Entries are written before the call's answer goes back; a failed write is logged and does not
undo a deploy that already committed.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from google.protobuf.message import Message

from llmesh.common.etcd import EtcdKV, put_op
from llmesh.common.etcd_keys import Keys

log = logging.getLogger("llmesh.audit")

_MAX_STRING = 200
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
    """

    def __init__(
        self, kv: EtcdKV | None, keys: Keys, *, server: str = "", timeout: float = 2.0
    ) -> None:
        self.kv = kv
        self.keys = keys
        self.server = server
        self.timeout = timeout

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
