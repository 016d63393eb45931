"""The accelerators a node has."""

from __future__ import annotations


def detect_gpus() -> int:
    """GPUs visible to torch, 0 when torch or CUDA is absent."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch, no GPUs
        return 0
