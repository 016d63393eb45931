"""`python -m llmesh` is the `llmesh` command."""

import sys

from llmesh.cli import main

sys.exit(main())
