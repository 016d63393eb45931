"""Process helpers shared by every llmesh process: children that die with their parent, ports.

``python -m llmesh.common.process PARENT_PID CMD [ARGS...]`` runs CMD so that it gets SIGTERM
when PARENT_PID dies. `llmesh up` starts etcd and the workers through this launcher instead of
a ``preexec_fn``: running Python between fork and exec in a process that already has gRPC
threads can crash the child, while this launcher is a fresh process. PR_SET_PDEATHSIG survives
``exec``, so CMD gets SIGTERM when PARENT_PID dies, even by SIGKILL, and nothing outlives it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def guarded(cmd: list[str]) -> list[str]:
    """Wrap a command so it gets SIGTERM when this process dies (see the module docstring)."""
    return [sys.executable, "-m", "llmesh.common.process", str(os.getpid()), *cmd]


def stop_child(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (PR_SET_PDEATHSIG).

    Processes started by a supervisor (training ranks, replica processes) call this first
    thing: if the parent is killed, even by SIGKILL, they go too instead of running on as
    orphans. Exits at once when the parent is already gone.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(PR_SET_PDEATHSIG, sig)
    # The parent died before prctl took effect (we were already re-parented).
    if parent == 1 or os.getppid() != parent:
        os._exit(1)


def main() -> None:
    parent, cmd = int(sys.argv[1]), sys.argv[2:]
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
