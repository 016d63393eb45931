"""etcd's own authentication (user/password tokens) for both of llmesh's etcd clients.

A real etcd with ``auth enable``; the token is renewed when etcd forgets it (a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmesh.common.errors import FailedPrecondition
from llmesh.common.etcd import EtcdKV, WatchEnded, put_op, worker_client
from llmesh.common.etcd_security import EtcdSecurity
from llmesh.common.local_etcd import LocalEtcd

PASSWORD = "s3cret-for-tests"


#: Seconds an unused simple token lives in the short-TTL etcd.
TOKEN_TTL = 2


def _etcdctl(etcd: LocalEtcd, *args: str) -> None:
    ctl = shutil.which("etcdctl")
    if ctl is None:
        pytest.skip("etcdctl is not installed (Debian etcd-client): cannot enable etcd auth")
    env = {**os.environ, "ETCDCTL_API": "3"}
    subprocess.run(
        [ctl, "--endpoints", etcd.endpoint, *args], env=env, check=True, capture_output=True
    )


def _auth_etcd(directory: Path, *extra_args: str) -> LocalEtcd:
    """etcd with a root user and authentication enabled (etcdctl, as an operator does)."""
    if shutil.which("etcdctl") is None:
        pytest.skip("etcdctl is not installed (Debian etcd-client): cannot enable etcd auth")
    etcd = LocalEtcd(directory / "data", log_level="error", extra_args=extra_args)
    etcd.start()
    _etcdctl(etcd, "user", "add", f"root:{PASSWORD}")
    _etcdctl(etcd, "auth", "enable")
    return etcd


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    etcd = _auth_etcd(tmp_path_factory.mktemp("auth-etcd"))
    yield etcd
    etcd.stop()


@pytest.fixture(scope="module")
def short_ttl_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """Authentication on, and simple tokens that expire after TOKEN_TTL idle seconds."""
    etcd = _auth_etcd(tmp_path_factory.mktemp("ttl-etcd"), "--auth-token-ttl", str(TOKEN_TTL))
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
            # A watch first: its new stream carries the token etcd forgot, and etcd refuses it
            # in its first message; the token is dropped, so the caller's retry renews it.
            with pytest.raises(WatchEnded, match="invalid auth token"):
                async with kv.watch(b"/auth/", start_revision=1) as stream:
                    await stream.read()
            async with kv.watch(b"/auth/", start_revision=1) as stream:
                assert len((await stream.read()).events) == 2
            assert (await kv.get(b"/auth/a")).kvs[0].value == b"1"
            assert (await client.get(b"/auth/b")).value == b"2"  # unary: retried at once
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


def test_a_watch_opened_after_the_token_went_stale_still_delivers_events(
    short_ttl_etcd: LocalEtcd,
) -> None:
    """A worker's watches share one long-lived stream that keeps the token it opened with.
    Once etcd has expired that token, a new watch on the stream is refused (created and
    canceled at once); it must fail, not hang silently, and the retry that every watch loop
    does must get a new stream with a fresh token, and events."""
    security = EtcdSecurity(user="root", password=PASSWORD)

    async def run() -> None:
        client = worker_client(short_ttl_etcd.endpoint, security=security)
        first = None
        try:
            await client.put(b"/stale/a", b"1")
            first = await client.watch_prefix(b"/stale/")  # opens the stream with token T1
            await asyncio.sleep(TOKEN_TTL * 2 + 1)  # nothing uses T1: etcd expires it
            with pytest.raises(WatchEnded, match="invalid auth token"):
                await client.watch_prefix(b"/stale/")
            watch = await client.watch_prefix(b"/stale/")  # the watch loop's retry
            try:
                await client.put(b"/stale/b", b"2")
                event = await asyncio.wait_for(watch.__aiter__().__anext__(), 10)
                assert (event.kv.key, event.kv.value) == (b"/stale/b", b"2")
            finally:
                await watch.cancel()
        finally:
            if first is not None:
                with contextlib.suppress(Exception):
                    await first.cancel()
            await client.close()

    asyncio.run(run())


def test_credentials_for_an_etcd_without_authentication_say_so(etcd_server: Any) -> None:
    """etcd without ``auth enable`` answers Authenticate with FAILED_PRECONDITION; llmesh
    reports that as a precondition with what to change, not as an internal error."""
    security = EtcdSecurity(user="root", password=PASSWORD)

    async def read() -> None:
        kv = EtcdKV(etcd_server.endpoint, security=security, timeout=3)
        try:
            await kv.current_revision()
        finally:
            await kv.close()

    with pytest.raises(FailedPrecondition, match=r"authentication disabled.*--etcd-user"):
        asyncio.run(read())
