"""`pip install <checkout>` as another repo would do it (build isolation: no torch to build against): the C++
ops are compiled on first use, and with that turned off the one notice says which backend runs instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys, torch
import fastpref
from fastpref.ops import diffusion_dpo_loss, native
from fastpref.ops.library import resolve_backend
assert fastpref.__file__.startswith(sys.argv[1]), fastpref.__file__  # the installed copy, not the checkout
print("available", native.available(), native.available())
print("backend", resolve_backend("auto", torch.device("cpu")))
if native.available():
    g = torch.Generator().manual_seed(0)
    pred, target, ref = (torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    fast = diffusion_dpo_loss(pred, target, ref, beta=50.0, backend="native").loss
    slow = diffusion_dpo_loss(pred, target, ref, beta=50.0, backend="reference").loss
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    print("native matches the reference")
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_plain_pip_install_compiles_the_native_ops_on_first_use(tmp_path):
    if not shutil.which("c++") or not shutil.which("ninja", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}"):
        pytest.skip("no C++ compiler or ninja on this machine: the path under test cannot compile")
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTPREF_", "PIP_CONSTRAINT"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(src)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list((site / "fastpref").glob("_C*")), "the isolated build had torch after all: nothing to test"
    assert (site / "fastpref" / "_native_src" / "preference_ops.cpp").is_file()

    # A Python that sees this torch but not the editable install of the checkout (whose finder would
    # hand out the checkout's fastpref._C): a bare venv with the torch site dir as a plain path entry.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   env={**env, "PYTHONPATH": ""})
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    import torch

    (purelib / "torch_env.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    run_env = {**env, "PYTHONPATH": str(site), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}

    def check(**extra):
        out = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK, str(site)], capture_output=True, text=True,
                             cwd=tmp_path, env={**run_env, **extra}, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        return out

    off = check(FASTPREF_NATIVE_JIT="0")
    assert "available False False" in off.stdout and "backend reference" in off.stdout
    notices = [line for line in off.stderr.splitlines() if "native C++ ops off" in line]
    assert len(notices) == 1 and "PyTorch reference" in notices[0] and "FASTPREF_NATIVE_JIT" in notices[0], off.stderr

    first = check()
    assert "compiling the native C++ ops on first use" in first.stderr
    assert "available True True" in first.stdout and "backend native" in first.stdout
    assert "native matches the reference" in first.stdout
    second = check()  # cached build: no second compile
    assert "compiling" not in second.stderr and "native matches the reference" in second.stdout


def test_cuda_fallback_to_the_reference_is_said_once(monkeypatch, capsys):
    import torch

    from fastpref.ops import library

    monkeypatch.setattr(library, "_SLOW_PATH_SAID", set())
    monkeypatch.setitem(library._UNAVAILABLE_REASON, "triton", "triton kernels could not be imported: no triton")
    cuda = torch.device("cuda")
    assert [library.resolve_backend("auto", cuda) for _ in range(3)] == ["reference"] * 3
    lines = [line for line in capsys.readouterr().err.splitlines() if "CUDA losses use the PyTorch reference" in line]
    assert lines == ["fastpref: CUDA losses use the PyTorch reference: triton kernels could not be imported: no triton"]
