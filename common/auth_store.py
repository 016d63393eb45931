"""Where token records live, and how a server's :class:`TokenTable` stays current.

* etcd (``{ns}/tokens/{id}``): :class:`EtcdTokens` creates, lists and revokes records;
  :class:`EtcdTokenFollower` keeps a table current with one watch, so a revoke reaches every
  server with etcd access within the watch's delivery time (milliseconds; after an etcd outage,
  within about a second of it coming back: the follower lists and watches again every second).
  While etcd is unreachable a server keeps the last records it saw.
* a JSON file: for processes without etcd access. :func:`write_token_file` replaces it
  atomically; :class:`TokenFileFollower` re-reads it when it changes (polled every
  ``interval`` seconds, 0.5 by default). The node agent writes one for its replica processes
  (its etcd records plus its own internal admin token), so a revoke reaches a replica within
  about half a second after it reaches the agent. An operator may also keep the records in a
  file of their own (``llmesh tokens ... --file``) and start servers with ``--token-file``
  (``LLMESH_TOKEN_FILE``) instead of giving them the token records in etcd.

Unreadable records: in etcd, a record that does not parse counts as absent (fail closed: an
overwrite with garbage revokes). A token file that cannot be read or parsed as a whole keeps
the last table: failing closed there would lock every caller out, operators included (their
only way back would be a restart), over a half-edited file. The follower retries every poll
and logs at error level: once per distinct error, then a reminder every
``TokenFileFollower.REMIND`` seconds while the file stays broken, so a revoke that cannot apply
is loud without a line per poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from aetcd import rpc

from llmesh.common.auth import TokenRecord, TokenTable
from llmesh.common.errors import NotFound
from llmesh.common.etcd import EtcdKV, WatchCompacted, WatchEnded, absent, delete_op, put_op
from llmesh.common.etcd_keys import Keys

log = logging.getLogger(__name__)


def _parse(data: bytes, key: bytes) -> TokenRecord | None:
    try:
        return TokenRecord.from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable token record %s: %s", key.decode(errors="replace"), exc)
        return None


class EtcdTokens:
    """Token records in etcd (what ``llmesh tokens`` and ``llmesh up --auth`` use).

    Args:
        kv: etcd.
        keys: the namespace's key layout.
    """

    def __init__(self, kv: EtcdKV, keys: Keys) -> None:
        self.kv = kv
        self.keys = keys

    async def add(self, record: TokenRecord) -> None:
        """Store a new record (ids are random; an existing id is refused, not overwritten)."""
        record.validate()
        key = self.keys.token(record.id)
        response = await self.kv.txn([absent(key)], [put_op(key, record.to_json())])
        if not response.succeeded:
            raise ValueError(f"token id {record.id} exists already; create the token again")

    async def list(self) -> list[TokenRecord]:
        """Every record, by id."""
        response = await self.kv.range_prefix(self.keys.tokens)
        records = [_parse(item.value, item.key) for item in response.kvs]
        return sorted((r for r in records if r is not None), key=lambda r: r.id)

    async def revoke(self, token_id: str) -> None:
        """Delete a record; servers stop accepting its token once their watch delivers it.

        Raises:
            NotFound: no token has that id.
        """
        await self.revoke_many([token_id])

    async def revoke_many(self, token_ids: Sequence[str]) -> None:
        """Delete several records in one transaction: all of them, or none when one is unknown.

        Raises:
            NotFound: some ids name no token (nothing was deleted).
        """
        keys = [self.keys.token(token_id) for token_id in dict.fromkeys(token_ids)]
        exist = [
            rpc.Compare(key=k, result=rpc.Compare.GREATER, target=rpc.Compare.VERSION, version=0)
            for k in keys
        ]
        response = await self.kv.txn(exist, [delete_op(k) for k in keys])
        if response.succeeded:
            return
        have = {r.key for r in (await self.kv.range_prefix(self.keys.tokens)).kvs}
        unknown = [
            tid for tid, k in zip(dict.fromkeys(token_ids), keys, strict=True) if k not in have
        ]
        raise NotFound(
            f"no token has id {', '.join(unknown) or ', '.join(token_ids)}, so none was revoked; "
            "`llmesh tokens list` shows the ids"
        )


class EtcdTokenFollower:
    """Keeps a :class:`TokenTable` equal to the records in etcd.

    Args:
        kv: etcd.
        keys: the namespace's key layout.
        table: the table to keep current.
        extra: records that are not in etcd but must stay in the table (none so far).
        on_change: called after each change with the table (the node agent rewrites its
            replicas' token file there).
        retry: seconds between attempts after etcd failed.
    """

    def __init__(
        self,
        kv: EtcdKV,
        keys: Keys,
        table: TokenTable,
        *,
        on_change: object = None,
        retry: float = 1.0,
    ) -> None:
        self.kv = kv
        self.keys = keys
        self.table = table
        self.on_change = on_change
        self.retry = retry
        self._task: asyncio.Task[None] | None = None
        self._records: dict[bytes, TokenRecord] = {}

    async def load(self) -> int:
        """Read every record once; returns the revision read at."""
        response = await self.kv.range_prefix(self.keys.tokens)
        self._records = {}
        for item in response.kvs:
            record = _parse(item.value, item.key)
            if record is not None:
                self._records[item.key] = record
        self._publish()
        return response.header.revision

    def _publish(self) -> None:
        self.table.replace(self._records.values())
        if callable(self.on_change):
            self.on_change(self.table)

    async def start(self) -> None:
        """Load the records (raises when etcd is unreachable), then follow them."""
        revision = await self.load()
        self._task = asyncio.create_task(self._run(revision), name="token-follower")

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, revision: int) -> None:
        while True:
            try:
                async with self.kv.watch(self.keys.tokens, start_revision=revision + 1) as stream:
                    while True:
                        response = await stream.read()
                        for event in response.events:
                            key = event.kv.key
                            if event.type == event.DELETE:
                                self._records.pop(key, None)
                            else:
                                record = _parse(event.kv.value, key)
                                if record is not None:
                                    self._records[key] = record
                                else:
                                    # Fail closed: a record overwritten with something
                                    # unreadable no longer vouches for its old token.
                                    self._records.pop(key, None)
                        if response.events:
                            self._publish()
                        revision = max(revision, response.header.revision)
            except asyncio.CancelledError:
                raise
            except (WatchCompacted, WatchEnded, Exception) as exc:  # noqa: BLE001 - retried
                log.info("token watch ended (%s); reading the tokens again", exc)
            while True:
                await asyncio.sleep(self.retry)
                try:
                    revision = await self.load()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - keep the last records; retry
                    log.warning("cannot read tokens from etcd (%s); keeping the last ones", exc)


def write_token_file(path: str | Path, records: Iterable[TokenRecord]) -> None:
    """Write ``records`` to a token file atomically, readable by its owner only.

    A temporary file of a unique name in the same directory (mode 0600), synced to disk, then
    renamed over the file: a reader sees the old records or the new ones, never a part, and
    two writers never share a temporary file.
    """
    path = Path(path)
    body = json.dumps(
        {"tokens": [json.loads(r.to_json()) for r in records]}, indent=1, sort_keys=True
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def update_token_file(
    path: str | Path, change: Callable[[list[TokenRecord]], list[TokenRecord]]
) -> list[TokenRecord]:
    """Read, change and write a token file under an exclusive lock; returns the new records.

    The lock (``flock`` on ``<file>.lock`` next to it) makes concurrent ``llmesh tokens
    ... --file`` runs take turns, so none loses another's change.
    """
    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        records = change(read_token_file(path))
        write_token_file(path, records)
        return records
    finally:
        os.close(fd)  # releases the lock


def read_token_file(path: str | Path) -> list[TokenRecord]:
    """The records in a token file (a missing file holds none).

    Raises:
        ValueError: the file is not a token file.
    """
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return []
    except json.JSONDecodeError as exc:
        raise ValueError(f"token file {path} is not JSON: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("tokens"), list):
        raise ValueError(f'token file {path} must hold {{"tokens": [...]}}')
    return [TokenRecord.from_dict(item) for item in raw["tokens"]]


class TokenFileFollower:
    """Keeps a :class:`TokenTable` equal to a token file, re-read when it changes.

    Args:
        path: the file.
        table: the table to keep current.
        interval: seconds between checks of the file's modification time and size.
        on_change: called with the table after each change.
    """

    def __init__(
        self,
        path: str | Path,
        table: TokenTable,
        *,
        interval: float = 0.5,
        on_change: object = None,
    ) -> None:
        self.path = Path(path)
        self.table = table
        self.interval = interval
        self.on_change = on_change
        self._seen: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: str | None = None  # the last failure, while the file stays broken
        self._error_logged = 0.0

    #: Seconds between reminders that the token file is still unreadable.
    REMIND = 30.0

    def load(self) -> None:
        """Read the file now if it changed since the last read (or the last read failed).

        Never raises: any failure keeps the last table and is logged (see the module
        docstring), so a broken file cannot stop the follower and with it every later revoke.
        """
        try:
            try:
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except FileNotFoundError:
                stamp = (0, 0, 0)
            if stamp == self._seen and self._error is None:
                return
            self.table.replace(read_token_file(self.path))
        except Exception as exc:  # noqa: BLE001 - any failure: keep the last table, retry
            self._failed(exc)
            return
        if self._error is not None:
            log.warning("token file %s is readable again; its tokens apply now", self.path)
            self._error = None
        self._seen = stamp
        if callable(self.on_change):
            self.on_change(self.table)

    def _failed(self, exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if text == self._error and now - self._error_logged < self.REMIND:
            return
        self._error, self._error_logged = text, now
        log.error(
            "cannot read token file %s (%s); keeping the last %d tokens, so revokes made in "
            "it do not apply until it is fixed; fix or rewrite it (`llmesh tokens ... --file`)",
            self.path,
            text,
            len(self.table.records()),
        )

    async def start(self) -> None:
        """Read the file, then follow it in the background."""
        self.load()
        self._task = asyncio.create_task(self._run(), name="token-file-follower")

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.load()
            except Exception:
                log.exception("following token file %s failed; still following it", self.path)


TOKEN_FILE_ENV = "LLMESH_TOKEN_FILE"


def token_file_from_env(path: str | Path | None = None) -> Path | None:
    """``path`` when given, else ``LLMESH_TOKEN_FILE``; None means the records in etcd."""
    value = str(path) if path else os.environ.get(TOKEN_FILE_ENV, "").strip()
    return Path(value).expanduser() if value else None


def token_follower(
    table: TokenTable,
    *,
    kv: EtcdKV,
    keys: Keys,
    token_file: str | Path | None = None,
    on_change: object = None,
) -> EtcdTokenFollower | TokenFileFollower:
    """What keeps a server's table current: the token file when one is named, else etcd."""
    path = token_file_from_env(token_file)
    if path is not None:
        return TokenFileFollower(path, table, on_change=on_change)
    return EtcdTokenFollower(kv, keys, table, on_change=on_change)
