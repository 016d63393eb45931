#!/usr/bin/env bash
# Install everything, then run the whole test suite (unit, integration, e2e) against a real
# etcd, real gRPC servers and real engines on small local models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
