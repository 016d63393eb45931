"""An etcd server as a child process: `llmesh up` runs one, and so does the test suite."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from llmesh.common.process import free_port, guarded, stop_child
from llmesh.common.tls import TlsConfig


class LocalEtcd:
    """A single-member etcd on free loopback ports with its own data dir.

    ``stop()`` then ``start()`` brings it back on the same ports with the same data, which is
    how tests play an etcd outage. The child dies with this process (PR_SET_PDEATHSIG) and
    runs in its own session, so a terminal's Ctrl-C reaches only the parent.

    Args:
        data_dir: etcd's data directory; its log goes to ``data_dir`` + ".log".
        log_level: etcd's --log-level.
        tls: serve clients over TLS with this certificate and key; with
            ``require_client_cert`` etcd demands client certificates signed by its ``ca``
            (``--client-cert-auth``). The same pair is the health probe's client certificate.
        extra_args: more etcd flags (e.g. ``--auth-token-ttl``).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        log_level: str = "warn",
        tls: TlsConfig | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if tls is not None and tls.cert is None:
            raise ValueError("a TLS etcd needs a certificate and key (tls.cert, tls.key)")
        self.tls = tls
        self.extra_args = list(extra_args)
        self.data_dir = data_dir
        self.log_path = data_dir.with_name(data_dir.name + ".log")
        self.log_level = log_level
        self.port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        """Start etcd and return once it answers /health."""
        etcd = shutil.which("etcd") or "/usr/bin/etcd"
        if not os.path.exists(etcd):
            raise FileNotFoundError(
                "etcd is not installed; run `sudo apt-get install etcd-server` "
                "or pass --etcd HOST:PORT to use a running one"
            )
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        scheme = "https" if self.tls is not None else "http"
        url = f"{scheme}://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls_args: list[str] = []
        if self.tls is not None:
            tls_args += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key)]
            if self.tls.ca is not None:
                tls_args += ["--trusted-ca-file", str(self.tls.ca)]
            if self.tls.require_client_cert:
                tls_args.append("--client-cert-auth")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                guarded(
                    [
                        etcd,
                        *("--name", "llmesh", "--data-dir", str(self.data_dir)),
                        *("--listen-client-urls", url, "--advertise-client-urls", url),
                        *("--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer),
                        *("--initial-cluster", f"llmesh={peer}", "--log-level", self.log_level),
                        *tls_args,
                        *self.extra_args,
                    ]
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_healthy(url, timeout)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(
            cafile=str(self.tls.ca) if self.tls.ca is not None else None
        )
        context.load_cert_chain(str(self.tls.cert), str(self.tls.key))
        return context

    def _wait_healthy(self, url: str, timeout: float) -> None:
        context = self._ssl_context()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with code {self.proc.returncode}; see {self.log_path}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1, context=context) as resp:
                    if json.load(resp).get("health") == "true":
                        return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"etcd at {url} was not healthy within {timeout:.0f}s")

    def stop(self) -> None:
        stop_child(self.proc, 10)
