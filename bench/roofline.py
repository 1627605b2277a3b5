"""Time floors of one training step on A100 / H100 / H200, phase by phase, at the real model shapes.

For SD1.5 (512^2), SDXL and SD3-Medium (1024^2) with random-weight-free analytic counts (bench/flops.py on the
configs/models architectures; parameters counted on the meta device), each phase of a step gets its FLOPs and the
bytes it must move at least, and its floor on a device is max(FLOPs / dense bf16 peak, bytes / HBM bandwidth):

  encode       VAE encoder on the images + the text encoders on the captions (the baseline, every step)
  reference    the reference denoiser forward (the baseline every step; fastpref reads cached errors)
  policy       denoiser forward + backward (full: 2x forward; LoRA: 1x weights + 2x attention), plus
               gradient checkpointing's recomputation where the baseline forces it (SDXL, SD3)
  loss ops     the fused preference loss: forward reads pred + target (+ ref_pred when live), backward reads
               pred + target and writes grad_pred (bytes only: a few FLOPs per element)
  optimizer    full fine-tuning: AdamW reads param, grad, m, v and writes param, m, v (fp32: 28 B/param;
               8-bit AdamW: 16 B); the baseline's Adafactor for SDXL/SD3 (no first moment, factored second:
               ~12 B/param); LoRA: the adapters only (< 1% of the base, counted as 0)

The step floor is the sum of its phases' floors (phases run one after another). "fastpref / baseline at the
floor" is the speed-up the step's structure allows when every phase runs at its floor; with --csv, a
bench/step.py results file, the measured phase split of that run is set beside it (on a CPU the measured
shares say which phases dominate; their absolute times say nothing about a GPU). The ops benchmark's target,
>= 80% of copy bandwidth, is given in microseconds per device (copy bandwidth taken as 90% of the datasheet HBM
bandwidth until bench/ops.py measures it on the device).

    python bench/roofline.py                       # -> bench/results/roofline.md
    python bench/roofline.py --images 8 --csv bench/results/step-sdxl-cpu.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flops as flop_count  # noqa: E402
from common import RESULTS_DIR  # noqa: E402
from step_archs import Arch, load_arch  # noqa: E402

import baseline_dpo  # noqa: E402


@dataclass(frozen=True)
class Device:
    name: str
    bf16_tflops: float  # dense, no sparsity (datasheet)
    hbm_tbps: float  # datasheet memory bandwidth


DEVICES = (Device("A100 SXM 80GB", 312.0, 2.039), Device("H100 SXM", 989.0, 3.35), Device("H200", 989.0, 4.8))
COPY_FRACTION = 0.9  # device-to-device copy reaches about this share of the datasheet bandwidth
OPS_TARGET = 0.8  # the ops benchmark's goal: >= 80% of copy bandwidth
ARCHS = (("sd15", 512), ("sdxl", 1024), ("sd3", 1024))
BF16 = 2


@dataclass
class Phase:
    name: str
    flops: float
    bytes: float

    def floor_s(self, device: Device) -> float:
        return max(self.flops / (device.bf16_tflops * 1e12), self.bytes / (device.hbm_tbps * 1e12))


def denoiser_params(arch: Arch) -> int:
    import diffusers
    import torch

    with torch.device("meta"):
        cls = diffusers.SD3Transformer2DModel if arch.family == "sd3" else diffusers.UNet2DConditionModel
        return sum(p.numel() for p in cls(**arch.spec["denoiser"]["config"]).parameters())


def phases(arch: Arch, images: int, mode: str, system: str, params: int) -> list[Phase]:
    groups = images // 2
    forward = arch.denoiser_forward_flops(images)
    backward = flop_count.backward_flops(forward, mode)
    checkpointing = system == "baseline" and baseline_dpo.uses_checkpointing(arch.family)
    weight_bytes = params * BF16  # every forward streams the weights once (bf16 compute copy)
    latent = images * arch.latent_channels * arch.latent_hw[0] * arch.latent_hw[1] * BF16
    out = []
    if system == "baseline":
        out.append(Phase("encode", arch.encode_flops(images, groups).total, images * 3 * arch.resolution**2 * BF16))
        out.append(Phase("reference", forward.total, weight_bytes))
    policy_flops = forward.total + backward.total + (forward.recomputed if checkpointing else 0.0)
    out.append(Phase("policy", policy_flops, 3 * weight_bytes))  # forward, backward: weights + weight grads
    live_ref = system == "baseline"
    out.append(Phase("loss ops", 0.0, latent * ((3 if live_ref else 2) + 3)))
    if mode == "full":
        per_param = 12 if (system == "baseline" and arch.family in ("sdxl", "sd3")) else 28
        out.append(Phase("optimizer", 0.0, params * per_param))
    else:
        out.append(Phase("optimizer", 0.0, 0.0))
    return out


def measured_shares(csv_path: Path | None, arch_name: str, mode: str) -> dict[str, dict[str, float]]:
    """{system: {phase: share of the step}} from a bench/step.py CSV (headline DPO rows of this arch and mode)."""
    if csv_path is None:
        return {}
    shares = {}
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            if (row["arch"], row["mode"], row["objective"], row["section"], row["status"]) != (
                    arch_name, mode, "dpo", "headline", "ok"):
                continue
            total = float(row["phase_sum_ms"])
            shares[row["system"]] = {p: float(row[f"{p}_ms"]) / total for p in
                                     ("data", "encode", "reference", "policy", "optimizer")} | {
                "step_ms": float(row["step_ms"]), "shape": row["shape"]}
    return shares


def report(images: int, csv_path: Path | None) -> str:
    lines = ["# Roofline of one training step (time floors per phase)", "",
             f"{images} images per step per device (DPO: {images // 2} pairs), bf16 compute; floors = max(FLOPs / "
             "dense bf16 peak, bytes / HBM bandwidth) per phase, summed over the phases. Conventions and sources: "
             "`bench/roofline.py`, FLOPs from `bench/flops.py`. Devices: " + ", ".join(
                 f"{d.name} {d.bf16_tflops:g} TFLOP/s, {d.hbm_tbps:g} TB/s" for d in DEVICES) + ".", ""]
    for name, resolution in ARCHS:
        arch = load_arch(name, 1.0, resolution)
        params = denoiser_params(arch)
        lines += [f"## {arch.describe()} ({params / 1e6:.0f}M denoiser parameters, latents "
                  f"{arch.latent_channels}x{arch.latent_hw[0]}x{arch.latent_hw[1]})", ""]
        header = "| mode | system | phase | TFLOP | GB moved | " + " | ".join(f"{d.name} ms" for d in DEVICES) + " |"
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        floors = {}
        for mode in ("full", "lora"):
            for system in ("baseline", "fastpref"):
                plist = phases(arch, images, mode, system, params)
                for p in plist:
                    lines.append(f"| {mode} | {system} | {p.name} | {p.flops / 1e12:.3g} | {p.bytes / 1e9:.3g} | "
                                 + " | ".join(f"{p.floor_s(d) * 1e3:.3g}" for d in DEVICES) + " |")
                total = [sum(p.floor_s(d) for p in plist) for d in DEVICES]
                floors[(mode, system)] = (total, plist)
                lines.append(f"| {mode} | {system} | **step** | {sum(p.flops for p in plist) / 1e12:.3g} | "
                             f"{sum(p.bytes for p in plist) / 1e9:.3g} | "
                             + " | ".join(f"**{t * 1e3:.3g}**" for t in total) + " |")
        lines.append("")
        for mode in ("full", "lora"):
            base, fast = floors[(mode, "baseline")][0], floors[(mode, "fastpref")][0]
            ratio = base[1] / fast[1]
            loss = next(p for p in floors[(mode, "fastpref")][1] if p.name == "loss ops")
            lines.append(f"- {mode}: fastpref / baseline at the floor {ratio:.2f}x (H100); the fused loss ops are "
                         f"{loss.floor_s(DEVICES[1]) / fast[1] * 100:.2g}% of fastpref's floor on H100.")
            shares = measured_shares(csv_path, name, mode)
            if shares:
                for system, share in shares.items():
                    split = ", ".join(f"{p} {share[p] * 100:.0f}%" for p in ("encode", "reference", "policy",
                                                                              "optimizer") if share[p] > 0.005)
                    lines.append(f"  - measured ({share['shape']}, {system}, {share['step_ms']:.0f} ms/step): {split}")
                if {"baseline", "fastpref"} <= set(shares):
                    lines.append(f"  - measured ratio {shares['baseline']['step_ms'] / shares['fastpref']['step_ms']:.2f}x "
                                 f"vs {ratio:.2f}x at the H100 floor")
        lines.append("")
    lines += ["## The ops benchmark's target in microseconds", "",
              "`bench/ops.py` at SDXL latents (N=64 x 4x128x128 bf16): the fused DPO loss forward reads pred, target, "
              "ref_pred (3 x 8.4 MB), the backward reads pred, target and writes grad_pred (3 x 8.4 MB). Target: "
              f">= {OPS_TARGET * 100:.0f}% of copy bandwidth (copy = {COPY_FRACTION * 100:.0f}% of datasheet until "
              "measured).", "", "| device | forward us | backward us | step (fwd+bwd) us |", "|---|---|---|---|"]
    tensor = 64 * 4 * 128 * 128 * BF16
    for d in DEVICES:
        bw = d.hbm_tbps * 1e12 * COPY_FRACTION * OPS_TARGET
        lines.append(f"| {d.name} | {3 * tensor / bw * 1e6:.1f} | {3 * tensor / bw * 1e6:.1f} | {6 * tensor / bw * 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per step per device (default 8 = 4 pairs)")
    parser.add_argument("--csv", type=Path, help="a bench/step.py CSV whose measured phase split to set beside")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "roofline.md")
    args = parser.parse_args(argv)
    if args.images < 2 or args.images % 2:
        parser.error(f"--images must be even and >= 2, got {args.images}")
    text = report(args.images, args.csv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
