"""bench/triton_aot.py: every Triton kernel compiles for sm_80/sm_90 with no spills, 128-bit loads where it
streams, and >= 2 programs per SM; and the checks do fail on a kernel that breaks them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import triton_aot  # noqa: E402

# Kernels that break one rule each, in a package of their own (the JIT reads kernel source from a file).
BAD_KERNELS = '''
import torch
import triton
import triton.language as tl


@triton.jit
def copy_kernel(src_ptr, dst_ptr, size, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < size
    tl.store(dst_ptr + cols, tl.load(src_ptr + cols, mask=inside) * 2.0, mask=inside)


@triton.jit
def hog_kernel(src_ptr, dst_ptr, BLOCK: tl.constexpr):
    # BLOCK / 32 values per thread stay live across the reduction: more than 255 registers hold.
    x = tl.load(src_ptr + tl.arange(0, BLOCK))
    tl.store(dst_ptr + tl.arange(0, BLOCK), x * tl.sum(x, axis=0))


@triton.jit
def forgotten_kernel(src_ptr):
    tl.store(src_ptr, 0.0)


def copy(src, block=1024):
    dst = torch.empty_like(src)
    copy_kernel[(triton.cdiv(src.numel(), block),)](src, dst, src.numel(), BLOCK=block, num_warps=4)
    return dst


def hog(src):
    dst = torch.empty_like(src)
    hog_kernel[(1,)](src, dst, BLOCK=src.numel(), num_warps=1)
    return dst
'''


def _run_probe(tmp_path, scenarios: str) -> dict:
    """triton_aot.run over BAD_KERNELS in a fresh process without the interpreter (which would turn
    triton's own @jit helpers into Python that cannot be compiled); `scenarios`: label -> call(module)."""
    package = tmp_path / "aot_probe_kernels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "kernels.py").write_text(textwrap.dedent(BAD_KERNELS))
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import dataclasses, json, sys, torch
        sys.path[:0] = [{str(tmp_path)!r}, {str(ROOT / "bench")!r}]
        import triton_aot
        from aot_probe_kernels import kernels as m
        big = torch.empty(1 << 20, dtype=torch.float32)
        calls = {scenarios}
        def make(arch):
            yield from ((label, lambda c=call: c(m)) for label, call in calls.items())
        found, results, unlaunched = triton_aot.run([triton_aot.ARCHS[90]], (make,), "aot_probe_kernels", None)
        print(json.dumps(dict(kernels=sorted(found), unlaunched=unlaunched, results=[
            dict(scenario=r.scenario, load_bits=r.load_bits, spill_bytes=r.spill_bytes,
                 registers=r.registers, violations=r.violations) for r in results])))
    """))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_aligned_stream_passes_and_misaligned_loses_vectorization(tmp_path):
    # A view one element in: the JIT sees a pointer that is not 16-byte aligned and a size not divisible
    # by 16, so it cannot prove 128-bit accesses legal. 4 MiB: a streaming launch.
    out = _run_probe(tmp_path, '{"aligned": lambda m: m.copy(big), "misaligned": lambda m: m.copy(big[1:])}')
    assert out["kernels"] == ["kernels.copy_kernel", "kernels.forgotten_kernel", "kernels.hog_kernel"]
    assert out["unlaunched"] == ["kernels.forgotten_kernel", "kernels.hog_kernel", "kernels.hog (launcher)"]
    by_scenario = {r["scenario"]: r for r in out["results"]}
    assert by_scenario["aligned"]["load_bits"] == 128 and by_scenario["aligned"]["violations"] == []
    assert by_scenario["misaligned"]["load_bits"] == 32
    assert any("global loads 32-bit" in v for v in by_scenario["misaligned"]["violations"])


def test_register_hog_spills_and_fails(tmp_path):
    out = _run_probe(tmp_path, '{"hog": lambda m: m.hog(torch.empty(16384))}')
    (result,) = out["results"]
    assert result["spill_bytes"] > 0, result
    assert any("spill bytes" in v for v in result["violations"])


def test_occupancy_rule():
    arch = triton_aot.ARCHS[80]
    base = dict(kernel="k", scenario="s", arch=arch, signature="", constexprs="", shared_bytes=0, load_bits=128,
                spill_bytes=0, compile_s=0.0, violations=[])
    # 8 warps = 256 threads: 128 registers give exactly 2 programs in 65536 registers, 129 (-> 136) give 1.
    assert triton_aot.check(triton_aot.Result(num_warps=8, registers=128, streamed=True, **base)) == []
    assert triton_aot.check(triton_aot.Result(num_warps=8, registers=129, streamed=True, **base))
    assert triton_aot.check(triton_aot.Result(num_warps=8, registers=129, streamed=False, **base)) == []
    assert triton_aot.check(triton_aot.Result(num_warps=1, registers=256, streamed=False, **base))


def _table_rows(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| kernel"))


@pytest.mark.slow
def test_every_fastpref_kernel_compiles_clean_for_sm80_and_sm90(tmp_path):
    """The CI gate: a kernel change that adds spills or loses vectorization fails here (~200 compiles)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real @triton.jit objects
    out = tmp_path / "triton-aot.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "triton_aot.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = out.read_text()
    assert "sample_errors._partial_sums_kernel" in table and "group_loss._ranked_pair_loss_kernel" in table
    # The committed table is this code's: compared where the compiler is the pinned one.
    committed = (ROOT / "bench" / "results" / "triton-aot.md").read_text()
    version = re.search(r"triton (\S+?);", committed).group(1)
    import triton

    if triton.__version__ == version:
        assert _table_rows(table) == _table_rows(committed), (
            "bench/results/triton-aot.md is stale: rerun `python bench/triton_aot.py` and commit it")
