"""`llmesh up` starts its gateway only on a free port: waiting for "accepts connections" would
otherwise take another server on that port for the gateway (and print its URL)."""

from __future__ import annotations

import socket

from llmesh.cli.servers import _port_free


def test_a_listening_port_is_not_free_and_port_zero_always_is() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert not _port_free(f"127.0.0.1:{port}")
        assert not _port_free(f"0.0.0.0:{port}")  # the wildcard overlaps it too
    assert _port_free(f"127.0.0.1:{port}")  # closed: free again
    assert _port_free("127.0.0.1:0")
