"""Bearer tokens: their format, how they are stored, and who a presented token is.

A token reads ``llmesh_<id>_<secret>``: ``id`` is 12 hex characters that name the record (it is
what ``llmesh tokens list`` and the audit log show), ``secret`` is 32 random bytes in URL-safe
base64. Only ``sha256(secret)`` is stored. A fast hash is enough here, unlike for passwords: the
secret has 256 bits of entropy, so there is nothing to guess and no dictionary to slow down;
the comparison is constant-time (:func:`hmac.compare_digest`).

Records (:class:`TokenRecord`, JSON) live in etcd under ``{ns}/tokens/{id}`` (written by
``llmesh tokens create``, which needs etcd access, i.e. operator rights) or in a JSON file for
processes without etcd access (a replica process reads the file its node agent keeps
current). :class:`TokenTable` is what a server checks against; :mod:`llmesh.common.auth_store`
keeps it current.

Roles: ``admin`` may call everything, ``user`` inference and read-only calls; a record may
also limit the models a token may use. The RPC → role table is
:mod:`llmesh.common.auth_policy`; the server interceptor is
:mod:`llmesh.common.auth_interceptor`.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from llmesh.common.errors import PermissionDenied, Unauthenticated

ROLE_ADMIN = "admin"
ROLE_USER = "user"
ROLES = (ROLE_ADMIN, ROLE_USER)

#: Environment variable a server reads to require tokens ("1", "true", "yes").
AUTH_ENV = "LLMESH_AUTH"
#: Environment variable the SDK and the CLI read the caller's token from.
TOKEN_ENV = "LLMESH_TOKEN"
#: The gRPC metadata key a token travels in, as ``Bearer <token>``.
METADATA_KEY = "authorization"

_PREFIX = "llmesh"
_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_TOKEN_RE = re.compile(r"^llmesh_([0-9a-f]{12})_([A-Za-z0-9_-]{20,})$")


def auth_from_env(value: bool | None = None) -> bool:
    """Whether a server requires tokens: ``value`` when given, else ``LLMESH_AUTH``."""
    if value is not None:
        return value
    return os.environ.get(AUTH_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def hash_secret(secret: str) -> str:
    """The stored form of a token's secret: SHA-256, hex (see the module docstring for why)."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    """One token as stored: never the secret itself.

    Attributes:
        id: 12 hex characters, the public part of the token.
        name: who or what holds it (free text, shown in the audit log).
        role: ``admin`` or ``user``.
        models: models the token may use; empty means every model.
        secret_sha256: hex SHA-256 of the secret.
        created: Unix time of creation.
    """

    id: str
    name: str
    role: str
    models: tuple[str, ...] = ()
    secret_sha256: str = ""
    created: float = 0.0

    def to_json(self) -> bytes:
        """The record as compact JSON (its etcd value and its line in a token file)."""
        return json.dumps(
            {
                "id": self.id,
                "name": self.name,
                "role": self.role,
                "models": list(self.models),
                "secret_sha256": self.secret_sha256,
                "created": self.created,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> TokenRecord:
        """Parse a record; raises ValueError when a field is missing or wrong."""
        record = cls(
            id=str(raw["id"]),
            name=str(raw.get("name", "")),
            role=str(raw["role"]),
            models=tuple(str(m) for m in raw.get("models", ()) or ()),  # type: ignore[union-attr]
            secret_sha256=str(raw["secret_sha256"]),
            created=float(raw.get("created", 0.0)),  # type: ignore[arg-type]
        )
        record.validate()
        return record

    @classmethod
    def from_json(cls, data: bytes | str) -> TokenRecord:
        """Parse :meth:`to_json`'s output."""
        return cls.from_dict(json.loads(data))

    def validate(self) -> None:
        """Raise ValueError unless the record is well formed."""
        if not _ID_RE.match(self.id):
            raise ValueError(f"token id {self.id!r} must be 12 lowercase hex characters")
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {', '.join(ROLES)}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.secret_sha256):
            raise ValueError(f"token {self.id}: secret_sha256 must be 64 hex characters")


