"""Benchmark of one fastpref training step against the public Diffusion-DPO step, side by side in one run.

For an architecture (the toy models, or SD1.5 / SDXL / SD3-Medium built with random weights from
configs/models/*.json, optionally narrowed by --width-scale and at a smaller --resolution), it measures:

  headline   fastpref and the faithful baseline (bench/baseline_dpo.py) for Diffusion-DPO and RankDPO (K=4),
             LoRA and full fine-tuning, at the same number of images per step;
  ablation   fastpref with each speed feature switched alone (latent cache, cached reference errors, fused ops,
             compile, FP8, 8-bit AdamW, channels-last, gradient checkpointing); a switch this machine cannot
             run, or that fastpref leaves off here, is a row that says why, with no numbers.

Per row: step time (median, quartiles), pairs/s and images/s, the step split by phase (data, text/VAE encoding,
reference forward, policy forward+backward, optimizer, communication), peak memory (CUDA), MFU and HFU from the
analytic FLOP counts of bench/flops.py (conventions in bench/README.md), and fastpref / baseline. Writes a CSV, a
Markdown table and a PNG plot to bench/results/ (with device, versions and configuration), the GPU-days estimate
of the published SDXL recipes (bench/gpu_days.py) and, with --profile, a torch.profiler summary of top kernels.

    python bench/step.py --smoke                                   # CI: toy model, seconds
    python bench/step.py --arch toy-sd toy-sdxl toy-sd3            # CPU: the toy models
    python bench/step.py --arch sdxl --width-scale 0.125 --resolution 256   # CPU: SDXL's shape, narrowed
    python bench/step.py --arch sdxl --device cuda --profile       # GPU: SDXL 1024^2, within 10 minutes
    python bench/step.py --method spo --arch toy-sd                # one SPO step by phase (bench/step_online.py)
    python bench/step.py --method grpo --arch toy-sd3 toy-sd       # one GRPO iteration by phase
    python bench/step.py --method draft --arch toy-sd --k 1 2 5 --both    # DRaFT: phases + peak memory vs K,
    python bench/step.py --method draft --arch sd15 sdxl --device cuda --k 1 2 5 10 50 --both   # real shapes

Layout: step_archs.py (architectures), step_runners.py (workloads, the two steps, measurement of a row),
step_report.py (ratios, CSV, Markdown, plot), common.py (device sync, timing, CSV with device + versions);
this file plans the rows and runs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_days  # noqa: E402
from common import RESULTS_DIR, environment, resolve_device, stamp  # noqa: E402
from step_archs import REAL_ARCHS, TOY_ARCHS, Arch, load_arch  # noqa: E402
from step_report import add_ratios, fmt, print_table, write_outputs  # noqa: E402
from step_runners import Settings, Variant, Workload, measure  # noqa: E402

from fastpref.train.speed import SpeedConfig  # noqa: E402

# dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name()
GPU_PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                        ("A10G", 70.0), ("L4", 121.0), ("RTX 4090", 165.0))


# ====================================================================================== plan


def fastpref_speed(device: torch.device) -> tuple[SpeedConfig, dict[str, str]]:
    """fastpref's fastest configuration on this device, and why each switch left off is off."""
    off: dict[str, str] = {}
    if device.type == "cuda":
        from fastpref.train.speed import fp8_supported

        fp8_ok, why = fp8_supported(device)
        if not fp8_ok:
            off["fp8"] = why
        try:
            import bitsandbytes  # noqa: F401

            optimizer = "adamw8bit"
        except ImportError:
            optimizer, off["optimizer"] = "adamw", "bitsandbytes is not installed (pip install 'fastpref[quant]')"
        try:
            import torchao  # noqa: F401
        except ImportError:
            fp8_ok, off["fp8"] = False, "torchao is not installed (pip install 'fastpref[quant]')"
        speed = SpeedConfig(compile=True, fp8=fp8_ok, optimizer=optimizer, channels_last=True, mixed_precision="bf16",
                            fused_loss=True)
        return speed, off
    off["compile"] = ("CPU: a cold torch.compile of a UNet takes minutes on 2 cores and ran no faster than eager "
                      "(shared/notes/cpu-stack.md); measured on GPU")
    off["fp8"] = "CPU: torch._scaled_mm has only a reference kernel here, a correctness path, not a speed one"
    off["optimizer"] = "CPU: bitsandbytes' 8-bit AdamW saves GPU memory; on CPU it is an emulation"
    off["channels_last"] = "CPU: channels-last targets tensor-core convolutions; measured on GPU"
    off["mixed_precision"] = "CPU: no fast bf16 matmuls on this CPU; fp32 for both systems"
    return SpeedConfig(), off


