#!/usr/bin/env bash
# Install everything, then run the demo: a local mesh, a chat model and all-MiniLM-L6-v2
# deployed through the control plane, a streamed chat answer, embeddings and a rerank.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/llmesh demo "$@"
