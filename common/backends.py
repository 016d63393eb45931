"""The inference backends a deploy may name, shared by the control plane and the workers.

The control plane checks a deploy's backend against this list without importing any engine
(and so without torch); the worker's engine factory maps each name to its engine class.
"""

from __future__ import annotations

ENGINE_BACKENDS: tuple[str, ...] = ("transformers", "embedding", "rerank", "vllm", "deepspeed")
"""Backends served by one engine each."""

BACKENDS: tuple[str, ...] = (*ENGINE_BACKENDS, "auto")
"""Backend names a deploy may ask for; ``auto`` picks one of the others from the model files."""
