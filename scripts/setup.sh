#!/usr/bin/env bash
# Make .venv and install tmu-serve with its test and Ray extras.
# torch and torchvision are installed first, pinned, so that pip takes them from the local wheel cache.
# Usage: bash scripts/setup.sh [gpu]   (gpu: onnxruntime-gpu instead of onnxruntime)
set -euo pipefail
cd "$(dirname "$0")/.."
runtime_extra=cpu
if [ "${1:-}" = "gpu" ]; then runtime_extra=gpu; fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[${runtime_extra},test,ray]"
command -v java >/dev/null || echo "warning: TorchServe needs Java 17 on PATH (java not found)" >&2
.venv/bin/python -c "import torch, torchvision, ts, onnxruntime; print('tmu-serve ready: torch', torch.__version__, 'onnxruntime', onnxruntime.__version__)"
