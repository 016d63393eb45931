"""The node agent's side of bearer tokens: its own check, and its replicas' token file.

Replica processes have no etcd access, yet must check the same tokens. The agent follows the
records in etcd (:class:`~llmesh.common.auth_store.EtcdTokenFollower`) and rewrites
``run_dir/tokens.json`` (mode 0600) on every change; each replica re-reads it within half a
second (:class:`~llmesh.common.auth_store.TokenFileFollower`). A file rather than a
``ReplicaService`` call because a replica must check tokens from its first request on, before
the agent's control stream is up, and keeps the last records if the agent stalls.

The agent's own calls to its replicas (``WatchReplica``, ``Drain``, adapter loads) carry an admin
token that the agent makes at start and keeps in memory: its record is in the replicas' file
only, never in etcd, so it is valid nowhere else and dies with the agent.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llmesh.common.auth import ROLE_ADMIN, TokenRecord, TokenTable, new_token
from llmesh.common.auth_interceptor import Authenticator
from llmesh.common.auth_store import (
    EtcdTokenFollower,
    TokenFileFollower,
    token_follower,
    write_token_file,
)
from llmesh.common.etcd import EtcdKV
from llmesh.common.etcd_keys import Keys
from llmesh.common.etcd_security import EtcdSecurity

log = logging.getLogger(__name__)


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

    async def start(self, worker_id: str, token_file: Path) -> None:
        """Make the agent's own token, read the records and start following them."""
        self.agent_token, self._agent_record = new_token(f"node-agent {worker_id}", ROLE_ADMIN)
        self.token_file = token_file
        token_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._follower = token_follower(
            self.table,
            kv=self.kv,
            keys=self.keys,
            token_file=self.source_file,
            on_change=self._write_file,
        )
        await self._follower.start()

    def _write_file(self, table: TokenTable) -> None:
        assert self.token_file is not None and self._agent_record is not None
        try:
            write_token_file(self.token_file, [*table.records(), self._agent_record])
        except OSError as exc:
            log.error("cannot write the replicas' token file %s: %s", self.token_file, exc)

    async def close(self) -> None:
        """Stop following the records."""
        if self._follower is not None:
            await self._follower.stop()
        await self.kv.close()
