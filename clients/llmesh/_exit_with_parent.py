"""``python -m llmesh._exit_with_parent PARENT_PID CMD [ARGS...]``: run CMD, killed with PARENT.

`llmesh up` starts etcd and the workers through this launcher instead of a ``preexec_fn``:
running Python between fork and exec in a process that already has gRPC threads can crash
the child, while this launcher is a fresh process. PR_SET_PDEATHSIG survives ``exec``, so CMD
gets SIGTERM when PARENT_PID dies, even by SIGKILL, and nothing outlives ``llmesh up``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, cmd = int(sys.argv[1]), sys.argv[2:]
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
