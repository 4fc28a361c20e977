#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (its image has torch + transformers, no Ray): the
# GPU-marked tests, the loss tests and the hidden-state == full-logit equivalence on CUDA-capable torch, the
# chunked-loss memory benchmark on the GPU, and benchmarks/bench_gpu.py (FSDP2 student tokens/s and MFU on a ~1B
# random Llama, chunked vs naive loss at N=8192, V=151936, H=2048; JSON to $OUT/bench_gpu.json when $OUT is set).
# Prints everything; exits non-zero if any part fails.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
python -m pip install -q --no-deps pydantic pyyaml >/dev/null 2>&1 || true
# The GPU image has no megatron-core: install a wheel carried in .wheels/ (pip download --no-deps
# --python-version 3.12 --only-binary=:all: megatron-core==0.16.1 -d .wheels), if any.
ls .wheels/megatron_core-*.whl >/dev/null 2>&1 && python -m pip install -q --no-deps .wheels/megatron_core-*.whl psutil
python -c 'import megatron.core; print("megatron-core", megatron.core.__version__)' || true
status=0
python -m pytest -q -p no:cacheprovider tests/gpu tests/unit/test_losses.py tests/unit/test_equivalence.py -rs || status=1
python benchmarks/bench_chunked_loss_memory.py --device cuda || status=1
python benchmarks/bench_gpu.py --json "${OUT:-/tmp}/bench_gpu.json" || status=1
exit $status