ABLATIONS = (
    # (row name, what changes, SpeedConfig field or None)
    ("- latent cache", "cached_latents", None),
    ("- cached reference errors", "cached_reference", None),
    ("- fused ops", "fused_loss", "fused_loss"),
    ("- compile", "compile", "compile"),
    ("- FP8", "fp8", "fp8"),
    ("- 8-bit AdamW", "optimizer", "optimizer"),
    ("- channels-last", "channels_last", "channels_last"),
    ("+ gradient checkpointing", "gradient_checkpointing", "gradient_checkpointing"),
)


ABLATION_KEYS = tuple(key for _, key, _ in ABLATIONS)


def plan(arch: Arch, device: torch.device, pairs: int, objectives, modes, ablation: bool,
         only: tuple[str, ...] | None = None) -> list[Variant]:
    """Headline rows, then the ablation rows (all, or those whose key is in `only`)."""
    speed, off = fastpref_speed(device)
    variants = []
    for objective in objectives:
        for mode in modes:
            work = Workload(objective, mode, pairs)
            variants.append(Variant("fastpref", "headline", "fastpref", work, speed))
            if objective == "dpo":
                variants.append(Variant("baseline (public Diffusion-DPO step)", "headline", "baseline", work,
                                        SpeedConfig(mixed_precision=speed.mixed_precision)))
    if not ablation:
        return variants
    work = Workload(objectives[0], "full" if "full" in modes else modes[0], pairs)
    for name, key, field_name in ABLATIONS:
        if only and key not in only:
            continue
        variant = Variant(f"fastpref {name}", "ablation", "fastpref", work, speed)
        if key in ("cached_latents", "cached_reference"):
            variant = dataclasses.replace(variant, **{key: False})
        elif key == "gradient_checkpointing":
            variant.speed = dataclasses.replace(speed, gradient_checkpointing=True)
        elif key == "optimizer":
            if speed.optimizer != "adamw8bit":
                variant.skip_reason = f"not on in fastpref's config here: {off.get('optimizer', 'adamw chosen')}"
            variant.speed = dataclasses.replace(speed, optimizer="adamw")
        else:
            if not getattr(speed, field_name):
                variant.skip_reason = f"not on in fastpref's config here: {off.get(field_name, 'off by default')}"
            variant.speed = dataclasses.replace(speed, **{field_name: False})
        variants.append(variant)
    return variants


# ====================================================================================== peak FLOPs


def peak_tflops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16_TFLOPS:
            if key in name:
                return value, f"{name}: dense bf16 datasheet peak {value:g} TFLOP/s"
        raise SystemExit(f"unknown GPU {name!r}: add its dense bf16 peak to GPU_PEAK_BF16_TFLOPS in bench/step.py")
    # CPU: no datasheet figure that means anything under a shared load; use what a large fp32 GEMM reaches
    a = torch.randn(1024, 1024)
    torch.mm(a, a)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, a)
        best = max(best, 2 * 1024**3 / (time.perf_counter() - start))
    return best / 1e12, f"CPU: best of 5 fp32 1024^3 GEMMs measured in this run ({best / 1e9:.1f} GFLOP/s)"


# ====================================================================================== main


def run(args) -> dict[str, Path]:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak, peak_source = peak_tflops(device)
    if args.method != "offline":
        return run_online(args, device, peak, peak_source)
    tag = args.tag or f"{'-'.join(args.arch)}-{device.type}{'-smoke' if args.smoke else ''}-{stamp()}"
    settings = Settings(device, args.steps, args.warmup, args.phase_steps, args.time_budget, time.perf_counter(),
                        peak, peak_source, args.profile, Path(args.out), tag)
    env = environment()
    speed, off = fastpref_speed(device)
    speed_note = (f"fastpref configuration: {dataclasses.asdict(speed)}; latent/text cache and cached reference "
                  f"errors on" + "".join(f"; {key} off: {why}" for key, why in off.items()))
    rows, notes, estimates = [], [], []
    for name in args.arch:
        arch = load_arch(name, args.width_scale, args.resolution)
        params = sum(p.numel() for p in _denoiser_params(arch))
        notes.append(f"{arch.describe()}: denoiser {params / 1e6:.1f}M parameters (random weights), latents "
                     f"{arch.latent_channels}x{arch.latent_hw[0]}x{arch.latent_hw[1]}, {arch.text_length} text tokens, "
                     f"forward {arch.denoiser_forward_flops(1).total / 1e9:.3g} GFLOP per image")
        for variant in plan(arch, device, args.pairs, args.objectives, args.modes, not args.no_ablation,
                            args.ablations):
            row = measure(arch, variant, settings)
            row["speed_config"] = json.dumps(dataclasses.asdict(variant.speed), sort_keys=True)
            rows.append(row)
            print(f"  {row['shape']:>20} | {row['variant']:<40} {row['objective']}/{row['mode']}: "
                  f"{fmt(row.get('step_ms'))} ms {row['status'] if row['status'] != 'ok' else ''}", flush=True)
        if arch.name == "sdxl":
            estimates += gpu_days.estimates_from_rows([r for r in rows if r["arch"] == "sdxl"], env["device"],
                                                      representative=arch.spec.get("width_scale", 1.0) == 1.0
                                                      and arch.resolution == 1024)
    add_ratios(rows)
    paths = write_outputs(rows, env, settings, notes, speed_note, estimates)
    print(f"device: {env['device']} | torch {env['torch']} | peak for MFU: {peak_source}")
    print_table(rows)
    for key, path in paths.items():
        print(f"wrote {path}")
    return paths