def new_token(
    name: str, role: str, models: Iterable[str] = (), *, now: float | None = None
) -> tuple[str, TokenRecord]:
    """A fresh token and the record to store for it.

    Args:
        name: who holds it.
        role: ``admin`` or ``user``.
        models: the models it may use; empty for all.
        now: creation time (default: now).

    Returns:
        ``(token, record)``; the token is shown once and never stored.
    """
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    record = TokenRecord(
        id=token_id,
        name=name,
        role=role,
        models=tuple(sorted({m.strip() for m in models if m.strip()})),
        secret_sha256=hash_secret(secret),
        created=time.time() if now is None else now,
    )
    record.validate()
    return f"{_PREFIX}_{token_id}_{secret}", record


def parse_token(token: str) -> tuple[str, str]:
    """Split ``llmesh_<id>_<secret>`` into ``(id, secret)``.

    Raises:
        Unauthenticated: the text is not an llmesh token.
    """
    match = _TOKEN_RE.match(token.strip())
    if match is None:
        raise Unauthenticated(
            "the bearer token is not an llmesh token (expected llmesh_<id>_<secret>); "
            "pass the token `llmesh tokens create` printed"
        )
    return match.group(1), match.group(2)


def bearer_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token in an ``authorization: Bearer <token>`` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() != METADATA_KEY:
            continue
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


@dataclass(frozen=True)
class Principal:
    """Who made a call: the record of the token it carried.

    Attributes:
        id: the token id.
        name: the token's holder.
        role: ``admin`` or ``user``.
        models: models the token may use; empty means every model.
        token: the bearer token as presented (forwarded on calls made for this caller).
        table: the table that vouched for the token (None for a principal made by hand).
        version: that table's version when it vouched; a later version means the record may
            have been revoked or changed, so :func:`check_caller` looks it up again.
    """

    id: str
    name: str
    role: str
    models: tuple[str, ...] = ()
    token: str = field(default="", repr=False)
    table: TokenTable | None = field(default=None, repr=False, compare=False)
    version: int = field(default=-1, repr=False, compare=False)

    @property
    def who(self) -> str:
        """``name (id)``: how the audit log and error messages name the caller."""
        return f"{self.name} ({self.id})" if self.name else self.id

    def may_use(self, model: str) -> bool:
        """Whether the token's model scope includes ``model``."""
        return not self.models or model in self.models


class TokenTable:
    """The token records a server checks bearer tokens against (thread-safe, replaced whole).

    Args:
        records: the initial records.
    """

    def __init__(self, records: Iterable[TokenRecord] = ()) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, TokenRecord] = {r.id: r for r in records}
        self.version = 0

    def replace(self, records: Iterable[TokenRecord]) -> None:
        """Swap in a complete set of records (a revoked token is one that is gone)."""
        new = {r.id: r for r in records}
        with self._lock:
            self._records = new
            self.version += 1

    def put(self, record: TokenRecord) -> None:
        """Add or replace one record."""
        with self._lock:
            self._records = {**self._records, record.id: record}
            self.version += 1

    def remove(self, token_id: str) -> None:
        """Forget one record."""
        with self._lock:
            self._records = {k: v for k, v in self._records.items() if k != token_id}
            self.version += 1

    def records(self) -> list[TokenRecord]:
        """Every record, by id."""
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.id)

    def verify(self, token: str | None) -> Principal:
        """The principal a bearer token stands for.

        Raises:
            Unauthenticated: no token, not an llmesh token, unknown or revoked, wrong secret.
        """
        if not token:
            raise Unauthenticated(
                "this server requires a bearer token and the call carried none; set "
                f"{TOKEN_ENV} or pass --token (SDK: ByzerLLM(token=...)); an operator creates "
                "one with `llmesh tokens create`"
            )
        token_id, secret = parse_token(token)
        with self._lock:
            record = self._records.get(token_id)
            # Read with the record, so a change that lands right after makes the next
            # check_caller() look again rather than trust a stale answer.
            version = self.version
        # Compare even for an unknown id, so timing does not tell which ids exist.
        expected = record.secret_sha256 if record is not None else "0" * 64
        matches = hmac.compare_digest(hash_secret(secret), expected)
        if record is None or not matches:
            raise Unauthenticated(
                f"token {token_id} is unknown, revoked or wrong; ask an operator for a valid "
                "one (`llmesh tokens list` shows the live ones)"
            )
        return Principal(record.id, record.name, record.role, record.models, token, self, version)

    def refresh(self, principal: Principal) -> Principal:
        """``principal`` as the table sees it now: itself when nothing changed since it was
        resolved, else its record looked up again (new role or models apply from here on).

        Raises:
            Unauthenticated: the token was revoked (or its record replaced) meanwhile.
        """
        if principal.version == self.version:
            return principal
        try:
            return self.verify(principal.token)
        except Unauthenticated:
            raise Unauthenticated(
                f"token {principal.who} was revoked while this stream was open; ask an "
                "operator for a valid token and open a new stream with it"
            ) from None


