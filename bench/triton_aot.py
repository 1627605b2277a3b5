"""Compile every Triton kernel of fastpref.ops.triton for A100 (sm_80) and H100 (sm_90), no GPU needed.

No GPU is at hand when the kernels change, so what decides their speed on one is checked statically:
each kernel, at every specialization the code launches, goes through Triton's own compiler and the
ptxas bundled with the wheel for `GPUTarget("cuda", 80 | 90, 32)`, and must have

- 0 spill bytes (ptxas -v with the flags Triton itself passes),
- 128-bit global loads when the launch streams a large tensor (a bandwidth-bound kernel that loses
  vectorization loses a large part of its bandwidth),
- registers and shared memory that let >= 2 programs of the launch's warps reside on one SM.

The kernel list is not written here: every @triton.jit object found in the modules of
fastpref.ops.triton is a kernel, every function there that launches one (`kernel[grid]`) is a launcher,
and the specializations are captured from the launchers themselves
(`kernel[grid](...)` is intercepted, so constexprs, block sizes, num_warps and the 16-byte
divisibility the JIT gives aligned tensors are the launch's own). SCENARIOS only says which inputs the
launchers get (the real latent shapes, the dtypes and options the ops dispatch); a kernel that no
scenario launches, or a launcher no scenario calls, fails the check, naming it.

    python bench/triton_aot.py                 # table -> bench/results/triton-aot.md, exit 1 on a violation
    python bench/triton_aot.py --out /tmp/x.md --arch 90
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import itertools
import math
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator
from unittest import mock

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KERNEL_PACKAGE = "fastpref.ops.triton"
DEFAULT_OUT = REPO / "bench" / "results" / "triton-aot.md"


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    capability: int
    sms: int  # what launch_plan sizes its grid by on that GPU
    registers_per_sm: int = 65536
    max_registers_per_thread: int = 255
    shared_per_sm: int = 0  # bytes usable by the programs of one SM


ARCHS = {
    80: Arch("A100", 80, 108, shared_per_sm=164 * 1024),
    90: Arch("H100", 90, 132, shared_per_sm=228 * 1024),
}
MIN_PROGRAMS_PER_SM = 2
MIN_LOAD_BITS = 128
# A launch whose largest tensor is at least this big streams memory: its time is bytes / bandwidth.
STREAMED_BYTES = 1 << 20


# --- which inputs the launchers get ------------------------------------------------------------------

# (name, latent C x H x W, samples per step): the real models' training shapes plus the toy world's.
SHAPES = (
    ("toy", (4, 8, 8), 8),
    ("sd15-512", (4, 64, 64), 8),
    ("sdxl-1024", (4, 128, 128), 64),
    ("sd3-1024", (16, 128, 128), 8),
)
# What the ops dispatch: model dtypes in, fp32 accumulation (fp64 stays fp64).
PRED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
GROUP_SIZES = (2, 4, 8, 16, 32, 64)  # up to MAX_GROUP_SIZE; the block is the next power of two


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sample_errors_scenarios(arch: Arch) -> Iterator[tuple[str, Callable[[], object]]]:
    from fastpref.ops.triton import sample_errors as se

    for (name, chw, n), dtype in itertools.product(SHAPES, PRED_DTYPES):
        if dtype == torch.float64 and name != "toy":
            continue  # fp64 is a test dtype; one shape shows it compiles
        size = math.prod(chw)
        block, chunk, _, _ = gpu_launch_plan(se.launch_plan, n, size, arch)
        pred = torch.empty((n, *chw), dtype=dtype)
        weight = torch.empty(n, dtype=_acc(dtype))
        grad_e = torch.empty(n, dtype=_acc(dtype))
        label = f"{name} N={n} {str(dtype).removeprefix('torch.')}"
        for has_ref, has_weight in itertools.product((False, True), (False, True)):
            yield (f"{label} ref={int(has_ref)} weight={int(has_weight)}",
                   lambda p=pred, r=has_ref, w=has_weight: se.sample_errors_forward(
                       p, p, p if r else None, weight if w else None, block=block, chunk=chunk))
        for has_weight in (False, True):
            yield (f"{label} backward weight={int(has_weight)}",
                   lambda p=pred, w=has_weight, g=grad_e: se.sample_errors_backward(
                       g, p, p, weight if w else None, block=block, chunk=chunk))
        # step_errors (GRPO's per-step Gaussian policy): the same kernels with REF_TO_PRED / HAS_DIV
        yield (f"{label} step_errors", lambda p=pred: se.step_errors_forward(p, p, p, block=block, chunk=chunk))
        yield (f"{label} step_errors backward", lambda p=pred, g=grad_e: se.step_errors_backward(
            g, g, p, p, p, block=block, chunk=chunk))


def _group_loss_scenarios(arch: Arch) -> Iterator[tuple[str, Callable[[], object]]]:
    from fastpref.ops.triton import group_loss as gl

    for k, loss_type, weighting, dtype in itertools.product(GROUP_SIZES, range(3), range(2),
                                                            (torch.float32, torch.float64)):
        if dtype == torch.float64 and (k, loss_type, weighting) != (4, 0, 1):
            continue
        groups = 8
        s = torch.empty(groups * k, dtype=dtype)
        offsets = torch.arange(0, groups * k + 1, k, dtype=torch.int64)
        yield (f"K={k} loss={loss_type} weighting={weighting} {str(dtype).removeprefix('torch.')}",
               lambda s=s, o=offsets, lt=loss_type, w=weighting, k=k: gl.ranked_pair_loss_forward(
                   s, s, o, 2500.0, lt, w, k))


# One entry per launcher module; a new kernel module adds its launcher calls here.
SCENARIOS: tuple[Callable[[Arch], Iterator[tuple[str, Callable[[], object]]]], ...] = (
    _sample_errors_scenarios,
    _group_loss_scenarios,
)


def gpu_launch_plan(plan: Callable, num_samples: int, sample_size: int, arch: Arch):
    """What `plan(num_samples, sample_size, cuda device)` returns on `arch`, asked on a machine without one."""
    props = SimpleNamespace(multi_processor_count=arch.sms)
    with mock.patch.object(torch.cuda, "get_device_properties", lambda *_a, **_k: props):
        return plan(num_samples, sample_size, torch.device("cuda"))


# --- kernels and their launches ----------------------------------------------------------------------

def _is_kernel(obj) -> bool:
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - older triton
        InterpretedFunction = JITFunction
    return isinstance(obj, (JITFunction, InterpretedFunction))


def discover_kernels(package: str = KERNEL_PACKAGE) -> dict[str, object]:
    """{"module.kernel": jit object} for every @triton.jit defined in the package's modules."""
    root = importlib.import_module(package)
    found = {}
    for info in pkgutil.walk_packages(root.__path__, prefix=package + "."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if _is_kernel(obj) and getattr(obj.fn, "__module__", None) == module.__name__:
                found[f"{info.name.removeprefix(package + '.')}.{name}"] = obj
    return found


def discover_launchers(kernels: dict[str, object], package: str = KERNEL_PACKAGE) -> dict[str, object]:
    """{"module.function": code} for every function of the package whose body launches a kernel (`kernel[grid]`)."""
    import inspect

    found = {}
    for qualified, kernel in kernels.items():
        module = importlib.import_module(f"{package}.{qualified.rsplit('.', 1)[0]}")
        name = qualified.rsplit(".", 1)[1]
        for fname, obj in vars(module).items():
            if inspect.isfunction(obj) and obj.__module__ == module.__name__ and re.search(
                    rf"\b{re.escape(name)}\[", inspect.getsource(obj)):
                found[f"{qualified.rsplit('.', 1)[0]}.{fname}"] = obj.__code__
    return found


@contextlib.contextmanager
def calls_recorded() -> Iterator[set]:
    """The code objects of the Python functions called inside the block."""
    seen: set = set()

    def profile(frame, event, _arg):
        if event == "call":
            seen.add(frame.f_code)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(previous)


@dataclasses.dataclass
class Launch:
    kernel: str
    jit: object
    args: tuple
    kwargs: dict
    scenario: str = ""


@contextlib.contextmanager
def capture_launches(kernels: dict[str, object]) -> Iterator[list[Launch]]:
    """Record `kernel[grid](*args, **kwargs)` of these kernels instead of running them."""
    launches: list[Launch] = []

    def recorder(name, obj):
        def run(*args, grid=None, warmup=False, **kwargs):
            launches.append(Launch(name, obj, args, kwargs))
        return run

    for name, obj in kernels.items():
        obj.run = recorder(name, obj)  # __getitem__ looks `run` up on the instance
    try:
        yield launches
    finally:
        for obj in kernels.values():
            vars(obj).pop("run", None)


@dataclasses.dataclass
class Result:
    kernel: str
    scenario: str
    arch: Arch
    signature: str
    constexprs: str
    num_warps: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    load_bits: int  # widest global load in the PTX (0: none)
    streamed: bool
    compile_s: float
    violations: list[str]


def _as_jit_function(obj):
    from triton.runtime.jit import JITFunction

    # Under TRITON_INTERPRET=1 @triton.jit gives an InterpretedFunction; the compiler wants the JIT object.
    return obj if isinstance(obj, JITFunction) else JITFunction(obj.fn)


def specialize(launch: Launch, arch: Arch):
    """(jit, signature, constexprs, attrs, options) exactly as the JIT would build them for this launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = _as_jit_function(launch.jit)
    target = GPUTarget("cuda", arch.capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, launch.kwargs, bound, specialization, options)
    return jit, target, signature, constexprs, attrs, options


_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_LOAD = re.compile(r"\bld\.global(?:\.[a-z0-9]+)*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)\b")


def ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spill bytes) from the wheel's ptxas with the flags Triton's make_cubin passes."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True, text=True, check=True,
        )
    log = done.stdout + done.stderr
    registers = max((int(m) for m in _PTXAS_USAGE.findall(log)), default=0)
    spills = sum(int(a) + int(b) for a, b in _PTXAS_SPILL.findall(log))
    return registers, spills


def widest_global_load(ptx: str) -> int:
    """Bits moved by the widest ld.global of the PTX (ld.global.v4.b32 -> 128)."""
    return max((int(v or 1) * int(b) for v, b in _LOAD.findall(ptx)), default=0)


def _largest_tensor_bytes(launch: Launch) -> int:
    tensors = [a for a in (*launch.args, *launch.kwargs.values()) if isinstance(a, torch.Tensor)]
    return max((t.numel() * t.element_size() for t in tensors), default=0)


def check(result: Result) -> list[str]:
    arch = result.arch
    problems = []
    if result.spill_bytes:
        problems.append(f"{result.spill_bytes} spill bytes")
    if result.streamed and result.load_bits < MIN_LOAD_BITS:
        problems.append(f"global loads {result.load_bits}-bit, want {MIN_LOAD_BITS} (streams >= 1 MiB)")
    threads = result.num_warps * 32
    # Registers are allocated per warp in units of 256, i.e. per thread in steps of 8.
    per_thread = math.ceil(max(result.registers, 1) / 8) * 8
    resident = min(arch.registers_per_sm // (per_thread * threads),
                   arch.shared_per_sm // result.shared_bytes if result.shared_bytes else 1 << 30)
    # Residency hides memory latency for the streaming kernels; a one-wave grid of tiny programs (the
    # group loss: one per prompt group) does not need it, so there it is reported, not required.
    if result.registers > arch.max_registers_per_thread or (result.streamed and resident < MIN_PROGRAMS_PER_SM):
        problems.append(f"{result.registers} registers x {threads} threads, {result.shared_bytes} B shared: "
                        f"{resident} program(s) per SM, want >= {MIN_PROGRAMS_PER_SM}")
    return problems


def compile_launch(launch: Launch, arch: Arch) -> Result:
    import triton
    from triton.compiler import ASTSource

    jit, target, signature, constexprs, attrs, options = specialize(launch, arch)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    elapsed = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    registers, spills = ptxas_usage(ptx, arch.capability)
    names = [p.name for p in jit.params]
    aligned = {names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr}
    sig = ",".join(f"{v}{'/16' if k in aligned else ''}" for k, v in signature.items() if v != "constexpr")
    consts = ", ".join(f"{names[path[0]]}={_short(v)}" for path, v in constexprs.items())
    result = Result(
        kernel=launch.kernel, scenario=launch.scenario, arch=arch, signature=sig, constexprs=consts,
        num_warps=options.num_warps, registers=registers, spill_bytes=spills,
        shared_bytes=int(compiled.metadata.shared), load_bits=widest_global_load(ptx),
        streamed=_largest_tensor_bytes(launch) >= STREAMED_BYTES, compile_s=elapsed, violations=[],
    )
    result.violations = check(result)
    return result


def _short(value) -> str:
    return str(value).removeprefix("triton.language.")


def collect_launches(archs: list[Arch], scenarios=SCENARIOS, package: str = KERNEL_PACKAGE):
    """(kernels, [(arch, Launch)] one per specialization (the first scenario launching it), launchers no
    scenario called)."""
    kernels = discover_kernels(package)
    launchers = discover_launchers(kernels, package)
    called: set = set()
    unique: dict[tuple, tuple[Arch, Launch]] = {}
    for arch in archs:
        for make in scenarios:
            for label, call in make(arch):
                with capture_launches(kernels) as launches, calls_recorded() as seen:
                    call()
                called |= seen
                for launch in launches:
                    launch.scenario = label
                    _, _, signature, constexprs, attrs, options = specialize(launch, arch)
                    key = (arch.capability, launch.kernel, tuple(signature.items()),
                           tuple((k, str(v)) for k, v in constexprs.items()),
                           tuple((k, str(v)) for k, v in attrs.items()), options.num_warps,
                           options.num_stages, _largest_tensor_bytes(launch) >= STREAMED_BYTES)
                    unique.setdefault(key, (arch, launch))
    uncalled = sorted(name for name, code in launchers.items() if code not in called)
    return kernels, list(unique.values()), uncalled


def run(archs: list[Arch], scenarios=SCENARIOS, package: str = KERNEL_PACKAGE, log=print):
    from fastpref.ops.triton import interpreter_enabled

    if interpreter_enabled():
        # Interpreted @triton.jit helpers (tl.sum, tl.sort, ...) cannot be compiled for a GPU.
        raise RuntimeError("bench/triton_aot.py compiles for the GPU: run it without TRITON_INTERPRET=1")
    kernels, launches, uncalled = collect_launches(archs, scenarios, package)
    launched = {launch.kernel for _, launch in launches}
    # A kernel never launched, or a launcher never called (its specializations would go unchecked), fails.
    unlaunched = sorted(set(kernels) - launched) + [f"{name} (launcher)" for name in uncalled]
    results = []
    for i, (arch, launch) in enumerate(launches):
        results.append(compile_launch(launch, arch))
        if log and (i + 1) % 25 == 0:
            log(f"[triton-aot] {i + 1}/{len(launches)} compiled")
    return kernels, results, unlaunched


def markdown(results: list[Result], unlaunched: list[str], seconds: float) -> str:
    import triton

    lines = [
        "# Triton kernels compiled ahead of time for A100 (sm_80) and H100 (sm_90)",
        "",
        f"Written by `python bench/triton_aot.py` (torch {torch.__version__}, triton {triton.__version__}; no GPU needed). Every @triton.jit kernel of "
        f"`{KERNEL_PACKAGE}`, at every specialization its launchers produce for the shapes "
        f"{', '.join(f'{n} {c}x{h}x{w} N={k}' for n, (c, h, w), k in SHAPES)} (dtypes bf16/fp16/fp32, fp64 once), "
        f"group sizes {GROUP_SIZES[0]}..{GROUP_SIZES[-1]}, with launch_plan's grid for each GPU's SM count "
        f"({', '.join(f'{a.name} {a.sms}' for a in ARCHS.values())}).",
        "",
        f"Checks: 0 spill bytes; widest global load >= {MIN_LOAD_BITS} bit when the launch streams a tensor of "
        f">= 1 MiB (`streams`); registers (rounded to 8 per thread) and shared memory allowing >= "
        f"{MIN_PROGRAMS_PER_SM} programs per SM (`progs/SM`) on the streaming launches (a one-wave grid of "
        f"tiny programs, the group loss, needs no residency to hide latency: reported only). Pointers marked `/16` carry the 16-byte "
        f"divisibility the JIT gives aligned tensors (and integers divisible by 16). {len(results)} compiles in "
        f"{seconds:.0f} s.",
        "",
        "| kernel | scenario (first launching it) | arch | argument types | warps | constexprs | registers | spill B "
        "| shared B | load bits | streams | progs/SM | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r.kernel, r.arch.capability, r.constexprs, r.signature)):
        per_thread = math.ceil(max(r.registers, 1) / 8) * 8
        progs = r.arch.registers_per_sm // (per_thread * r.num_warps * 32)
        if r.shared_bytes:
            progs = min(progs, r.arch.shared_per_sm // r.shared_bytes)
        lines.append(
            f"| {r.kernel} | {r.scenario} | sm_{r.arch.capability} | {r.signature} | {r.num_warps} | {r.constexprs} "
            f"| {r.registers} "
            f"| {r.spill_bytes} | {r.shared_bytes} | {r.load_bits} | {'yes' if r.streamed else ''} | {progs} "
            f"| {'ok' if not r.violations else 'FAIL: ' + '; '.join(r.violations)} |"
        )
    if unlaunched:
        lines += ["", "Kernels / launchers no scenario reaches (FAIL): " + ", ".join(unlaunched)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown table (default %(default)s)")
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    _, results, unlaunched = run([ARCHS[a] for a in args.arch])
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results, unlaunched, seconds))
    bad = [r for r in results if r.violations]
    for r in bad:
        print(f"[triton-aot] FAIL {r.kernel} sm_{r.arch.capability} {r.constexprs}: {'; '.join(r.violations)}")
    for name in unlaunched:
        print(f"[triton-aot] FAIL {name} is reached by no scenario: add its launcher calls to "
              f"bench/triton_aot.py SCENARIOS")
    print(f"[triton-aot] {len(results)} specializations, {len(bad)} failing, {len(unlaunched)} kernels unlaunched, "
          f"{seconds:.0f} s -> {args.out}")
    return 1 if bad or unlaunched else 0


if __name__ == "__main__":
    sys.exit(main())