def run_online(args, device: torch.device, peak: float, peak_source: str) -> dict[str, Path]:
    """--method spo|grpo: one online step per architecture (bench/step_online.py), CSV + Markdown."""
    from step_online import OnlineSettings, measure_online, phases_of, write_online

    settings = OnlineSettings(args.method, prompts=args.prompts, group_size=args.group_size,
                              num_steps=args.num_steps, divert_start_step=args.divert_start_step,
                              train_batch_size=args.train_batch_size, kl_coeff=args.kl_coeff)
    if args.draft_row:  # one DRaFT row in this (fresh) process: its peak memory is this row's alone
        arch = load_arch(args.arch[0], args.width_scale, args.resolution)
        settings = dataclasses.replace(settings, k=args.k[0], checkpointing=not args.no_checkpointing)
        row = measure_online(arch, settings, device, args.steps, args.warmup, args.phase_steps, peak)
        print(json.dumps(row))
        return {}
    rows, notes = [], []
    for name in args.arch:
        arch = load_arch(name, args.width_scale, args.resolution)
        params = sum(p.numel() for p in _denoiser_params(arch))
        notes.append(f"{arch.describe()}: denoiser {params / 1e6:.1f}M parameters (random weights), latents "
                     f"{arch.latent_channels}x{arch.latent_hw[0]}x{arch.latent_hw[1]}, {arch.text_length} text tokens")
        if args.method == "draft":
            for k in args.k:
                for checkpointing in ([True, False] if args.both else [not args.no_checkpointing]):
                    row = draft_row_in_fresh_process(args, name, k, checkpointing)
                    rows.append(row)
                    print(f"  {row['shape']:>20} | draft K={k} checkpointing={checkpointing}: "
                          f"{fmt(row['step_ms'])} ms, peak {row['peak_gib']} GiB, phases "
                          + ", ".join(f"{p} {fmt(row[p + '_ms'])}" for p in phases_of("draft")), flush=True)
            continue
        row = measure_online(arch, settings, device, args.steps, args.warmup, args.phase_steps, peak)
        rows.append(row)
        print(f"  {row['shape']:>20} | {args.method}/{row['mode']}: {fmt(row['step_ms'])} ms, phases "
              + ", ".join(f"{p} {fmt(row[p + '_ms'])}" for p in ("sampling", "decode", "reward", "reference",
                                                                  "policy", "optimizer", "other"))
              + f", MFU {fmt(row['MFU'], 2)}", flush=True)
    tag = args.tag or f"{args.method}-{'-'.join(args.arch)}-{device.type}-{stamp()}"
    timing = (f"{args.warmup} warm-up, median of {args.steps} steps; phases from {args.phase_steps} further steps "
              "with a device sync at each phase edge")
    paths = write_online(rows, environment(), tag, Path(args.out), peak_source, notes, timing)
    for path in paths.values():
        print(f"wrote {path}")
    return paths


