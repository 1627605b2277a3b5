"""scripts/gpu.sh: the CUDA detection of the README's commands, with a fake nvidia-smi on PATH."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
H100_LISTING = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)\\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"
NO_DRIVER = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."


def _bash(snippet: str, tmp_path: Path, nvidia_smi: str | None, **env) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        fake.chmod(0o755)
    # PATH without the real nvidia-smi, if this machine has one: only the fake (or none) is found.
    path = ":".join([str(bin_dir), "/usr/bin", "/bin"])
    base = {k: v for k, v in os.environ.items() if k not in ("FASTPREF_GPU", "TRITON_INTERPRET")}
    done = subprocess.run(["bash", "-c", f". scripts/gpu.sh; {snippet}"], cwd=ROOT, capture_output=True, text=True,
                          env={**base, "PATH": path, **env}, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("nvidia_smi, devices", [
    (f'printf "{H100_LISTING}\\n"', "2"),               # a driver that lists two GPUs
    (f'echo "{NO_DRIVER}"; exit 9', "0"),               # nvidia-smi installed, no driver
    ('echo "No devices were found"; exit 6', "0"),
    (None, "0"),                                         # no nvidia-smi at all
])
def test_cuda_devices_from_nvidia_smi(tmp_path, nvidia_smi, devices):
    assert _bash("fastpref_cuda_devices", tmp_path, nvidia_smi) == devices


def test_fastpref_gpu_overrides_detection(tmp_path):
    assert _bash("fastpref_cuda_devices", tmp_path, f'printf "{H100_LISTING}\\n"', FASTPREF_GPU="0") == "0"
    assert _bash("fastpref_cuda_devices", tmp_path, None, FASTPREF_GPU="1") == "1"


def test_triton_interpret_only_without_a_cuda_device(tmp_path):
    show = 'fastpref_set_triton_interpret; echo "${TRITON_INTERPRET-unset}"'
    assert _bash(show, tmp_path, None) == "1"
    assert _bash(show, tmp_path, f'printf "{H100_LISTING}\\n"') == "unset"
    assert _bash(show, tmp_path, f'printf "{H100_LISTING}\\n"', TRITON_INTERPRET="1") == "1"  # explicit kept
    assert _bash(show, tmp_path, None, TRITON_INTERPRET="0") == "0"


def test_readme_commands_use_the_detection():
    env_sh = (ROOT / "scripts" / "env.sh").read_text()
    assert 'gpus="$(fastpref_cuda_devices)"' in env_sh and 'if [ "$gpus" = 0 ]; then' in env_sh
    for script in ("test.sh", "demo.sh"):
        text = (ROOT / "scripts" / script).read_text()
        assert "fastpref_set_triton_interpret" in text and "TRITON_INTERPRET=" not in text
