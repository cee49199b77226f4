#!/usr/bin/env bash
# Set up (scripts/setup.sh), add the benchmark peer (Torch-Pruning), then run every benchmark section on the
# embedded SmolLM2-135M and write benchmarks/results.json and docs/benchmarks.md (31–40 minutes on 2 CPU cores; goal: under 45).
# Extra arguments go to `python -m benchmarks.run`, e.g. `bash scripts/benchmarks.sh --only quality`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the peer (Torch-Pruning) and the second pretrained family of the peers_second_family section (Gemma 3 270M)
.venv/bin/python -m pip --disable-pip-version-check -q install -e ".[peers,gemma3]"
# the issue-17 tables' third held-out text, the King James Bible, comes from Debian's bible-kjv where apt exists;
# without it those columns read "—" and the rest is measured as before
if ! command -v bible >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q bible-kjv >/dev/null || echo "bible-kjv not installed: the King James Bible columns stay empty" >&2
fi
exec .venv/bin/python -m benchmarks.run "$@"
