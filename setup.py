"""fastpref installation.

The core install (`fastpref.ops`) needs only torch (+ triton where it runs). Everything else is an
extra, imported lazily by the code that needs it (see fastpref/utils/imports.py).

CPU machines: install with `PIP_CONSTRAINT=requirements/constraints-cpu.txt` and
`--no-build-isolation` (the native ops build against the installed torch); scripts/env.sh does this.

A plain `pip install <checkout or sdist>` (build isolation: no torch to build against) installs the C++
sources instead, and fastpref.ops compiles them on first use (fastpref/ops/_native_build.py).

Native ops: CMakeLists.txt builds the C++ CPU kernels (kernels/) into fastpref/_C<ext suffix>, a
Python extension module that registers torch.ops.fastpref.*_native when imported
(fastpref/ops/native.py). They are optional: when CMake, a compiler or torch is missing, or the
build fails, the install still succeeds with the native ops off, and says why (pip shows it with -v;
`fastpref.ops.native.unavailable_reason()` tells at run time). Environment:
  FASTPREF_NO_NATIVE=1      skip the native build (at run time: do not load it)
  FASTPREF_CMAKE=/path      the cmake to use (default: the one installed next to this Python, then PATH)
  FASTPREF_CMAKE_ARGS="..." extra CMake arguments, e.g. -DFASTPREF_NATIVE_ARCH=ON
"""

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

REPO = os.path.dirname(os.path.abspath(__file__))
NATIVE_MODULE = "fastpref._C"

EXTRAS = {
    "triton": ["triton>=3.2"],
    "train": [
        "diffusers>=0.35",
        "transformers>=4.50",
        "peft>=0.15",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "pillow>=10",
        "numpy>=1.26",
        "tensorboard>=2.15",
    ],
    "data": ["nvidia-dali-cuda130>=1.50", "pyarrow>=15"],
    "distributed": ["deepspeed>=0.16"],
    "quant": ["torchao>=0.10", "bitsandbytes>=0.45"],
    "rewards": ["image-reward>=1.5"],  # ImageReward only; it does not import with transformers 5 (see README)
    "bench": ["matplotlib>=3.8"],
    "test": ["pytest>=8", "pytest-xdist>=3", "pytest-timeout>=2"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})


class CMakeExtension(Extension):
    """An extension that CMakeLists.txt builds; optional, so a failed build leaves it out."""

    def __init__(self, name: str):
        super().__init__(name, sources=[], optional=True)


def find_executable(name: str, override_env: str | None = None) -> str | None:
    """`name` from $override_env, else from this interpreter's scripts dir (pip's cmake/ninja), else PATH."""
    if override_env and os.environ.get(override_env):
        return os.environ[override_env]
    beside_python = os.path.join(sysconfig.get_path("scripts"), name)
    if os.path.isfile(beside_python) and os.access(beside_python, os.X_OK):
        return beside_python
    return shutil.which(name)


