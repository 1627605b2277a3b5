#!/usr/bin/env bash
# The README's main command: create/refresh .venv, install fastpref, run the main job on the embedded tiny default.
set -euo pipefail
# shellcheck source=scripts/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
# Without a CUDA device Triton kernels run in the interpreter; with one, for real.
fastpref_set_triton_interpret
fastpref demo "$@"