def draft_row_in_fresh_process(args, arch: str, k: int, checkpointing: bool) -> dict:
    """One DRaFT row measured by `bench/step.py --draft-row` in its own process (a CPU's peak RSS never goes down,
    so an earlier row's peak would hide a smaller one's)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--draft-row", "--method", "draft", "--arch", arch,
               "--k", str(k), "--device", args.device, "--width-scale", str(args.width_scale),
               "--prompts", str(args.prompts), "--group-size", str(args.group_size),
               "--num-steps", str(args.num_steps), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--phase-steps", str(args.phase_steps)]
    command += ["--resolution", str(args.resolution)] if args.resolution else []
    command += ["--kl-coeff", str(args.kl_coeff)] if args.kl_coeff is not None else []
    command += ["--threads", str(args.threads)] if args.threads else []
    command += [] if checkpointing else ["--no-checkpointing"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"DRaFT row {arch} K={k} checkpointing={checkpointing} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _denoiser_params(arch: Arch):
    import diffusers

    with torch.device("meta"):
        if arch.toy:
            from fastpref.models import family_module

            config = family_module(arch.family).tiny_config("toy")["transformer" if arch.family == "sd3" else "unet"]
        else:
            config = arch.spec["denoiser"]["config"]
        cls = diffusers.SD3Transformer2DModel if arch.family == "sd3" else diffusers.UNet2DConditionModel
        return list(cls(**config).parameters())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=None,
                        help=f"architectures: {sorted(TOY_ARCHS)} or {sorted(REAL_ARCHS)} (configs/models)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--width-scale", type=float, default=1.0,
                        help="multiply every width of a real architecture (depths and block layout kept), e.g. 0.125")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the model's, 512 / 1024)")
    parser.add_argument("--pairs", type=int, default=None, help="DPO pairs per step (RankDPO: the same image count)")
    parser.add_argument("--objectives", nargs="+", default=["dpo", "rankdpo"], choices=["dpo", "rankdpo"])
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per row (compile needs >= 2)")
    parser.add_argument("--phase-steps", type=int, default=None, help="steps timed phase by phase")
    parser.add_argument("--no-ablation", action="store_true", help="only the fastpref / baseline rows")
    parser.add_argument("--ablations", nargs="+", choices=ABLATION_KEYS,
                        help="only these ablation rows (default: all), e.g. compile fp8")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after which remaining rows are recorded as skipped (default: 510 on GPU)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler summary of the headline fastpref row")
    parser.add_argument("--threads", type=int, help="torch CPU threads (--smoke: 1, steadier on a shared CPU)")
    parser.add_argument("--smoke", action="store_true", help="toy SD, 2 pairs, 2 timed steps: seconds, for CI")
    parser.add_argument("--method", default="offline", choices=["offline", "spo", "grpo", "draft"],
                        help="offline: the DPO / RankDPO step vs the baseline; spo: one SPO step (step-wise "
                             "resampling + SPM scoring + update); grpo: one GRPO iteration; draft: one DRaFT step "
                             "by phase with its peak memory, a row per K (bench/step_online.py)")
    parser.add_argument("--prompts", "--images", dest="prompts", type=int, default=None,
                        help="online: prompts per rollout (default 1; draft: 2)")
    parser.add_argument("--group-size", type=int, default=None, help="online: SPO's k candidates / GRPO's G images "
                        "per prompt (default 2 / 4; draft 1)")
    parser.add_argument("--num-steps", type=int, default=None, help="online: sampling steps per rollout (default "
                        "6; draft 10)")
    parser.add_argument("--k", nargs="+", type=int, default=[1, 2, 5],
                        help="draft: the differentiable last steps, a row each")
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="draft: no activation checkpointing of the differentiable steps and decode")
    parser.add_argument("--both", action="store_true", help="draft: every K with and without checkpointing")
    parser.add_argument("--kl-coeff", type=float, default=None,
                        help="draft: DRaFT+'s KL coefficient (default: the recipe's; > 0 adds the reference forwards)")
    parser.add_argument("--draft-row", action="store_true", help=argparse.SUPPRESS)  # one row, JSON on stdout
    parser.add_argument("--divert-start-step", type=int, default=2, help="SPO: steps before the chain branches")
    parser.add_argument("--train-batch-size", type=int, default=4, help="online: pairs / samples per micro-batch")
    parser.add_argument("--tag", help="results file stem (default: arch-device-date)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help=f"output folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    draft = args.method == "draft"
    if args.group_size is None:
        args.group_size = {"spo": 2, "draft": 1}.get(args.method, 4)
    if args.prompts is None:
        args.prompts = 2 if draft else 1
    if args.num_steps is None:
        args.num_steps = 10 if draft else 6
    if args.method != "offline" and args.arch is None:
        args.arch = {"spo": ["toy-sd"], "draft": ["toy-sd"]}.get(args.method, ["toy-sd3", "toy-sd"])
    if draft:
        for k in args.k:
            if not 1 <= k <= args.num_steps:
                parser.error(f"--k {k}: DRaFT's K must be in [1, --num-steps {args.num_steps}]")
        if args.both and args.no_checkpointing:
            parser.error("--both already runs every K with and without checkpointing; drop --no-checkpointing")
        # one warm-up step sets the peak memory; one timed step and one phased step per row
        for key in ("steps", "warmup", "phase_steps"):
            if getattr(args, key) is None:
                setattr(args, key, 1)
    if args.smoke:
        defaults = dict(arch=["toy-sd"], pairs=2, steps=5, warmup=1, phase_steps=1, threads=1)
    else:
        defaults = dict(arch=["toy-sd", "toy-sdxl", "toy-sd3"], pairs=4 if on_gpu else 2,
                        steps=5 if on_gpu else 3, warmup=3 if on_gpu else 1, phase_steps=2)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.time_budget is None:
        args.time_budget = 510.0 if on_gpu else float("inf")
    if args.pairs < 2 or args.pairs % 2:
        parser.error(f"--pairs must be an even number >= 2 (RankDPO runs pairs * 2 / 4 groups), got {args.pairs}")
    return args


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(parse_args())