def build_native_library(output_path: str, build_root: str, cmake: str | None = None, log=print) -> str | None:
    """Build the native ops into `output_path` with CMake. Returns None on success, else why not.

    A missing or failing toolchain is reported, not raised: the native ops are an optional
    speed-up, and a broken toolchain must not break the install.
    """
    cmake = cmake or find_executable("cmake", "FASTPREF_CMAKE")
    if not cmake:
        return "cmake was not found (pip install cmake, or set FASTPREF_CMAKE)"
    try:
        import torch

        torch_dir = os.path.join(torch.utils.cmake_prefix_path, "Torch")
    except Exception as err:  # noqa: BLE001 - any failure to import torch means: no native build
        return f"torch is not importable in the build environment ({err}); install torch first and use --no-build-isolation"
    ninja = find_executable("ninja")
    generator = "Ninja" if ninja and not os.environ.get("CMAKE_GENERATOR") else None
    # One build tree per interpreter and generator: a CMake cache remembers both, and several venvs
    # may build from this checkout.
    key = hashlib.sha256(f"{sys.executable}|{torch.__version__}|{generator}".encode()).hexdigest()[:12]
    build_dir = os.path.join(build_root, f"native-{key}")
    os.makedirs(build_dir, exist_ok=True)
    output_dir, filename = os.path.split(os.path.abspath(output_path))
    module_name = NATIVE_MODULE.rsplit(".", 1)[1]
    configure = [
        cmake,
        "-S",
        REPO,
        "-B",
        build_dir,
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DTorch_DIR={torch_dir}",
        f"-DFASTPREF_OUTPUT_DIR={output_dir}",
        f"-DFASTPREF_EXT_SUFFIX={filename[len(module_name):]}",
    ]
    if generator:
        configure += ["-G", generator, f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    configure += shlex.split(os.environ.get("FASTPREF_CMAKE_ARGS", ""))
    build = [cmake, "--build", build_dir, "--parallel", str(os.cpu_count() or 1)]
    start = time.perf_counter()
    for step, command in (("configure", configure), ("build", build)):
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        except OSError as err:
            return f"CMake {step} could not run {command[0]!r}: {err}"
        if done.returncode != 0:
            tail = "\n".join(done.stdout.strip().splitlines()[-30:])
            return f"CMake {step} failed (exit {done.returncode}); the last lines:\n{tail}"
    if not os.path.isfile(output_path):
        return f"CMake finished but did not produce {output_path}"
    log(f"fastpref: built the native ops into {output_path} in {time.perf_counter() - start:.1f} s")
    return None


class BuildNativeOps(build_ext):
    """build_ext that hands CMakeExtensions to CMake and degrades to 'native ops off' on failure."""

    # Kept between installs (incremental rebuilds); ignored by git.
    native_build_root = os.path.join(REPO, "build")

    def run(self) -> None:
        # setuptools clears `inplace` while it builds and copies into the source tree afterwards.
        self.builds_into_source_tree = bool(self.inplace or self.editable_mode)
        super().run()

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        output_path = self.get_ext_fullpath(ext.name)
        if os.environ.get("FASTPREF_NO_NATIVE", "") not in ("", "0"):
            reason = "FASTPREF_NO_NATIVE is set"
        else:
            try:
                reason = build_native_library(output_path, self.native_build_root, log=self.announce_always)
            except Exception as err:  # noqa: BLE001 - e.g. an unwritable build dir: still no failed install
                reason = f"the native build raised {type(err).__name__}: {err}"
        if reason is None:
            return
        self.announce_always(
            f"fastpref: the native C++ ops are OFF ({reason}).\n"
            "fastpref: the install goes on; the first process that uses the ops compiles them (C++ compiler and "
            "ninja needed), else fastpref.ops uses its Triton / PyTorch implementations."
        )
        # A library left by an earlier build (in build/lib, or in the source tree by an editable
        # install) would still be packaged or imported, built perhaps against another torch:
        # remove it so that "off" means off.
        stale_paths = [output_path]
        if self.builds_into_source_tree:
            stale_paths.append(os.path.join(REPO, *ext.name.split(".")[:-1], os.path.basename(output_path)))
        for stale in stale_paths:
            if os.path.isfile(stale):
                os.remove(stale)

    def announce_always(self, message: str) -> None:
        # stderr, so the message is seen with `pip install -v` and in a failing pip's log.
        print(message, file=sys.stderr, flush=True)


class BuildPyWithNativeSources(build_py):
    """Ship kernels/ inside the package (fastpref/_native_src/): an install whose CMake build could not
    run (pip's build isolation has no torch) compiles the ops on first use (fastpref/ops/_native_build.py)."""

    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_lib, "fastpref", "_native_src")
        os.makedirs(target, exist_ok=True)
        kernels = os.path.join(REPO, "kernels")
        for name in sorted(os.listdir(kernels)) if os.path.isdir(kernels) else []:
            if name.endswith((".cpp", ".h")):
                shutil.copy2(os.path.join(kernels, name), os.path.join(target, name))


SETUP_ARGS = dict(
    name="fastpref",
    version="0.1.0",
    description="Fast preference alignment (Diffusion-DPO, RankDPO, ...) for text-to-image diffusion models",
    packages=find_packages(include=["fastpref", "fastpref.*"]),
    package_data={"fastpref": ["toy/weights/**/*", "toy/weights/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "numpy>=1.26"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fastpref=fastpref.cli:main"]},
    ext_modules=[CMakeExtension(NATIVE_MODULE)],
    cmdclass={"build_ext": BuildNativeOps, "build_py": BuildPyWithNativeSources},
)

# setuptools runs this file as __main__; tests import it to exercise the build helpers.
if __name__ == "__main__":
    setup(**SETUP_ARGS)
