"""Peak memory and time of one DRaFT step against K (the differentiable last steps), with random weights.

One DRaFT step as fastpref.online.draft runs it: the first N - K sampling steps batched under inference_mode, the
last K with gradient (each denoiser call checkpointed, or not with --no-checkpointing), the differentiable VAE
decode, a differentiable reward (the toy quality reward: prompt-blind, any resolution, no weights to fetch), DRaFT+'s
KL against the adapters-off reference, the backward. Architectures are bench/step.py's: the toy models, or SD1.5 /
SDXL built from configs/models/*.json with random weights (narrowed with --width-scale, smaller with --resolution);
text conditioning is random tensors of the denoiser's shapes (the text encoders are not part of the step).

Peak memory: torch.cuda.max_memory_allocated on a GPU; on a CPU the process's peak RSS (ru_maxrss) over the RSS
after the model is built, each row in its own process (ru_maxrss never goes down).

    python bench/draft_memory.py --arch toy-sd toy-sdxl toy-sd3 --k 1 2 5 10      # CPU, the toy shapes
    python bench/draft_memory.py --arch sd15 --width-scale 0.25 --resolution 256 --num-steps 10 --k 1 2 4
    python bench/draft_memory.py --arch sd15 sdxl --device cuda --k 1 2 5 10 50   # GPU, the real shapes

Writes bench/results/draft-memory-<archs>-<device>.csv and .md (with device and versions).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, environment, resolve_device  # noqa: E402
from step_archs import load_arch  # noqa: E402


def random_conditioning(bundle, n: int, device) -> dict[str, torch.Tensor]:
    """Random text conditioning of the denoiser's shapes (one row per image)."""
    config = bundle.denoiser.config
    generator = torch.Generator().manual_seed(0)
    if bundle.family == "sd3":
        return {"encoder_hidden_states": torch.randn(n, 16, config.joint_attention_dim, generator=generator),
                "pooled_projections": torch.randn(n, config.pooled_projection_dim, generator=generator)}
    cond = {"encoder_hidden_states": torch.randn(n, 16, config.cross_attention_dim, generator=generator)}
    if bundle.family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        cond["text_embeds"] = torch.randn(n, pooled, generator=generator)
        cond["time_ids"] = bundle.time_ids(n).cpu()
    return {key: value.to(device) for key, value in cond.items()}


class BenchEngine:
    """What DRaFTMethod reads of the OnlineTrainer, on a random-weight bundle with LoRA and no process group."""

    def __init__(self, bundle, cfg, device):
        from fastpref.online.rollout import WeightedReward
        from fastpref.train.loop import add_lora
        from fastpref.train.speed import autocast
        from fastpref.train.step import ReferenceModel

        self.cfg, self.bundle, self.device = cfg, bundle, device
        for module in [bundle.vae, *bundle.text_modules()]:
            module.requires_grad_(False).eval()
        self.reference = ReferenceModel("adapters_off", bundle.denoiser)
        add_lora(bundle.denoiser, cfg.lora)
        bundle.denoiser.train()
        self.policy = self.sampling_policy = bundle
        self.reward = WeightedReward({"quality": 1.0}, device)
        self.autocast = autocast(device, cfg.speed.mixed_precision)
        self.rank, self.world_size, self.seed, self.loss_backend = 0, 1, 0, "auto"
        self.uncond = {key: value[:1] for key, value in random_conditioning(bundle, 1, device).items()}

    def encode(self, texts):
        return random_conditioning(self.bundle, len(texts), self.device)

    @torch.no_grad()
    def reference_prediction(self, latents, t, cond, uncond, guidance_scale):
        from fastpref.train.online import OnlineTrainer

        return OnlineTrainer.reference_prediction(self, latents, t, cond, uncond, guidance_scale)


def run_row(args) -> dict:
    from fastpref.config import from_dict
    from fastpref.data.prompts import Prompt
    from fastpref.online.draft import DRaFTMethod
    from fastpref.online.rollout import RolloutPrompts
    from fastpref.train.config import TrainConfig

    device = resolve_device(args.device)
    torch.manual_seed(0)
    arch = load_arch(args.arch, args.width_scale, args.resolution)
    bundle = arch.build(device)
    images = args.images
    cfg = from_dict(TrainConfig, {
        "model": {"path": "toy-sd"}, "objective": {"name": "draft"}, "output_dir": "/tmp/unused",
        "lora": {"rank": 32, "alpha": 32, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        "speed": {"mixed_precision": "bf16" if device.type == "cuda" else "no"},
        "online": {"prompts_per_rollout": images, "group_size": 1, "num_steps": args.num_steps,
                   "guidance_scale": args.guidance_scale, "eta": 0.0, "resolution": arch.resolution,
                   "sample_batch_size": images, "reward": {"quality": 1.0},
                   "draft": {"k": args.k, "kl_coeff": 0.1, "batch_size": images, "vae_batch_size": images,
                             "checkpointing": not args.no_checkpointing}}})
    engine = BenchEngine(bundle, cfg, device)
    method = DRaFTMethod(engine)
    prompts = RolloutPrompts(0, 0, [Prompt(f"p{i}", "a prompt") for i in range(images)])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    started = time.perf_counter()
    batch = method.rollout(prompts)[0][0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    sampled = time.perf_counter()
    out = method.forward(batch, 0)
    out.loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    row = {"arch": arch.describe(), "device": str(device), "images": images, "num_steps": args.num_steps,
           "k": args.k, "checkpointing": not args.no_checkpointing,
           "no_grad_s": round(sampled - started, 4), "grad_s": round(done - sampled, 4),
           "step_s": round(done - started, 4)}
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        row["peak_kind"] = "cuda max_memory_allocated"
    else:
        row["peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - base_rss, 3)
        row["peak_kind"] = "RSS growth over the built model"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["toy-sd"])
    parser.add_argument("--k", nargs="+", type=int, default=[1, 2, 5])
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--width-scale", type=float, default=1.0)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--both", action="store_true", help="every K with and without checkpointing")
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)  # one row in this process
    args = parser.parse_args(argv)
    if args.row:
        args.arch, args.k = args.arch[0], args.k[0]
        print(json.dumps(run_row(args)))
        return 0
    for k in args.k:
        if not 1 <= k <= args.num_steps:
            parser.error(f"--k {k}: must be in [1, --num-steps {args.num_steps}]")
    rows = []
    for arch in args.arch:
        for k in args.k:
            for no_checkpointing in ([False, True] if args.both else [args.no_checkpointing]):
                command = [sys.executable, __file__, "--row", "--arch", arch, "--k", str(k),
                           "--num-steps", str(args.num_steps), "--images", str(args.images),
                           "--guidance-scale", str(args.guidance_scale), "--width-scale", str(args.width_scale),
                           "--device", args.device] + (["--resolution", str(args.resolution)] if args.resolution
                                                       else []) + (["--no-checkpointing"] if no_checkpointing else [])
                proc = subprocess.run(command, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"row {arch} K={k}: failed\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(row, flush=True)
    env = environment()
    device = rows[0]["device"].split(":")[0]
    stem = RESULTS_DIR / f"draft-memory-{'-'.join(args.arch)}-{device}"
    keys = list(rows[0])
    stem.with_suffix(".csv").write_text("\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys)
                                                                         for r in rows]) + "\n")
    lines = [f"# DRaFT step: peak memory and time vs K ({env.get('device', device)})", "",
             f"versions: {json.dumps({k: v for k, v in env.items() if k != 'device'})}", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.csv / .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