# The caller of the RPC being served; set by the server interceptor around the handler, so the
# servicer's own tasks (created inside the handler) see it too.
_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "llmesh_principal", default=None
)


def current_principal() -> Principal | None:
    """The caller of the RPC being served, or None when the server does not check tokens."""
    return _current.get()


def set_current_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    """Make ``principal`` the current caller (the interceptor does this; tests may too)."""
    return _current.set(principal)


def reset_current_principal(token: contextvars.Token[Principal | None]) -> None:
    """Undo :func:`set_current_principal`."""
    _current.reset(token)


def check_caller() -> Principal | None:
    """The current caller, looked up again when the token table changed since it was resolved.

    Long-lived streams (a ChatSession the SDK keeps open, Watch streams) were authenticated once
    at open; servicers and the interceptor call this per request or message so a revoked token
    stops working on streams it already opened too. Cheap when nothing changed (one integer
    comparison). Returns None when the server does not check tokens.

    Raises:
        Unauthenticated: the caller's token was revoked since the stream opened.
    """
    principal = _current.get()
    if principal is None or principal.table is None:
        return principal
    fresh = principal.table.refresh(principal)
    if fresh is not principal:
        _current.set(fresh)  # this task's context only; saves the next lookup
    return fresh


def check_model(model: str) -> None:
    """Raise unless the current caller's token is still valid and may use ``model``.

    Servicers call this where a model name arrives inside a streamed request (ChatSession,
    Chat); unary requests are checked by the interceptor. A no-op when tokens are off.

    Raises:
        Unauthenticated: the token was revoked since the stream opened.
        PermissionDenied: the token is limited to other models.
    """
    principal = check_caller()
    if principal is None or principal.may_use(model):
        return
    raise PermissionDenied(
        f"token {principal.who} may use only {', '.join(principal.models)}, not model "
        f"{model!r}; ask an operator for a token that includes it"
    )


def scoped_caller() -> Principal | None:
    """The current caller when its token is limited to some models, else None.

    Reads that list several models (ListModels, ListWorkers, GetModelMeta's adapters) show a
    scoped token only its own; None means show everything (no tokens, or an unscoped one).
    """
    principal = _current.get()
    return principal if principal is not None and principal.models else None


def check_unscoped(what: str) -> None:
    """Raise PermissionDenied when the caller's token is limited to some models.

    For reads whose records name no deployed model a scope could match (training jobs name
    paths), so only tokens without a model list may see them.

    Raises:
        PermissionDenied: the token has a model list.
    """
    principal = scoped_caller()
    if principal is None:
        return
    raise PermissionDenied(
        f"token {principal.who} is limited to models {', '.join(principal.models)} and {what} "
        "belong to no model, so only tokens without a model list may read them; ask an "
        "operator for such a token"
    )


def forward_metadata() -> list[tuple[str, str]]:
    """The current caller's ``authorization`` entry, for calls a server makes on its behalf.

    The control plane relays ``WatchTrainingJob`` from the trainer worker with the caller's own
    token, so the worker checks the same rights and no internal super-token exists.
    """
    principal = _current.get()
    if principal is None or not principal.token:
        return []
    return [(METADATA_KEY, f"Bearer {principal.token}")]
