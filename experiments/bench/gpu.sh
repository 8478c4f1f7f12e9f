#!/usr/bin/env bash
# The prepared GPU run, sized for < 8 min on one H100 / H200: every kernel against XLA (kernels/gpu_check),
# train-step MFU of a 375M decoder and of it with STEM, Engram and PKM, and decode tokens/s. From anywhere:
# bash experiments/bench/gpu.sh [--dry-run] [--sections kernels,decode,train] [--out FILE]. Writes $OUT/gpu.json
# (or runs/gpu.json); exits 1 if a row failed. Needs jax[cuda]; jax-triton for the triton kernel rows.
# The lent GPU image lacks fiddle and grain and cannot download: `make gpu-wheels` here fills .gpu-wheels/
# (7 MB, carried with the run), installed from there, offline, when they are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import fiddle, grain' 2>/dev/null; then
  [ -d .gpu-wheels ] || { echo "error: fiddle / grain missing and no .gpu-wheels/ (run 'make gpu-wheels' and carry it)" >&2; exit 1; }
  "$PY" -m pip install -q --no-index --find-links .gpu-wheels fiddle grain
fi
exec "$PY" -m experiments.bench.gpu "$@"
