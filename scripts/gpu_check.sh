#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine that has PyTorch and no internet:
#   scripts/gpu_check.sh [--wheels DIR] [options of python -m benchmarks.gpu]
# It installs the project's missing dependencies from the wheel folder DIR (default wheels/,
# made beforehand by `python -m benchmarks.gpu_wheels` on a machine that reaches the package
# index) with no index access, then runs `python -m benchmarks.gpu` on this checkout's code:
# the CUDA-marked tests, one fold of each of the paper's networks timed at 100³, the protocol
# extrapolated, results in benchmarks/results/gpu.md and gpu.json. Without CUDA it says so, runs
# what needs no GPU, and exits 0. PYTHON selects the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=wheels
if [ "${1:-}" = "--wheels" ]; then
  wheels=${2:?--wheels needs a folder}
  shift 2
fi
py=${PYTHON:-python3}
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "error: $py has no PyTorch; the check uses the machine's own (install it first)" >&2
  exit 2
fi
if [ ! -d "$wheels" ]; then
  echo "error: no wheel folder $wheels: run 'python -m benchmarks.gpu_wheels' where the package index is reachable, and copy $wheels here" >&2
  exit 2
fi
echo "[gpu-check] installing from $wheels (no index)"
"$py" -m pip install -q --no-index --find-links "$wheels" --no-warn-script-location \
  --disable-pip-version-check nmosd-ms pytest
# this checkout's code, whatever version of the package the wheel folder held
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m benchmarks.gpu "$@"
