#!/usr/bin/env bash
# GPU check of every kernel against XLA (correctness, determinism, bandwidth) in one run, sized for
# < 5 min on an H100. From anywhere: bash kernels/gpu_check.sh [--dry-run]. Needs jax[cuda]; jax-triton for the
# triton rows (else they are reported as skipped). Writes $OUT/gpu_check.json (or runs/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m kernels.gpu_check "$@"
