#!/usr/bin/env bash
# Install (if needed) and run the test suite: lint, then pytest (GPU tests skip themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tools/dev/install.sh
bash tools/dev/install_sglang_cpu.sh  # SGLang's CPU engine, for tests/e2e/test_sglang.py (about 1 min)
VENV="${KDSCALE_VENV:-.venv}"
"$VENV/bin/ruff" check kdscale tests benchmarks tools
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
