#!/usr/bin/env bash
# One machine: `kdscale train` starts a private local Ray cluster itself (own temp dir, shut down on exit).
# Usage: bash launch/local.sh CONFIG [key.sub=value ...]      e.g. bash launch/local.sh configs/quickstart.yaml
# Uses .venv (see launch/quickstart.sh) or KDSCALE_VENV; set ray.address=... to join a running cluster instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 ]]; then
  echo "usage: bash launch/local.sh CONFIG [key.sub=value ...]" >&2
  exit 2
fi
VENV="${KDSCALE_VENV:-.venv}"
if [[ ! -x "$VENV/bin/kdscale" ]]; then
  echo "no kdscale in $VENV: run bash tools/dev/install.sh first (or set KDSCALE_VENV)" >&2
  exit 2
fi
exec "$VENV/bin/kdscale" train "$@"
