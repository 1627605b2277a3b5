"""`fastpref spm train --config configs/spm/<recipe>.yaml [key=value ...]`: train a step-aware preference model.

SPO's recipe (RockeyCoss/SPO, step_aware_preference_model/trainer/tasks/spm_task.py, criterions/spm_criterion.py):
each training pair (image 0, image 1, caption, soft label) is encoded by the *base* diffusion model's VAE, both
latents are noised to one random t in [0, T) with one shared noise, the base model predicts x0 in one step with
classifier-free guidance 5, x0 is decoded, and the SPM scores both decoded images at t. The loss is the 2-way
cross-entropy of softmax(logit_scale * <img, txt>) against the soft label (1 / 0.5 tie / 0), plus log(0.5) on ties
so a perfect model has loss 0, each example weighted 1 / (examples of its prompt) (`spm_loss`). AdamW, constant
lr after a linear warmup, gradient norm clipped to 1.

Data: a Syn-Pic dataset root (`fastpref synth` + `fastpref label`): every pair of images of a prompt, labelled by
the ensemble's psi (the win rate over the label stage's reward models; equal psi = a tie). `data.eval_groups`
prompt groups are held out; on them the SPM and its initialisation (the base reward, which ignores t) are scored
at `eval_timesteps` on the non-tied pairs (t = 0: the clean images, as SPO evaluates), with fixed noise.

Writes <output>/ (a folder `build_reward("spm", output)` loads) with metrics.json (accuracy per t, trained vs
initial, the loss curve summary, wall time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fastpref.config import ConfigError, load_config, to_dict


@dataclasses.dataclass
class SPMInitConfig:
    kind: Literal["shapeclip", "clip"] = "shapeclip"
    model: str | None = None  # shapeclip: None = the shipped ShapeCLIP; clip: a CLIPModel (yuvalkirstain/PickScore_v1)
    processor: str | None = None  # clip: tokenizer / image processor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)

    def validate(self) -> None:
        if self.kind == "clip" and not self.model:
            raise ConfigError("model: kind 'clip' needs a CLIP checkpoint (e.g. yuvalkirstain/PickScore_v1)")


@dataclasses.dataclass
class SPMDiffusionConfig:
    model: str = "toy-sd"  # the base diffusion model whose one-step x0 predictions the SPM learns to rank
    family: Literal["sd", "sdxl", "sd3"] | None = None  # None: read from the folder's model_index.json
    guidance_scale: float = 5.0  # SPMTaskConfig.cfg_scale
    negative_prompt: str = ""

    def validate(self) -> None:
        if self.guidance_scale < 1.0:
            raise ConfigError(f"guidance_scale: must be >= 1, got {self.guidance_scale}")


@dataclasses.dataclass
class SPMDataConfig:
    root: str  # Syn-Pic dataset root holding synth/ and label/
    pairs: Literal["all", "best_worst"] = "all"  # all: every pair of a prompt's images (ties included)
    tie_tolerance: float = 0.0  # psi differences up to this are ties (label 0.5)
    eval_groups: int = 48  # prompt groups held out for the accuracy table
    max_eval_pairs: int = 512

    def validate(self) -> None:
        if self.tie_tolerance < 0 or self.eval_groups < 0 or self.max_eval_pairs < 1:
            raise ConfigError("tie_tolerance and eval_groups must be >= 0, max_eval_pairs >= 1")


@dataclasses.dataclass
class SPMTrainConfig:
    output: str
    data: SPMDataConfig
    init: SPMInitConfig = dataclasses.field(default_factory=SPMInitConfig)
    diffusion: SPMDiffusionConfig = dataclasses.field(default_factory=SPMDiffusionConfig)
    steps: int = 4000  # SPO: accelerator.max_steps
    batch_size: int = 16  # pairs per step (SPO: 16 per GPU x 4 GPUs)
    lr: float = 1e-6  # SPO: AdamWOptimizerConfig.lr
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which SPO keeps
    lr_warmup_steps: int = 500  # SPO: constant_with_warmup
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_timesteps: list[int] = dataclasses.field(default_factory=lambda: [0, 251, 501, 701, 951])  # SPO's
    eval_batch_size: int = 64
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    progress: bool = True

    def validate(self) -> None:
        for key in ("steps", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0 or self.lr_warmup_steps < 0 or self.max_grad_norm <= 0:
            raise ConfigError("lr and max_grad_norm must be > 0, lr_warmup_steps >= 0")
        if any(t < 0 for t in self.eval_timesteps):
            raise ConfigError(f"eval_timesteps: must be >= 0, got {self.eval_timesteps}")


def check_diffusion_model(config: SPMDiffusionConfig, key: str = "diffusion") -> str:
    """The family of the base diffusion model, refusing flow matching, before any weights load."""
    from fastpref.online.spo import check_model_family

    return check_model_family(config.model, config.family, f"{key}.model",
                              why="the SPM is trained on one-step x0 predictions of a DDPM (eps / v) model, as "
                                  "SPO's are", hint=f"; set {key}.family")


# ---------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class PreferencePairs:
    """Pairs of one Syn-Pic dataset: images, one (G_s, K, S, S, 3) uint8 array per shard (memory-mapped), with
    each group's (shard, row) in group_rows (G, 2); prompts (G,); pairs (P, 3) int64 (group, image 0, image 1)
    with label_0 (P,) float32 in {1, 0.5, 0} and examples_per_prompt (P,) float32."""

    images: list
    group_rows: np.ndarray
    prompts: list[str]
    pairs: np.ndarray
    label_0: np.ndarray
    examples_per_prompt: np.ndarray

    def subset(self, rows: np.ndarray) -> "PreferencePairs":
        pairs, labels = self.pairs[rows], self.label_0[rows]
        prompts = [self.prompts[g] for g in pairs[:, 0]]
        counts: dict[str, int] = {}
        for prompt in prompts:
            counts[prompt] = counts.get(prompt, 0) + 1
        return PreferencePairs(self.images, self.group_rows, self.prompts, pairs, labels,
                               np.asarray([counts[p] for p in prompts], dtype=np.float32))

    def image(self, group: int, index: int) -> np.ndarray:
        shard, row = self.group_rows[group]
        return np.asarray(self.images[shard][row, index])


def preference_pairs(psi: np.ndarray, mode: str, tie_tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """(G, K) psi -> (P, 3) (group, i, j) and label_0 (P,): 1 if psi_i > psi_j + tol, 0.5 within tol, else 0.
    all: every i < j; best_worst: the first- and last-ranked image of each group (skipped when tied)."""
    from fastpref.rewards.ensemble import pairwise_wins, ranks_from_psi

    rows, labels = [], []
    wins = pairwise_wins(psi, tie_tolerance)
    if mode == "all":
        k = psi.shape[1]
        for g in range(psi.shape[0]):
            for i in range(k):
                for j in range(i + 1, k):
                    rows.append((g, i, j))
                    labels.append(wins[g, i, j])
    elif mode == "best_worst":
        ranks = ranks_from_psi(psi)
        for g in range(psi.shape[0]):
            best, worst = int(np.argmin(ranks[g])), int(np.argmax(ranks[g]))
            if wins[g, best, worst] == 1.0:
                rows.append((g, best, worst))
                labels.append(1.0)
    else:
        raise ValueError(f"pairs must be 'all' or 'best_worst', got {mode!r}")
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3), np.asarray(labels, dtype=np.float32)


def load_pairs(config: SPMDataConfig) -> PreferencePairs:
    """Every labelled pair of a Syn-Pic root (synth/ images, label/ psi); errors name the missing stage."""
    from fastpref.data.shards import ShardError, StageDir

    root = Path(config.root)
    try:
        synth = StageDir(root, "synth").open()
        label = StageDir(root, "label").open()
    except ShardError as err:
        raise ConfigError(f"data.root: {err} (run fastpref synth and fastpref label on it first)") from None
    images, rows, prompts, psi = [], [], [], []
    for index in range(len(synth.shards)):
        images.append(synth.load(index, "images.npy", mmap=True))  # real datasets do not fit in memory
        groups = synth.load_json(index, "groups.json")
        prompts += [g["prompt"] for g in groups]
        rows += [(index, row) for row in range(len(groups))]
        psi.append(label.load(index, "psi.npy"))
    pairs, label_0 = preference_pairs(np.concatenate(psi), config.pairs, config.tie_tolerance)
    if len(pairs) == 0:
        raise ConfigError(f"data.root: {root} gives no preference pairs (pairs: {config.pairs})")
    data = PreferencePairs(images, np.asarray(rows, dtype=np.int64).reshape(-1, 2), prompts, pairs, label_0,
                           np.ones(len(pairs), dtype=np.float32))
    return data.subset(np.arange(len(pairs)))


def split_pairs(data: PreferencePairs, eval_groups: int, seed: int) -> tuple[PreferencePairs, PreferencePairs]:
    """(train, held-out) by prompt group: `eval_groups` groups drawn with `seed` are held out."""
    groups = np.random.default_rng(seed).permutation(len(data.prompts))[:eval_groups]
    held = np.isin(data.pairs[:, 0], groups)
    if held.all():
        raise ConfigError(f"data.eval_groups: {eval_groups} holds out every pair; nothing is left to train on")
    return data.subset(np.nonzero(~held)[0]), data.subset(np.nonzero(held)[0])


# ---------------------------------------------------------------------------------------------- model side


def spm_loss(scores_0: torch.Tensor, scores_1: torch.Tensor, label_0: torch.Tensor,
             examples_per_prompt: torch.Tensor) -> torch.Tensor:
    """SPO's SPMCriterion (in_batch_negatives=False): per example the cross-entropy of softmax(scores_0, scores_1)
    against the soft label (label_0, 1 - label_0), plus log(0.5) on ties (so a perfect model scores 0), weighted by
    1 / examples_per_prompt normalised to sum 1 over the batch. scores are logit_scale * cosine."""
    log_p = torch.stack([scores_0, scores_1], dim=-1).float().log_softmax(dim=-1)
    label_0 = label_0.to(log_p)
    loss = -(label_0 * log_p[:, 0] + (1 - label_0) * log_p[:, 1])
    loss = loss + (label_0 == 0.5).to(log_p) * float(np.log(0.5))
    weight = 1.0 / examples_per_prompt.to(log_p)
    return (loss * weight / weight.sum()).sum()


class OneStepX0:
    """The base diffusion model's one-step x0 of noised images, decoded to [0, 1] pixels (SPMTask.get_noised_imgs):
    VAE-encode (a sample of the latent distribution), add one shared noise at t, CFG prediction, x0, decode."""

    def __init__(self, bundle, guidance_scale: float, negative_prompt: str):
        from fastpref.online.sampler import sampling_timesteps

        self.bundle, self.guidance_scale = bundle, guidance_scale
        # the x0 of diffusers' DDIMScheduler.step with set_timesteps(T), as SPO's BatchableDDIMScheduler gives it
        self.schedule = sampling_timesteps(bundle, bundle.num_train_timesteps)
        with torch.no_grad():
            if negative_prompt:
                self.uncond = bundle.encode_prompt([negative_prompt])
            else:  # the pipeline's own negative conditioning (SDXL: zeros, force_zeros_for_empty_prompt)
                from fastpref.online.rollout import unconditional_conditioning

                self.uncond = unconditional_conditioning(bundle)

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], prompts: list[str], t: torch.Tensor,
                 generator: torch.Generator) -> list[torch.Tensor]:
        """images: M uint8 (B, S, S, 3) batches sharing prompts (B,), timesteps t (B,) and one noise per row."""
        from fastpref.online.sampler import ddim_step, guided_prediction
        from fastpref.rewards.base import to_pixels

        bundle, device = self.bundle, self.bundle.device
        latents = [bundle.encode_images(to_pixels(x).to(device) * 2 - 1, generator=generator).float() for x in images]
        noise = torch.randn(latents[0].shape, generator=generator).to(device)
        t = t.to(device)
        noisy = torch.cat([bundle.add_noise(x, noise, t) for x in latents])
        cond = bundle.encode_prompt(list(prompts))
        m = len(images)
        cond = {k: torch.cat([v] * m) for k, v in cond.items()}
        uncond = {k: v.expand(len(noisy), *v.shape[1:]) for k, v in self.uncond.items()}
        t_all = torch.cat([t] * m)
        pred = guided_prediction(bundle, noisy.to(bundle.dtype), t_all, cond, uncond, self.guidance_scale)
        x0 = ddim_step(self.schedule.scheduler, pred, t_all.cpu(), noisy, eta=0.0).pred_original_sample
        pixels = (bundle.decode_latents(x0).float() / 2 + 0.5).clamp(0, 1)
        return list(pixels.chunk(m))


def _rows(data: PreferencePairs, rows: np.ndarray):
    pairs = data.pairs[rows]
    return (np.stack([data.image(g, i) for g, i, _ in pairs]), np.stack([data.image(g, j) for g, _, j in pairs]),
            [data.prompts[g] for g in pairs[:, 0]])


@torch.no_grad()
def eval_images(x0: OneStepX0, data: PreferencePairs, timesteps: list[int], seed: int, batch_size: int) -> dict:
    """Held-out non-tied pairs -> {t: (pixels_0, pixels_1)} uint8, fixed noise per (seed, t); t = 0 is the clean
    image (as SPO's evaluation)."""
    from fastpref.data.noise import group_generator
    from fastpref.rewards.base import to_uint8

    out = {}
    for t in timesteps:
        firsts, seconds = [], []
        for start in range(0, len(data.pairs), batch_size):
            rows = np.arange(start, min(start + batch_size, len(data.pairs)))
            image_0, image_1, prompts = _rows(data, rows)
            if t == 0:
                firsts.append(image_0)
                seconds.append(image_1)
                continue
            generator = group_generator(seed, t, start, "spm/eval")
            p0, p1 = x0([image_0, image_1], prompts, torch.full((len(rows),), t), generator)
            firsts.append(to_uint8(p0))
            seconds.append(to_uint8(p1))
        out[t] = (np.concatenate(firsts), np.concatenate(seconds))
    return out


@torch.no_grad()
def accuracy(model, data: PreferencePairs, images: dict, batch_size: int) -> dict[str, float]:
    """Share of held-out non-tied pairs whose preferred image the model scores higher, per t."""
    from fastpref.rewards.base import to_pixels

    was_training = model.training
    model.eval()
    result = {}
    prompts_all = [data.prompts[g] for g in data.pairs[:, 0]]
    for t, (first, second) in images.items():
        correct = []
        for start in range(0, len(first), batch_size):
            end = min(start + batch_size, len(first))
            prompts = prompts_all[start:end]
            ts = torch.full((end - start,), t)
            s0 = model(to_pixels(first[start:end]), prompts, ts)
            s1 = model(to_pixels(second[start:end]), prompts, ts)
            label = torch.as_tensor(data.label_0[start:end])
            correct.append(((s0 > s1).float() * label + (s0 < s1).float() * (1 - label)).cpu())
        result[str(t)] = float(torch.cat(correct).mean())
    model.train(was_training)
    return result


# ---------------------------------------------------------------------------------------------- training


def train_spm(config: SPMTrainConfig) -> dict:
    """Train, evaluate (initial and trained model on the held-out pairs) and save to config.output."""
    from fastpref.data.noise import group_generator
    from fastpref.data.synth import resolve_device
    from fastpref.models import load as load_bundle
    from fastpref.rewards.spm import StepAwareModel

    family = check_diffusion_model(config.diffusion)
    data = load_pairs(config.data)  # bad data errors before any model loads
    train, held = split_pairs(data, config.data.eval_groups, config.seed)
    held = held.subset(np.nonzero(held.label_0 != 0.5)[0][: config.data.max_eval_pairs])
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    bundle = load_bundle(config.diffusion.model, family=family, device=device)
    for module in [bundle.denoiser, bundle.vae, *bundle.text_modules()]:
        module.requires_grad_(False).eval()
    x0 = OneStepX0(bundle, config.diffusion.guidance_scale, config.diffusion.negative_prompt)
    model = StepAwareModel.from_base(config.init.kind, config.init.model, config.init.processor, device=device)
    model.train()

    held_images = eval_images(x0, held, config.eval_timesteps, config.seed, config.eval_batch_size)
    initial = accuracy(model, held, held_images, config.eval_batch_size) if len(held.pairs) else {}

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(config.lr_warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    losses: list[float] = []
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc="spm", dynamic_ncols=True)
    train_started = time.perf_counter()
    for step in range(config.steps):
        generator = group_generator(config.seed, step, 0, "spm/train")
        rows = torch.randint(len(train.pairs), (config.batch_size,), generator=generator).numpy()
        image_0, image_1, prompts = _rows(train, rows)
        t = torch.randint(0, bundle.num_train_timesteps, (config.batch_size,), generator=generator)
        pixels_0, pixels_1 = x0([image_0, image_1], prompts, t, generator)
        scores = model(torch.cat([pixels_0, pixels_1]), prompts * 2, torch.cat([t, t]).to(device))
        loss = spm_loss(scores[: len(rows)], scores[len(rows):], torch.as_tensor(train.label_0[rows]),
                        torch.as_tensor(train.examples_per_prompt[rows]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - train_started
    trained = accuracy(model, held, held_images, config.eval_batch_size) if len(held.pairs) else {}
    metrics = {
        "steps": config.steps,
        "train_pairs": int(len(train.pairs)),
        "held_out_pairs": int(len(held.pairs)),
        "held_out_groups": int(config.data.eval_groups),
        "accuracy": trained,
        "accuracy_initial": initial,
        "first_loss": float(np.mean(losses[:20])),
        "final_loss": float(np.mean(losses[-50:])),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    out = Path(config.output)
    model.save_pretrained(out, extra={"diffusion_model": config.diffusion.model, "family": family,
                                      "train_config": to_dict(config)})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastpref spm", description="step-aware preference model (SPO's SPM)")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train an SPM from Syn-Pic preference pairs (configs/spm/)")
    train.add_argument("-c", "--config", required=True, help="YAML config (configs/spm/*.yaml)")
    train.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    convert = sub.add_parser("convert", help="SPO's released SPM checkpoint (.bin) -> a fastpref SPM folder")
    convert.add_argument("--spo-checkpoint", required=True, help="e.g. sd-v1-5_step-aware_preference_model.bin")
    convert.add_argument("--base", default="yuvalkirstain/PickScore_v1", help="the CLIP the checkpoint extends")
    convert.add_argument("--processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    convert.add_argument("--out", required=True, help="output folder (build_reward('spm', out) loads it)")
    args = parser.parse_args(argv)
    if args.action == "convert":
        from fastpref.rewards.spm import convert_spo_checkpoint

        try:
            convert_spo_checkpoint(args.spo_checkpoint, args.base, args.processor, args.out)
        except (ValueError, OSError) as err:
            print(f"fastpref spm convert: {err}", file=sys.stderr)
            return 2
        print(f"fastpref spm convert: {args.spo_checkpoint} -> {args.out}")
        return 0
    try:
        config = load_config(SPMTrainConfig, args.config, args.overrides)
        check_diffusion_model(config.diffusion)
    except ConfigError as err:
        print(f"fastpref spm train: {err}", file=sys.stderr)
        return 2
    try:
        metrics = train_spm(config)
    except ConfigError as err:
        print(f"fastpref spm train: {args.config}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
