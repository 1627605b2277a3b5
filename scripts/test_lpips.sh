#!/usr/bin/env bash
# LPIPS, the diversity of real images (fastpref/eval/diversity.py), through the `lpips` package, in a venv of its own.
# lpips imports torchvision, and PyPI's torchvision does not load beside .venv's CPU torch pin (2.13.0:
# "operator torchvision::nms does not exist"), so these tests run against torch 2.14.1 + torchvision 0.29.1 (a CUDA
# build that runs on the CPU, ~5.6 GB; on this project's CPU machines pip takes both from local disk, ~1.5 min once).
# Extra arguments go to pytest. FASTPREF_LPIPS_VENV: where the venv lives (default .venv-lpips in the repo).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FASTPREF_LPIPS_VENV:-$repo/.venv-lpips}"
python="${PYTHON:-python3}"
if ! "$venv/bin/python" -c "import lpips, torchvision, pytest" 2>/dev/null; then
  echo "[fastpref] creating $venv for the LPIPS tests (torch 2.14.1, torchvision 0.29.1, lpips)"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1" lpips numpy pytest
fi
cd "$repo"
# the tests fail instead of skipping when lpips does not import: this run exists to exercise it
FASTPREF_REQUIRE_LPIPS=1 PYTHONPATH="$repo" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/eval/test_diversity.py -k lpips_diversity_on "$@"
