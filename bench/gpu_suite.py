"""The one-shot GPU suite: everything a short GPU loan should measure, in one command, within a budget.

    bash bench/gpu_suite.sh [outdir]            # on the GPU machine (default outdir: bench/results/)
    bash bench/gpu_suite.sh --dry-run [outdir]  # the plan, on any machine (CI)

Parts run in order, each under its own time limit and the suite's total budget (8 minutes by default, so
that one 10-minute command on a lent H100 holds it with the start-up); a part that no longer fits is
skipped and recorded as skipped, with the time it needed. Every part's log and a summary (device,
versions, per-part status and time) land in outdir as gpu-suite-<device>-<stamp>.{md,json}; the benches
write their own CSV/markdown there too.

The lent machine has no package registry: wheels found in $FASTPREF_WHEELS (default shared/wheels; e.g.
diffusers and torchao, which fit in what one run may carry) are installed offline first. What cannot be
carried (nvidia-dali: 199 MB) is reported as skipped by its part, with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_BUDGET_S = 480.0


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    command: str  # bash, run in the repository root; {out} and {tag} are filled in
    budget_s: float  # its own limit; also what it needs of the suite's remaining time to start
    why: str
    gpu_env: bool = True  # without TRITON_INTERPRET: real Triton kernels


PY = "python3"

PARTS = (
    Part("device", f"(nvidia-smi || echo 'no nvidia-smi'); {PY} -m fastpref.env_report", 20, "the device and the versions every number belongs to"),
    Part("wheels", 'wheels="${FASTPREF_WHEELS:-shared/wheels}"; if ls "$wheels"/*.whl >/dev/null 2>&1; then '
         f'{PY} -m pip install --no-index --no-deps --user "$wheels"/*.whl; else echo "no wheels in $wheels"; fi; '
         f'{PY} -c "import importlib.util as u; print({{m: bool(u.find_spec(m)) for m in '
         "('diffusers', 'torchao', 'bitsandbytes', 'nvidia.dali')}})\"",
         45, "the packages the machine lacks, carried as wheels (no registry there)"),
    Part("tests-gpu", f"{PY} -m pytest -x -q -m gpu tests/train/test_speed.py tests/data/test_stream.py "
         "-p no:cacheprovider --timeout 60", 90, "the CUDA-only tests (SDPA kernels, FP8, fp16 + 8-bit AdamW, DALI)"),
    Part("tests-ops-triton", f"{PY} -m pytest -x -q tests/ops -p no:cacheprovider --timeout 60", 120,
         "tests/ops against the float64 oracle with real Triton kernels on the GPU"),
    Part("bench-ops", f"{PY} bench/ops.py --device cuda --n 64 --shape 4 128 128 --dtype bf16 --out {{out}}", 60,
         "the fused loss ops at SDXL latents (N=64, bf16) vs eager / compiled PyTorch and copy bandwidth"),
    Part("bench-step-sdxl", f"{PY} bench/step.py --arch sdxl --device cuda --objectives dpo --modes full lora "
         "--ablations compile fp8 --pairs 4 --time-budget 200 --tag sdxl-{tag} --out {out}", 240,
         "SDXL 1024 headline: fastpref full FT + LoRA vs the faithful Diffusion-DPO step, compile and FP8 off"),
    Part("bench-loader-dali", f"{PY} bench/loader.py --backends torch dali --device cuda --workers 0 2 "
         "--out {out}/loader-{tag}.csv", 45, "the cached-latent stream delivered on the GPU, torch vs DALI"),
)


@dataclasses.dataclass
class Outcome:
    name: str
    status: str  # ok | failed (rc) | timed out | skipped (why)
    seconds: float
    log: str


def plan_lines(parts, budget_s: float) -> list[str]:
    lines = [f"GPU suite plan: {len(parts)} parts, {budget_s:.0f} s budget in all "
             f"(parts' own limits sum to {sum(p.budget_s for p in parts):.0f} s; a part starts only if its limit "
             f"fits in what is left)"]
    for i, part in enumerate(parts, 1):
        lines.append(f"  {i}. {part.name:<18} <= {part.budget_s:>4.0f} s  {part.why}")
        lines.append(f"     $ {part.command}")
    return lines


def fill(command: str, out: str, tag: str) -> str:
    # Not str.format: the commands hold shell ${...} and Python {...} of their own.
    return command.replace("{out}", out).replace("{tag}", tag)


def run_parts(parts, out: Path, tag: str, budget_s: float, env: dict,
              clock: Callable[[], float] = time.monotonic, runner=None) -> list[Outcome]:
    """Run the parts in order within budget_s; `runner(part, command, limit, log_path) -> rc` (tests fake it)."""
    runner = runner or _run_command
    start = clock()
    outcomes = []
    for part in parts:
        left = budget_s - (clock() - start)
        log = out / f"gpu-suite-{tag}-{part.name}.log"
        if part.budget_s > left:
            outcomes.append(Outcome(part.name, f"skipped (needs {part.budget_s:.0f} s, {max(left, 0):.0f} s left)",
                                    0.0, ""))
            print(f"[gpu-suite] {part.name}: skipped, {max(left, 0):.0f} s left of the budget", flush=True)
            continue
        command = fill(part.command, shlex.quote(str(out)), tag)
        print(f"[gpu-suite] {part.name} (<= {part.budget_s:.0f} s): {command}", flush=True)
        began = clock()
        rc = runner(part, command, part.budget_s, log, env)
        took = clock() - began
        status = "ok" if rc == 0 else "timed out" if rc == 124 else f"failed (rc {rc})"
        outcomes.append(Outcome(part.name, status, took, str(log.relative_to(out)) if log.is_relative_to(out) else str(log)))
        print(f"[gpu-suite] {part.name}: {status} in {took:.0f} s", flush=True)
    return outcomes


def _run_command(part: Part, command: str, limit: float, log: Path, env: dict) -> int:
    part_env = dict(env)
    if part.gpu_env:
        part_env.pop("TRITON_INTERPRET", None)
    with log.open("w") as handle:
        try:
            done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=part_env, stdout=handle,
                                  stderr=subprocess.STDOUT, timeout=limit)
        except subprocess.TimeoutExpired:
            handle.write(f"\n[gpu-suite] killed after {limit:.0f} s\n")
            return 124
    return done.returncode


def device_tag() -> str:
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "cpu"
    short = re.search(r"(H200|H100|A100|L40S|L4|A10G|RTX \d+)", name)
    return (short.group(1) if short else name).lower().replace(" ", "")


def summary_markdown(outcomes: list[Outcome], env: dict[str, str], budget_s: float, total_s: float) -> str:
    lines = ["# GPU suite", "", "| key | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in env.items()]
    lines += ["", f"Budget {budget_s:.0f} s, used {total_s:.0f} s.", "", "| part | status | seconds | log |",
              "|---|---|---|---|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.log} |" for o in outcomes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", nargs="?", default=str(RESULTS_DIR))
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check it, run nothing")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("FASTPREF_SUITE_BUDGET", DEFAULT_BUDGET_S)),
                        help="seconds for the whole suite (default %(default)s)")
    parser.add_argument("--only", nargs="+", choices=[p.name for p in PARTS], help="run only these parts")
    args = parser.parse_args(argv)
    parts = [p for p in PARTS if not args.only or p.name in args.only]
    print("\n".join(plan_lines(parts, args.budget)))
    if args.dry_run:
        check_plan(parts)
        print("[gpu-suite] dry run: plan checked, nothing run")
        return 0
    out = Path(args.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{device_tag()}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    start = time.monotonic()
    outcomes = run_parts(parts, out, tag, args.budget, dict(os.environ))
    total = time.monotonic() - start
    from fastpref.env_report import environment

    env = environment()
    (out / f"gpu-suite-{tag}.md").write_text(summary_markdown(outcomes, env, args.budget, total))
    (out / f"gpu-suite-{tag}.json").write_text(json.dumps(
        {"env": env, "budget_s": args.budget, "total_s": total, "parts": [dataclasses.asdict(o) for o in outcomes]},
        indent=1))
    print(f"[gpu-suite] wrote {out / f'gpu-suite-{tag}.md'}")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


def check_plan(parts) -> None:
    """What a dry run can check on any machine: every script and option the parts name exists."""
    for part in parts:
        command = fill(part.command, "OUT", "TAG")
        for script in re.findall(r"(bench/\w+\.py)", command):
            path = ROOT / script
            if not path.exists():
                raise SystemExit(f"gpu suite part {part.name}: {script} does not exist")
            # Options read from the script's add_argument calls: a dry run imports nothing heavy.
            declared = set(re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9-]*)\"", path.read_text()))
            segment = command.split(script, 1)[1].split(";")[0]
            for option in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", segment):
                if option not in declared:
                    raise SystemExit(f"gpu suite part {part.name}: {script} has no option {option}")
        for test_path in re.findall(r"(tests/[\w/]+(?:\.py)?)", command):
            if not (ROOT / test_path).exists():
                raise SystemExit(f"gpu suite part {part.name}: {test_path} does not exist")


if __name__ == "__main__":
    sys.exit(main())
