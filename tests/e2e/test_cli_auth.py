"""The operator's path through tokens, as a user types it: ``llmesh up`` with
``LLMESH_AUTH=1`` prints an admin token (revoked when it stops); ``llmesh tokens`` creates,
lists and revokes; client commands take ``--token`` or ``LLMESH_TOKEN``; ``llmesh audit`` shows
who did what."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest

from llmesh.common.process import free_port


def llmesh(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LANG": "en_US.UTF-8"}
    env.pop("LLMESH_TOKEN", None)
    if token is not None:
        env["LLMESH_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "llmesh", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_up_auth_tokens_and_audit(spawn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"127.0.0.1:{free_port()}"
    # The variable, not --auth: `up` must honour LLMESH_AUTH like every server does.
    monkeypatch.setenv("LLMESH_AUTH", "1")
    up = spawn("up", "--listen", address, "--workers", "0", name="up")
    up.wait_output("ready (Ctrl-C stops everything)", timeout=120)
    out = up.output()
    admin = re.search(r"admin token (llmesh_[0-9a-f]{12}_\S+)", out).group(1)  # type: ignore[union-attr]
    etcd = re.search(r"etcd\s+(\S+) \(data in", out).group(1)  # type: ignore[union-attr]
    cp = ("--control_plane", address)

    denied = llmesh("models", *cp)
    assert denied.returncode == 1 and "requires a bearer token" in denied.stderr
    assert llmesh("models", *cp, "--token", admin).returncode == 0
    assert llmesh("models", *cp, token=admin).returncode == 0

    created = llmesh(
        "tokens",
        "create",
        "--role",
        "user",
        "--name",
        "ci",
        "--model",
        "chat",
        "--quiet",
        "--etcd",
        etcd,
    )
    assert created.returncode == 0, created.stderr
    user = created.stdout.strip()
    user_id = user.split("_")[1]
    listing = llmesh("tokens", "list", "--etcd", etcd)
    assert listing.returncode == 0 and user_id in listing.stdout and "chat" in listing.stdout
    assert user.split("_", 2)[2] not in listing.stdout  # never the secret

    refused = llmesh("undeploy", *cp, "--model", "chat", token=user)
    assert refused.returncode == 1 and "needs an admin token" in refused.stderr
    assert llmesh("models", *cp, token=user).returncode == 0

    assert llmesh("tokens", "revoke", user_id, "--etcd", etcd).returncode == 0
    deadline = time.monotonic() + 5
    while llmesh("models", *cp, token=user).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = llmesh("models", *cp, token=user)
    assert gone.returncode == 1 and "unknown, revoked or wrong" in gone.stderr
    missing = llmesh("tokens", "revoke", user_id, "--etcd", etcd)
    assert missing.returncode == 1 and "no token has id" in missing.stderr

    audit = llmesh("audit", "--etcd", etcd, "--limit", "10")
    assert audit.returncode == 0, audit.stderr
    lines = audit.stdout.splitlines()
    assert lines[0].split()[:3] == ["WHEN", "WHO", "WHAT"]
    refusal = next(x for x in lines if "UndeployModel" in x)
    assert f"ci ({user_id})" in refusal and "PERMISSION_DENIED" in refusal and "chat" in refusal
    assert up.stop() == 0
    assert f"revoked admin token {admin.split('_')[1]}" in up.output(), up.output()
