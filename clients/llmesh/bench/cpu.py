"""Where the CPU goes during a level: CPU seconds of this process, of vLLM's engine processes and
of the other servers started here, and the load the rest of the machine added meanwhile."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

#: CPU roles: this process (load generator; in ``asyncllm`` also vLLM's frontend), vLLM's engine
#: processes (EngineCore and its workers), and every other process we started (the mesh's
#: worker, control plane and etcd; the OpenAI server).
CPU_ROLES = ("bench", "server", "engine")


@dataclasses.dataclass
class CpuSnapshot:
    """CPU seconds of this process tree by role, and of the whole machine, at one moment."""

    at: float
    roles: dict[str, float]
    machine_busy: float | None


def cpu_snapshot() -> CpuSnapshot:
    """CPU time used so far by this process and, from /proc, by its descendants and by the
    machine as a whole (descendants zero and machine None where there is no /proc)."""
    now = time.perf_counter()
    roles = dict.fromkeys(CPU_ROLES, 0.0)
    # This process exactly (/proc counts in clock ticks, too coarse for short levels).
    roles["bench"] = time.process_time()
    proc = Path("/proc")
    if not proc.is_dir():
        return CpuSnapshot(now, roles, None)
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    info: dict[int, tuple[str, float]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm, _, rest = stat.partition("(")[2].rpartition(")")
        fields = rest.split()
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        info[pid] = (comm, (int(fields[11]) + int(fields[12])) / tick)
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    todo = [me]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        if pid not in info:
            continue
        if pid == me:
            continue
        comm, cpu = info[pid]
        roles["engine" if comm.startswith("VLLM::") else "server"] += cpu
    busy = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        values = [int(v) for v in (proc / "stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(values) - values[3] - values[4]) / tick  # all but idle and iowait
    return CpuSnapshot(now, roles, busy)


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot, output_tokens: int) -> dict[str, Any]:
    """CPU spent between two snapshots: seconds and ms per output token by role, and how many
    cores the rest of the machine kept busy meanwhile (other load skews every number).

    A process that exited in between loses its share; none should during a level.
    """
    wall = after.at - before.at
    used = {r: max(0.0, after.roles[r] - before.roles[r]) for r in CPU_ROLES}
    others = None
    if before.machine_busy is not None and after.machine_busy is not None and wall > 0:
        others = max(0.0, (after.machine_busy - before.machine_busy - sum(used.values())) / wall)
    return {
        "cpu_s": used,
        "cpu_ms_per_token": {
            r: (1000 * v / output_tokens if output_tokens else None) for r, v in used.items()
        },
        "other_load_cores": others,
    }
