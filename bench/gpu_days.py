"""GPU-days of the published SDXL preference-tuning recipes at a measured training-step speed.

Recipes and the assumptions behind their sizes (change them here, with a source):

  Diffusion-DPO on SDXL (Wallace et al. 2023): 2,000 optimizer steps x 2,048 pairs per step (effective batch) =
      4.10M pairs; the step count is the public launcher's (launchers/sdxl.sh: --max_train_steps=2000,
      16 GPUs x batch 1 x 128 accumulation = 2048), the batch the paper's. Published cost: ~30 A100 GPU-days, as
      tabulated by the RankDPO paper.
  RankDPO on SDXL (Karthik et al. 2024): Syn-Pic, ~58K prompts with K=4 ranked images each. Published cost:
      ~6 A100 GPU-days. The paper's number of passes over Syn-Pic is not recorded in this repository, so the
      estimate is given per epoch (58K groups) together with the number of epochs 6 GPU-days would buy at the
      measured speed; pass --rankdpo-epochs to turn it into one figure.

The estimate assumes ideal data-parallel scaling (GPU-days = work / per-device throughput) and one device of the
measured kind; it is only meaningful from a step measured at SDXL's real shape (1024^2, full width).

fastpref's training step skips the VAE / text encoders and the reference forward because its cache stage ran them:
that stage is added to fastpref's GPU-days, timed by the baseline row measured in the same run on the same device
(its `encode` and `reference` phases per image): encoding once per unique image (Diffusion-DPO: the ~851K tie-free
Pick-a-Pic v2 pairs, 2 images each, an upper bound as pairs share images; RankDPO: 58K x 4), and one reference
forward per image seen in training (cached errors are drawn for each epoch's (t, noise)). A sweep of R runs over
the same data, seeds and reference can share one cache: the `cache reused by R runs` figure divides the cache stage
by R. That reuse is an option, not assumed in the GPU-days column.

    python bench/gpu_days.py bench/results/step-sdxl-cuda-....csv [--rankdpo-epochs 4]
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass

SECONDS_PER_DAY = 86_400.0
DPO_SDXL_STEPS = 2_000
DPO_SDXL_PAIRS_PER_STEP = 2_048
DPO_SDXL_PUBLISHED_A100_DAYS = 30.0
RANKDPO_PROMPTS = 58_000
RANKDPO_GROUP_SIZE = 4
RANKDPO_PUBLISHED_A100_DAYS = 6.0
DPO_PICKAPIC_PAIRS = 851_000  # tie-free Pick-a-Pic v2 pairs (configs/sd15-dpo.yaml)
SWEEP_RUNS = 4  # the "cache reused" column: a sweep of this many runs sharing one cache


@dataclass
class Estimate:
    recipe: str
    system: str
    mode: str
    device: str
    work: str  # what was counted
    gpu_days: float  # training + cache stage
    published_a100_days: float
    note: str = ""
    cache_days: float = 0.0  # of gpu_days: the cache stage (fastpref); 0 for the baseline, which encodes live


def dpo_gpu_days(pairs_per_s: float) -> float:
    return DPO_SDXL_STEPS * DPO_SDXL_PAIRS_PER_STEP / pairs_per_s / SECONDS_PER_DAY


def rankdpo_gpu_days_per_epoch(groups_per_s: float) -> float:
    return RANKDPO_PROMPTS / groups_per_s / SECONDS_PER_DAY


def cache_seconds_per_image(rows: list[dict], mode: str) -> tuple[float, float] | None:
    """(encode, reference forward) seconds per image, from the baseline row of this mode measured in the same run."""
    for row in rows:
        if row.get("system") == "baseline" and row.get("mode") == mode and row.get("status") == "ok":
            images = float(row["images_per_step"])
            return float(row["encode_ms"]) / 1e3 / images, float(row["reference_ms"]) / 1e3 / images
    return None


def estimates_from_rows(rows: list[dict], device: str, representative: bool,
                        rankdpo_epochs: float | None = None) -> list[Estimate]:
    """Estimates from bench/step.py rows (measured headline rows of the SDXL architecture)."""
    note = "" if representative else "NOT representative: measured at a reduced shape (ratios only)"
    out = []
    for row in rows:
        if row.get("section") != "headline" or row.get("status") != "ok":
            continue
        images_per_s = float(row["images_per_s"])
        cache = cache_seconds_per_image(rows, row["mode"]) if row["system"] == "fastpref" else None
        missing = ("cache stage not costed: no baseline row of this mode in the run"
                   if row["system"] == "fastpref" and cache is None else "")

        def cache_days(unique_images: float, images_seen: float) -> float:
            if cache is None:
                return 0.0
            encode_s, reference_s = cache
            return (unique_images * encode_s + images_seen * reference_s) / SECONDS_PER_DAY

        if row["objective"] == "dpo":
            pairs_per_s = images_per_s / 2  # a DPO pair is two images
            seen = 2.0 * DPO_SDXL_STEPS * DPO_SDXL_PAIRS_PER_STEP
            stage = cache_days(2.0 * DPO_PICKAPIC_PAIRS, seen)
            out.append(Estimate("Diffusion-DPO SDXL (2000 steps x 2048 pairs)", row["system"], row["mode"], device,
                                "4.10M pairs", dpo_gpu_days(pairs_per_s) + stage, DPO_SDXL_PUBLISHED_A100_DAYS,
                                "; ".join(filter(None, [note, missing])), stage))
        elif row["objective"] == "rankdpo" and int(row["group_size"]) == RANKDPO_GROUP_SIZE:
            per_epoch = rankdpo_gpu_days_per_epoch(images_per_s / RANKDPO_GROUP_SIZE)
            images = float(RANKDPO_PROMPTS * RANKDPO_GROUP_SIZE)
            epochs = rankdpo_epochs if rankdpo_epochs is not None else 1.0
            stage = cache_days(images, images * epochs)
            extra = f"{RANKDPO_PUBLISHED_A100_DAYS / per_epoch:.3g} training epochs in 6 GPU-days"
            if rankdpo_epochs is not None:
                recipe, work = f"RankDPO SDXL ({rankdpo_epochs:g} epochs of 58K x K=4)", f"{rankdpo_epochs:g} x 58K groups"
            else:
                recipe, work = "RankDPO SDXL, per epoch (58K prompts x K=4)", "58K groups"
            out.append(Estimate(recipe, row["system"], row["mode"], device, work, per_epoch * epochs + stage,
                                RANKDPO_PUBLISHED_A100_DAYS, "; ".join(filter(None, [note, missing, extra])), stage))
    return out


def markdown(estimates: list[Estimate]) -> str:
    lines = ["| recipe | system | mode | device | work | GPU-days (measured device; training + cache stage) "
             f"| of which cache stage | cache reused by {SWEEP_RUNS} runs | published (A100) | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in estimates:
        reused = e.gpu_days - e.cache_days + e.cache_days / SWEEP_RUNS
        lines.append(f"| {e.recipe} | {e.system} | {e.mode} | {e.device} | {e.work} | {e.gpu_days:.3g} | "
                     f"{e.cache_days:.3g} | {reused:.3g} | {e.published_a100_days:g} | {e.note} |")
    lines.append("")
    lines.append("Assumptions: bench/gpu_days.py (step counts and their sources, ideal data-parallel scaling; the "
                 "cache stage timed by the baseline's encode and reference phases on the same device).")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="a bench/step.py results CSV with SDXL rows")
    parser.add_argument("--rankdpo-epochs", type=float, help="passes over Syn-Pic to cost (default: per epoch)")
    args = parser.parse_args(argv)
    with open(args.csv, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["arch"] == "sdxl"]
    if not rows:
        raise SystemExit(f"{args.csv}: no rows with arch 'sdxl' (run bench/step.py --arch sdxl)")
    representative = all("width" not in row["shape"] and row["shape"].startswith("sdxl 1024px") for row in rows)
    device = rows[0].get("env_device", "?")
    print(markdown(estimates_from_rows(rows, device, representative, args.rankdpo_epochs)))


if __name__ == "__main__":
    main()
