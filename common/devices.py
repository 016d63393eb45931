"""The accelerators a node has: detected with nvidia-smi or torch, or declared by the operator."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence

from llmesh.common.errors import InvalidArgument
from llmesh.v1 import control_plane_service_pb2 as cp

log = logging.getLogger(__name__)


def _nvidia_smi() -> list[cp.Device] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed (%s); asking torch for GPUs instead", exc)
        return None
    devices = []
    for line in out.strip().splitlines():
        index, name, mem_mib = (part.strip() for part in line.split(",", 2))
        memory = int(float(mem_mib) * 1024 * 1024) if mem_mib.replace(".", "").isdigit() else 0
        devices.append(cp.Device(id=index, name=name, memory_bytes=memory))
    return devices


def _torch() -> list[cp.Device]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [
            cp.Device(
                id=str(i),
                name=torch.cuda.get_device_name(i),
                memory_bytes=int(torch.cuda.get_device_properties(i).total_memory),
            )
            for i in range(torch.cuda.device_count())
        ]
    except Exception:  # noqa: BLE001 - no torch, no GPUs
        return []


def detect_devices() -> list[cp.Device]:
    """This machine's GPUs, by nvidia-smi when it is installed, else by torch; [] when none.

    Ids are nvidia-smi's (PCI bus order; replica processes get ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
    so the same ids mean the same GPUs). When this process was itself given a
    ``CUDA_VISIBLE_DEVICES`` list of ids (a Slurm or container allocation), only those count.
    """
    allowed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [p.strip() for p in (allowed or "").split(",") if p.strip()]
    numbered = allowed is not None and all(i.isdigit() for i in ids)
    found = _nvidia_smi()
    if found is None:
        found = _torch()
        if numbered:
            # torch numbers the GPUs it sees from 0; name them by the ids they were given.
            for device, real in zip(found, ids, strict=False):
                device.id = real
        return found
    if numbered:
        found = [d for d in found if d.id in set(ids)]
    return found


def detect_gpus() -> int:
    """How many GPUs this machine has."""
    return len(detect_devices())


def node_devices(
    *, gpus: float | None = None, gpu_ids: Sequence[str] | None = None
) -> list[cp.Device]:
    """The devices a worker registers: declared ids, a declared count, or what is detected.

    Args:
        gpus: a declared count; ids "0".."N-1".
        gpu_ids: declared ids (e.g. ``["0", "2"]``); wins over ``gpus``.

    Raises:
        InvalidArgument: a negative or fractional count, or repeated ids.
    """
    if gpu_ids is None and gpus is None:
        return detect_devices()
    if gpu_ids is not None:
        ids = [str(i).strip() for i in gpu_ids if str(i).strip()]
        if len(set(ids)) != len(ids):
            raise InvalidArgument(f"--gpu-ids {','.join(ids)} repeats an id; name each GPU once")
    else:
        assert gpus is not None
        if gpus < 0 or int(gpus) != gpus:
            raise InvalidArgument(f"--gpus {gpus:g} must be a whole number of GPUs, 0 or more")
        ids = [str(i) for i in range(int(gpus))]
    # Detection, when it finds the same ids, adds names and memory to the declaration.
    known = {d.id: d for d in detect_devices()} if ids else {}
    return [
        cp.Device(id=i, name=known[i].name, memory_bytes=known[i].memory_bytes)
        if i in known
        else cp.Device(id=i)
        for i in ids
    ]
