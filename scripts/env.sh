#!/usr/bin/env bash
# Create or refresh the project's virtualenv (.venv) and install fastpref into it.
# Sourced by scripts/demo.sh and scripts/test.sh, so a new user types nothing else.
#   FASTPREF_EXTRAS  extras to install (default: the CPU test stack)
#   FASTPREF_VENV    where the virtualenv lives (default: .venv in the repo)
#   FASTPREF_GPU     1 / 0: a CUDA machine or not (default: what nvidia-smi lists; scripts/gpu.sh)
# On a CUDA machine the CUDA build of torch is kept (or installed: PyPI's Linux torch is the CUDA one)
# with the GPU extras (DALI CUDA; flash-attn where a wheel exists); elsewhere the CPU wheel is pinned.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/gpu.sh
. "$repo/scripts/gpu.sh"
gpus="$(fastpref_cuda_devices)"
venv="${FASTPREF_VENV:-$repo/.venv}"
extras="${FASTPREF_EXTRAS:-train,data,distributed,quant,bench,test}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[fastpref] creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

# A stamp of everything that decides the install: skip pip when nothing changed.
stamp="$venv/.fastpref-install-stamp"
want="$(cat "$repo/setup.py" "$repo/requirements/"*.txt "$repo/CMakeLists.txt" "$repo"/kernels/* 2>/dev/null | sha256sum | cut -c1-16)-$extras$([ "$gpus" = 0 ] || echo -cuda)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[fastpref] installing fastpref[$extras] into $venv"
  export DS_BUILD_OPS=0   # DeepSpeed: no CUDA ops to build; its CPU ops JIT-compile on first use
  pip install -q --upgrade pip wheel "setuptools>=70" cmake ninja
  # torch first, so that the native build (no build isolation) compiles against it
  if [ "$gpus" = 0 ]; then
    export PIP_CONSTRAINT="$repo/requirements/constraints-cpu.txt"
    pip install -q "torch==2.13.0" "triton==3.7.1"
  elif [ "$(fastpref_torch_cuda)" != yes ]; then
    echo "[fastpref] $gpus CUDA device(s) and no CUDA torch here: installing torch + triton for CUDA"
    pip install -q --upgrade torch triton
  else
    echo "[fastpref] $gpus CUDA device(s): keeping torch $(python -c 'import torch; print(torch.__version__)')"
  fi
  pip install -q --no-build-isolation -e "$repo[$extras]"
  if [ "$gpus" != 0 ]; then
    # flash-attn only as a prebuilt wheel: building it from source takes hours.
    pip install -q --only-binary=:all: flash-attn 2>/dev/null \
      || echo "[fastpref] flash-attn: no prebuilt wheel for this torch/Python; attention uses PyTorch SDPA"
  fi
  echo "$want" > "$stamp"
  python -c "from fastpref.ops import native; print('[fastpref] native C++ ops:', 'on' if native.available() else 'OFF (' + native.unavailable_reason() + ')')"
fi

export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$repo/.cache/triton}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$repo/.cache/inductor}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
