#!/usr/bin/env bash
# The README's test command: create/refresh .venv, install fastpref with the test extras, run the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/ops -x`).
set -euo pipefail
# shellcheck source=scripts/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
# Without a CUDA device Triton kernels run in the interpreter; with one, for real.
fastpref_set_triton_interpret
python -m fastpref.env_report || true
python -m pytest tests "$@"
