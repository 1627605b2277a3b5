"""Compile the native C++ ops on first use when the install did not build fastpref._C.

A plain `pip install <fastpref checkout or sdist>` builds in an isolated environment that has no torch,
so CMake cannot build the ops there (setup.py says so and goes on). The C++ source travels inside the
package (setup.py copies kernels/ to fastpref/_native_src/), and the first process that wants the ops
compiles it with torch.utils.cpp_extension against the torch it runs with, into TORCH_EXTENSIONS_DIR
(a per-user cache: later processes load it in milliseconds). Needs a C++ compiler and ninja; without
them the reason is returned and the ops stay off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
SOURCE_DIRS = (PACKAGE_DIR / "_native_src", PACKAGE_DIR.parent / "kernels")  # installed, then a checkout
SOURCES = ("preference_ops.cpp",)


def find_sources() -> list[Path] | None:
    for directory in SOURCE_DIRS:
        paths = [directory / name for name in SOURCES]
        if all(p.is_file() for p in paths):
            return paths
    return None


def jit_disabled_by_env() -> bool:
    return os.environ.get("FASTPREF_NATIVE_JIT", "1") in ("", "0")


def compile_and_load() -> str:
    """Build (or reuse) and load the ops; '' on success, else why not."""
    if jit_disabled_by_env():
        return "compiling them on first use is turned off by FASTPREF_NATIVE_JIT=0"
    sources = find_sources()
    if sources is None:
        return f"no C++ sources to compile on first use (looked in {', '.join(map(str, SOURCE_DIRS))})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r}) to compile them on first use"
    try:
        import torch
        from torch.utils import cpp_extension

        cpp_extension.verify_ninja_availability()
    except Exception as err:  # noqa: BLE001 - ninja missing: RuntimeError; anything else: also "cannot"
        return f"cannot compile them on first use ({err}; pip install ninja)"
    # The name carries the source and torch: a new kernel or another torch gets its own build.
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + torch.__version__.encode()).hexdigest()[:10]
    name = f"fastpref_native_{digest}"
    try:
        built = (Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:  # noqa: BLE001 - a private helper: if it moves, only the notice is affected
        built = False
    if not built:
        print(f"fastpref: compiling the native C++ ops on first use (once per torch version; ~1 min) as {name}",
              file=sys.stderr, flush=True)
    flags = ["-O3", "-std=c++20", "-Wno-psabi", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"]
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    try:
        cpp_extension.load(name=name, sources=[str(p) for p in sources], extra_cflags=flags + openmp,
                           extra_ldflags=openmp, is_python_module=False, verbose=False)
    except Exception as err:  # noqa: BLE001 - a failed compile leaves the ops off, with the reason
        message = str(err).strip().splitlines()
        return f"compiling them on first use failed: {type(err).__name__}: {' '.join(message[-3:])[:500]}"
    return ""
