"""etcd's own authentication (user/password tokens) for both of llmesh's etcd clients.

A real etcd with ``auth enable``; the token is renewed when etcd forgets it (a restart).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from llmesh.common.errors import FailedPrecondition
from llmesh.common.etcd import EtcdKV, WatchEnded, put_op, worker_client
from llmesh.common.etcd_security import EtcdSecurity
from llmesh.common.local_etcd import LocalEtcd

PASSWORD = "s3cret-for-tests"


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """etcd with a root user and authentication enabled (etcdctl, as an operator does)."""
    ctl = shutil.which("etcdctl")
    if ctl is None:
        pytest.skip("etcdctl is not installed (Debian etcd-client): cannot enable etcd auth")
    etcd = LocalEtcd(tmp_path_factory.mktemp("auth-etcd") / "data", log_level="error")
    etcd.start()
    env = {**os.environ, "ETCDCTL_API": "3"}
    for args in (["user", "add", f"root:{PASSWORD}"], ["auth", "enable"]):
        subprocess.run(
            [ctl, "--endpoints", etcd.endpoint, *args], env=env, check=True, capture_output=True
        )
    yield etcd
    etcd.stop()


def test_both_clients_authenticate_and_survive_a_forgotten_token(auth_etcd: LocalEtcd) -> None:
    security = EtcdSecurity(user="root", password=PASSWORD)

    async def run() -> None:
        kv = EtcdKV(auth_etcd.endpoint, security=security)
        client = worker_client(auth_etcd.endpoint, security=security)
        try:
            await kv.txn([], [put_op(b"/auth/a", b"1")])
            await client.put(b"/auth/b", b"2")
            assert (await client.get(b"/auth/a")).value == b"1"
            lease = await client.lease(5)
            await lease.refresh()  # a LeaseKeepAlive stream carries the token too
            async with kv.watch(b"/auth/", start_revision=1) as stream:
                assert len((await stream.read()).events) == 2
            # etcd keeps its simple tokens in memory: after a restart every token is unknown.
            # On this thread: etcd dies with the thread that started it (PR_SET_PDEATHSIG).
            auth_etcd.stop()
            auth_etcd.start()
            assert (await kv.get(b"/auth/a")).kvs[0].value == b"1"  # unary: retried at once
            assert (await client.get(b"/auth/b")).value == b"2"
            try:
                async with kv.watch(b"/auth/", start_revision=1) as stream:
                    await stream.read()
            except WatchEnded:
                pass  # refused for the old token (if no unary call renewed it first)
            async with kv.watch(b"/auth/", start_revision=1) as stream:
                assert len((await stream.read()).events) == 2
        finally:
            await client.close()
            await kv.close()

    asyncio.run(run())


@pytest.mark.parametrize("security", [None, EtcdSecurity(user="root", password="wrong")])
def test_missing_or_wrong_credentials_say_what_to_fix(
    auth_etcd: LocalEtcd, security: EtcdSecurity | None
) -> None:
    async def write() -> None:
        kv = EtcdKV(auth_etcd.endpoint, security=security, timeout=3)
        try:
            await kv.txn([], [put_op(b"/auth/c", b"3")])
        finally:
            await kv.close()

    with pytest.raises(FailedPrecondition, match="--etcd-user / --etcd-password"):
        asyncio.run(write())
