#!/usr/bin/env bash
# One command for a GPU loan: `bash bench/gpu_suite.sh [--dry-run] [outdir]` (plan and parts: bench/gpu_suite.py).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# The lent machine runs the checkout as it is (no install): fastpref from the tree, caches inside it.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$repo/.cache/triton}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$repo/.cache/inductor}"
python="$(command -v python3 || command -v python)"
exec "$python" bench/gpu_suite.py "$@"
