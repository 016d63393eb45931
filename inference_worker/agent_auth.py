"""The node agent's side of bearer tokens: its own check, and its replicas' token file.

Replica processes have no etcd access, yet must check the same tokens. The agent follows the
records in etcd (:class:`~llmesh.common.auth_store.EtcdTokenFollower`) and rewrites
``run_dir/auth/tokens.json`` (mode 0600, in a directory of mode 0700 that the agent owns; it
refuses to start when an existing one is another user's or group/world-writable, since whoever
can write there can swap the file for their own tokens) on every change. A failed write is
retried every second until one succeeds (the replicas keep the last file meanwhile); each
replica re-reads it within half a second
(:class:`~llmesh.common.auth_store.TokenFileFollower`). A file rather than a ``ReplicaService``
call because a replica must check tokens from its first request on, before the agent's control
stream is up, and keeps the last records if the agent stalls.

The agent's own calls to its replicas (``WatchReplica``, ``Drain``, adapter loads) carry an admin
token that the agent makes at start and keeps in memory: its record is in the replicas' file
only, never in etcd, so it is valid nowhere else and dies with the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from pathlib import Path

from llmesh.common.auth import ROLE_ADMIN, TokenRecord, TokenTable, new_token
from llmesh.common.auth_interceptor import Authenticator
from llmesh.common.auth_store import (
    EtcdTokenFollower,
    TokenFileFollower,
    token_follower,
    write_token_file,
)
from llmesh.common.errors import FailedPrecondition
from llmesh.common.etcd import EtcdKV
from llmesh.common.etcd_keys import Keys
from llmesh.common.etcd_security import EtcdSecurity

log = logging.getLogger(__name__)

#: Seconds between retries of a failed write of the replicas' token file.
RETRY_WRITE_S = 1.0


def private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or check that an existing one is private enough.

    Raises:
        FailedPrecondition: it exists but is not a directory we own, or is group or
            world-writable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise FailedPrecondition(
            f"{path} must be a directory for the replicas' token file and is not (a symbolic "
            "link or a file); remove it or give the worker another --run-dir"
        )
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise FailedPrecondition(
            f"{path} holds the replicas' token file but is owned by uid {st.st_uid} with mode "
            f"{stat.S_IMODE(st.st_mode):o}; it must be ours (uid {os.getuid()}) and writable by "
            f"us only: run `chmod 700 {path}` (or remove it), or give the worker another run dir"
        )


class AgentAuth:
    """Token checks for one node agent and the token file of its replica processes.

    Args:
        etcd: etcd endpoint host:port (None: ``LLMESH_ETCD``).
        namespace: the etcd key namespace.
        source_file: follow this token file instead of etcd (None: ``LLMESH_TOKEN_FILE``,
            else etcd).
        etcd_security: TLS and user/password for etcd.
    """

    def __init__(
        self,
        etcd: str | None,
        namespace: str,
        source_file: str | None = None,
        etcd_security: EtcdSecurity | None = None,
    ) -> None:
        self.source_file = source_file
        self.kv = EtcdKV(etcd, security=etcd_security)
        self.keys = Keys(namespace)
        self.table = TokenTable()
        #: The check the agent's own server runs (health and reflection only live there).
        self.authenticator = Authenticator(self.table)
        self.token_file: Path | None = None
        self.agent_token: str | None = None
        self._agent_record: TokenRecord | None = None
        self._follower: EtcdTokenFollower | TokenFileFollower | None = None
        self._retry: asyncio.Task[None] | None = None

    async def start(self, worker_id: str, token_file: Path) -> None:
        """Make the agent's own token, read the records and start following them.

        Args:
            worker_id: this worker (names the agent's token).
            token_file: where the replicas' token file goes; its directory must be private
                (created 0700 here when missing).

        Raises:
            FailedPrecondition: the token file's directory is not private (see
                :func:`private_dir`).
        """
        private_dir(token_file.parent)
        self.agent_token, self._agent_record = new_token(f"node-agent {worker_id}", ROLE_ADMIN)
        self.token_file = token_file
        self._follower = token_follower(
            self.table,
            kv=self.kv,
            keys=self.keys,
            token_file=self.source_file,
            on_change=self._write_file,
        )
        await self._follower.start()

    def _write_file(self, table: TokenTable) -> None:
        if not self._try_write() and (self._retry is None or self._retry.done()):
            # Retried until it succeeds: a revoke that never reaches the replicas' file would
            # leave the token working there.
            self._retry = asyncio.create_task(self._retry_writes(), name="token-file-retry")

    def _try_write(self) -> bool:
        assert self.token_file is not None and self._agent_record is not None
        try:
            write_token_file(self.token_file, [*self.table.records(), self._agent_record])
        except OSError as exc:
            log.error(
                "cannot write the replicas' token file %s (%s); retrying every %.0f s, the "
                "replicas keep the previous tokens meanwhile",
                self.token_file,
                exc,
                RETRY_WRITE_S,
            )
            return False
        return True

    async def _retry_writes(self) -> None:
        while True:
            await asyncio.sleep(RETRY_WRITE_S)
            if self._try_write():  # the table as it is now: later changes included
                log.info("wrote the replicas' token file %s after failures", self.token_file)
                return

    async def close(self) -> None:
        """Stop following the records."""
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
        if self._follower is not None:
            await self._follower.stop()
        await self.kv.close()
