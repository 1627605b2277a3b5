#!/usr/bin/env bash
# CUDA detection for scripts/env.sh, test.sh and demo.sh (sourced; no side effects until called).
#   FASTPREF_GPU=1 / 0   force the answer (e.g. a container whose nvidia-smi is missing, or a GPU to ignore)

# How many CUDA devices the driver lists (0: no nvidia-smi, no driver, or none listed).
fastpref_cuda_devices() {
  if [ -n "${FASTPREF_GPU:-}" ]; then
    if [ "$FASTPREF_GPU" = 0 ]; then echo 0; else echo "${FASTPREF_GPU}"; fi
    return
  fi
  if ! command -v nvidia-smi >/dev/null 2>&1; then echo 0; return; fi
  # nvidia-smi without a working driver exits non-zero and lists nothing: that machine is a CPU one.
  local listing
  listing="$(nvidia-smi -L 2>/dev/null)" || { echo 0; return; }
  printf '%s\n' "$listing" | grep -c '^GPU [0-9]' || true
}

# Whether the torch of the active Python can run on CUDA here: yes / no / missing.
fastpref_torch_cuda() {
  python - <<'PY' 2>/dev/null || echo missing
import torch
print("yes" if torch.version.cuda is not None and torch.cuda.is_available() else "no")
PY
}

# TRITON_INTERPRET for this machine: 1 without a CUDA device (Triton kernels run on CPU tensors in the
# interpreter), unset with one (real kernels). An explicit TRITON_INTERPRET is kept.
fastpref_set_triton_interpret() {
  if [ -n "${TRITON_INTERPRET+x}" ]; then return; fi
  if [ "$(fastpref_cuda_devices)" = 0 ]; then export TRITON_INTERPRET=1; fi
}
