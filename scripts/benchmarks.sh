#!/usr/bin/env bash
# Set up (scripts/setup.sh), add the benchmark peer (Torch-Pruning), then run every benchmark section on the
# embedded SmolLM2-135M and write benchmarks/results.json and docs/benchmarks.md (31–40 minutes on 2 CPU cores; goal: under 45).
# Extra arguments go to `python -m benchmarks.run`, e.g. `bash scripts/benchmarks.sh --only quality`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip --disable-pip-version-check -q install -e ".[peers]"
exec .venv/bin/python -m benchmarks.run "$@"
