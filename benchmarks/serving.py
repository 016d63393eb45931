"""Serving benchmark: in-process vLLM AsyncLLM vs the mesh vs `vllm serve`, same load.

A thin wrapper around ``llmesh bench`` (:mod:`llmesh.bench`, where the modes, metrics and
targets are described) that writes to benchmarks/results/ by default:

    .venv/bin/python benchmarks/serving.py --quick
    .venv/bin/python benchmarks/serving.py --concurrency 1 8 32 128 --num-requests 64
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmesh.bench import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":  # vLLM spawns processes that re-import the main module
    sys.exit(main(prog="python benchmarks/serving.py", default_out=str(RESULTS)))
