"""``python -m llmesh.cli`` is the ``llmesh`` command, like ``python -m llmesh``."""

import sys

from llmesh.cli import main

# `llmesh bench` spawns vLLM processes that re-import the main module: only the real one runs.
if __name__ == "__main__":
    sys.exit(main())
