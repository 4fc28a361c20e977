#!/usr/bin/env bash
# Install SGLang's CPU engine into the kdscale environment (.venv, or $KDSCALE_VENV) on a machine without CUDA.
#
# `pip install sglang` cannot work here: sglang 0.5.23 pins a CUDA torch (2.14.1), sglang-kernel (CUDA-only),
# flashinfer, flash-attn, deep-ep/deep-gemm and several GB more. What runs instead (facts in README "SGLang teacher"):
#   1. sglang==0.5.23 itself with --no-deps;
#   2. the subset of its dependencies its offline Engine imports, under a constraints file that is the current
#      environment's freeze, so that NOTHING already installed changes (torch stays the CPU wheel);
#   3. SGLANG_USE_CPU_ENGINE=1 (set by kdscale for teacher.device=cpu) and import-only stand-ins for two GPU-only
#      packages (torchvision, sgl_kernel) in tools/dev/sglang_cpu_shims, put on the engine processes' path through
#      KDSCALE_SGLANG_SHIMS (never installed into the environment: the student processes do not see them).
# Idempotent: re-running it installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${KDSCALE_VENV:-.venv}"
PY="$VENV/bin/python"
SGLANG_SPEC="${KDSCALE_SGLANG:-sglang==0.5.23}"
if [ ! -x "$PY" ]; then
  echo "error: $PY not found: run tools/dev/install.sh first (it creates $VENV with kdscale and the CPU torch)" >&2
  exit 2
fi
if "$PY" - "$SGLANG_SPEC" <<'PYEOF'
import importlib.metadata, sys
want = sys.argv[1].split("==")[1]
try:
    sys.exit(0 if importlib.metadata.version("sglang") == want else 1)
except importlib.metadata.PackageNotFoundError:
    sys.exit(1)
PYEOF
then
  echo "$SGLANG_SPEC already installed in $VENV"
else
  constraints="$(mktemp)"
  trap 'rm -f "$constraints"' EXIT
  "$PY" -m pip freeze --exclude-editable > "$constraints"
  "$PY" -m pip install -q --no-deps "$SGLANG_SPEC"
  # The dependencies SGLang's offline Engine imports on the CPU path (0.5.23), versions as it pins them where it does.
  "$PY" -m pip install -q -c "$constraints" \
    xgrammar==0.2.7 compressed-tensors==0.18.0 apache-tvm-ffi==0.1.11 llguidance interegular \
    aiohttp fastapi uvicorn uvloop orjson msgspec pyzmq pybase64 python-multipart partial-json-parser \
    openai openai-harmony einops blobfile setproctitle prometheus_client sentencepiece tiktoken scipy pillow \
    msgpack xxhash zstandard dill IPython
fi
SHIMS="$(pwd)/tools/dev/sglang_cpu_shims"
KDSCALE_SGLANG_SHIMS="$SHIMS" "$PY" - <<'PYEOF'
from kdscale.teacher.sglang_engine import check_sglang
print(f"sglang {check_sglang(device='cpu')} importable with kdscale's CPU set-up")
PYEOF
echo "to use it: export KDSCALE_SGLANG_SHIMS=$SHIMS   (then teacher.engine=sglang teacher.device=cpu)"
