"""``python -m llmesh.bench`` is ``llmesh bench``."""

import sys

from llmesh.bench import main

# vLLM spawns processes that re-import the main module: only the real one runs the benchmark.
if __name__ == "__main__":
    sys.exit(main())
