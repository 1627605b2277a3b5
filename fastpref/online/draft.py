"""DRaFT: reward backpropagation through the last K sampling steps (Clark et al. 2023, "Directly Fine-Tuning
Diffusion Models on Differentiable Rewards"), DRaFT+ (NVIDIA NeMo-Aligner: a KL guard on the last K steps), DRaFT-LV
and AlignProp-style random truncation, as an online method of fastpref/train/online.py.

One optimizer step (objective.name: draft, settings in online.draft, sampler in online:):

- the rollout draws this step's prompts (online.prompts_per_rollout x online.group_size images), their initial
  noise keyed by (seed, epoch, prompt id) and, for AlignProp, this step's K from (seed, epoch, position); it runs the
  first N - K steps of the deterministic sampler for all of this process's images at once, batched and without
  gradient (torch.inference_mode), so a micro-batch starts at x_{N-K};
- each micro-batch (online.draft.batch_size images) runs the last K steps with gradient through the policy, each
  denoiser call (CFG in one batched call) under activation checkpointing, decodes x_0 with the VAE with gradient
  (chunks of vae_batch_size, also checkpointed), maps it to [0, 1] and scores it with the weighted differentiable
  rewards of online.reward: loss = -mean(reward) + kl_coeff * KL;
- DRaFT+'s KL: the mean over the K differentiable steps of the per-sample mean((eps_pol - eps_ref)^2), the
  reference's guided prediction taken under no_grad at the very x_i the policy saw (LoRA: adapters off; full: the
  frozen copy), computed by fastpref.ops.sample_errors (no N x C x H x W intermediate). As NeMo's
  calculate_gaussian_kl_penalty_shared_var it is on the guided model output (eps for eps models; v / the velocity
  for v-prediction and flow models);
- DRaFT-LV (variant lv, K = 1): all N steps without gradient give x_0; n = lv_samples times it is re-noised to the
  last step's noise level (fresh seeded noise) and the last step is taken with gradient; the loss averages the n
  rewards (and KLs);
- AlignProp (variant alignprop): K drawn uniformly from [k_min, k] per optimizer step (the same on every process),
  the truncated backpropagation AlignProp randomises (TRL's implementation draws from (0, 50) and detaches the
  earlier steps; K = 0 would carry no gradient, so fastpref's range starts at k_min >= 1).

Samplers (deterministic): eps / v families with a DDIM schedule (SD1.5, toy-sd): DDIM eta 0 (NeMo's draftp_sd
infer.sampler_type DDIM, eta 0); the SDXL family: the Euler step in sigma space of diffusers' EulerDiscreteScheduler
(NeMo's draftp_sdxl EulerEDMSampler with s_churn 0 on the LegacyDDPMDiscretization sigmas); flow models: Euler on the
flow ODE. As NeMo, the decoded image is the last step's predicted x0 (see differentiable_steps); the pipeline's final
x_0 differs from it by the last DDIM step's final-alpha offset only.

Where fastpref differs from NeMo-Aligner: initial noise keyed by (seed, epoch, prompt id) (NeMo: a per-rank CUDA
generator), so 1 and N processes, and a resumed run, train on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from fastpref import ops
from fastpref.data.noise import group_generator
from fastpref.online.rollout import RolloutPrompts, expand_rows, index_rows, latent_shape
from fastpref.online.sampler import ddim_step, flow_euler_step, guided_prediction, sampling_timesteps, seeded_normal
from fastpref.train.step import StepOutput

# ---------------------------------------------------------------------------------------------- the sampler


def _rows(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(device=like.device, dtype=torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class DeterministicSampler:
    """The deterministic sampler DRaFT backpropagates through: kind "ddim" (eta 0), "euler" (diffusers'
    EulerDiscreteScheduler, sigma space) or "flow" (Euler on the flow ODE). Latents are kept in float32.

    x_{i+1} = step(i, prediction(model_input(x_i, i), timestep(i)), x_i); initial(noise) is x_0 of the chain;
    renoise(x0, i, noise) puts a clean sample at step i's noise level (DRaFT-LV)."""

    kind: str
    timesteps: torch.Tensor  # (N,) the denoiser's units, CPU
    scheduler: Any  # ddim: the DDIM scheduler ddim_step reads
    sigmas: torch.Tensor | None  # euler / flow: (N + 1,) ending in 0, CPU
    prediction_type: str
    init_sigma: float = 1.0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @classmethod
    def for_bundle(cls, bundle, num_steps: int) -> "DeterministicSampler":
        if bundle.prediction_type == "flow":
            schedule = sampling_timesteps(bundle, num_steps)
            return cls("flow", schedule.timesteps, schedule.scheduler, schedule.sigmas, "flow")
        if bundle.family == "sdxl":
            from fastpref.utils.imports import require

            diffusers = require("diffusers", "the SDXL Euler sampler")
            scheduler = diffusers.EulerDiscreteScheduler.from_config(bundle.sample_scheduler.config)
            if scheduler.config.get("use_karras_sigmas") or scheduler.config.get("use_exponential_sigmas") or \
                    scheduler.config.get("use_beta_sigmas"):
                raise ValueError("DRaFT's SDXL Euler sampler uses the scheduler's own (DDPM) sigmas; a Karras / "
                                 "exponential / beta sigma schedule is not supported")
            scheduler.set_timesteps(num_steps, device="cpu")
            sigmas = scheduler.sigmas.float().cpu()
            return cls("euler", scheduler.timesteps.float().cpu(), scheduler, sigmas,
                       scheduler.config.prediction_type, float(scheduler.init_noise_sigma))
        schedule = sampling_timesteps(bundle, num_steps)
        return cls("ddim", schedule.timesteps, schedule.scheduler, None, schedule.scheduler.config.prediction_type)

    def timestep(self, i: int, n: int, device) -> torch.Tensor:
        return self.timesteps[i].to(device).expand(n)

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        return noise.float() * self.init_sigma

    def model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.kind == "euler":  # EulerDiscreteScheduler.scale_model_input
            return x / (float(self.sigmas[i]) ** 2 + 1) ** 0.5
        return x

    def step(self, i: int, prediction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.step_with_x0(i, prediction, x)[0]

    def step_with_x0(self, i: int, prediction: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{i+1}, the step's predicted x0)."""
        if self.kind == "ddim":
            step = ddim_step(self.scheduler, prediction, self.timesteps[i], x, eta=0.0, noise=torch.zeros_like(x))
            return step.prev_sample, step.pred_original_sample
        if self.kind == "flow":
            x0 = x.float() - float(self.sigmas[i]) * prediction.float()
            return flow_euler_step(self.sigmas[i], self.sigmas[i + 1], prediction, x.float()), x0
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        prediction = prediction.float()
        if self.prediction_type == "epsilon":
            x0 = x - sigma * prediction
        elif self.prediction_type == "v_prediction":
            x0 = prediction * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        else:
            raise ValueError(f"DRaFT's Euler sampler: prediction_type {self.prediction_type!r} is not epsilon or "
                             "v_prediction")
        return x + (sigma_next - sigma) * (x - x0) / sigma, x0  # the ODE derivative (x - x0) / sigma, s_churn 0

    def renoise(self, x0: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        """x0 taken to step i's noise level with `noise` (the forward process of the family)."""
        noise = noise.to(x0)
        if self.kind == "flow":
            s = float(self.sigmas[i])
            return (1 - s) * x0 + s * noise
        if self.kind == "euler":
            return x0 + float(self.sigmas[i]) * noise
        a = self.scheduler.alphas_cumprod[int(self.timesteps[i])].float()
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _conditioning_rows(texts_cond: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in texts_cond.items()}


# ---------------------------------------------------------------------------------------------- the method


class DRaFTMethod:
    """DRaFT-K / DRaFT-LV / DRaFT+ / AlignProp for the engine (interface: fastpref/online/__init__.py)."""

    name = "draft"

    def __init__(self, engine):
        self.engine = engine
        self.online = engine.cfg.online
        self.cfg = engine.cfg.online.draft
        bundle = engine.bundle
        self.sampler = DeterministicSampler.for_bundle(bundle, self.online.num_steps)
        images = self.online.prompts_per_rollout * self.online.group_size
        if images % (engine.world_size * self.cfg.batch_size):
            raise ValueError(f"online.draft.batch_size: the {images} images of a step (prompts_per_rollout x "
                             f"group_size) cannot be split into micro-batches of {self.cfg.batch_size} on each of "
                             f"{engine.world_size} processes")
        self.chunks = images // (engine.world_size * self.cfg.batch_size)
        self.shape = latent_shape(bundle, self.online.resolution)
        self._shapeclip = None  # the run's toy world's ShapeCLIP, for the validation diversity (loaded once)
        self.guided = self.online.guidance_scale > 1
        self.scale = self.online.guidance_scale if self.guided else 1.0
        self.rollout_metrics: dict[str, float] = {}
        # inference_mode tensors may not re-enter autograd; the copy out of it is one latent per image. FSDP2 / ZeRO-3
        # gather parameters in their hooks, which inference_mode would mark as inference tensors: no_grad there
        self.no_grad = torch.inference_mode if engine.cfg.parallel not in ("fsdp2", "zero3") else torch.no_grad

    # ------------------------------------------------------------------ what the engine asks
    @staticmethod
    def needs_reference(cfg) -> bool:
        return cfg.online.draft.kl_coeff > 0

    @staticmethod
    def configured_steps_per_rollout(cfg) -> int:
        return 1  # a "rollout" is one step's prompts: the policy samples inside the step itself

    steps_per_rollout = 1

    @property
    def micro_batches_per_step(self) -> int:
        return self.chunks

    def state_dict(self) -> dict[str, Any]:
        return {}  # all randomness is keyed by (seed, epoch, prompt position): nothing to carry over

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def truncation(self, prompts: RolloutPrompts) -> int:
        """This step's K: draft.k, or for AlignProp a draw from [k_min, k] keyed by the step's prompt position."""
        if self.cfg.variant != "alignprop":
            return self.cfg.k
        generator = group_generator(self.engine.seed, prompts.epoch, prompts.start, "online/draft-k")
        return int(torch.randint(self.cfg.k_min, self.cfg.k + 1, (1,), generator=generator))

    def rollout(self, prompts: RolloutPrompts) -> list[list[dict[str, Any]]]:
        """This process's images of the step, advanced without gradient to where the differentiable part starts."""
        engine, g = self.engine, self.online.group_size
        mine = prompts.shard(engine.rank, engine.world_size)
        k = self.truncation(prompts)
        lv = self.cfg.variant == "lv"
        start = self.sampler.num_steps if lv else self.sampler.num_steps - k
        noise = seeded_normal(engine.seed, prompts.epoch, mine.ids, g, self.shape, "init")
        texts = [text for text in mine.texts for _ in range(g)]
        cond = {key: value.repeat_interleave(g, dim=0) for key, value in engine.encode(mine.texts).items()}
        x = self.sample_prefix(self.sampler.initial(noise), cond, start)
        lv_noise = None
        if lv:
            lv_noise = torch.stack([seeded_normal(engine.seed, prompts.epoch, mine.ids, g, self.shape, f"lv{j}")
                                    for j in range(self.cfg.lv_samples)], dim=1)  # (R, n, C, h, w)
        size = self.cfg.batch_size
        batches = []
        for c in range(self.chunks):
            rows = slice(c * size, (c + 1) * size)
            batch = {"x": x[rows], "start": start, "texts": texts[rows],
                     "cond": {key: value[rows].cpu() for key, value in cond.items()}}
            if lv_noise is not None:
                batch["lv_noise"] = lv_noise[rows]
            batches.append(batch)
        self.rollout_metrics = {"draft_k": float(k), **self.validation_metrics()}
        return [batches]

    def validation_metrics(self) -> dict[str, float]:
        """At the steps the engine draws validation grids (step 0, every validation.every): the reward and the
        diversity over the seeds of the validation prompts, sampled with the training sampler (online.num_steps, no
        gradient) from the validation seeds. Logged with the next step, i.e. of the weights the grid shows. The
        distances: pixel RMS, and for toy-world models ShapeCLIP 1 - cos (fastpref.eval.diversity)."""
        engine, validation = self.engine, self.engine.cfg.validation
        validator = getattr(engine, "validator", None)
        step = getattr(engine, "step", 0)
        if validator is None or not validation.enabled or len(validation.seeds) < 2 or step % validation.every:
            return {}
        from fastpref.eval import diversity

        texts = list(validator.prompts)
        count = len(texts) * len(validation.seeds)
        # seed-major blocks keyed like a rollout's noise (the same images at every validation step)
        noise = torch.cat([seeded_normal(seed, 0, list(range(len(texts))), 1, self.shape, "draft-validation")
                           for seed in validation.seeds])
        rows = texts * len(validation.seeds)
        cond = {key: value.repeat(len(validation.seeds), *([1] * (value.ndim - 1)))
                for key, value in engine.encode(texts).items()}
        latents = self.sample_prefix(self.sampler.initial(noise), cond, self.sampler.num_steps)
        with torch.no_grad():
            pixels = torch.cat([self.decode(latents[s:s + self.cfg.vae_batch_size].to(engine.device)).cpu()
                                for s in range(0, count, self.cfg.vae_batch_size)])
            reward, _ = self.reward(pixels.to(engine.device), rows)
            metrics = {"val_reward": float(reward.mean())}
            metrics["val_diversity_pixel"] = diversity.group_diversity(pixels, rows, diversity.pixel_distance)["mean"]
            if self._toy():
                if self._shapeclip is None:
                    from fastpref.toy import shapeclip

                    self._shapeclip = shapeclip.load_shipped(world_name=engine.reward.toy_world)
                metrics["val_diversity_shapeclip"] = diversity.toy_diversity(pixels, rows, self._shapeclip)["shapeclip"]
        return metrics

    def _toy(self) -> bool:
        """A toy-world model: ShapeCLIP's features mean something for its images."""
        return str(self.engine.cfg.model.path).startswith("toy-")

    def sample_prefix(self, x: torch.Tensor, cond: dict[str, torch.Tensor], stop: int) -> torch.Tensor:
        """Steps [0, stop) of the sampler without gradient, online.sample_batch_size images per call (x2 with CFG)."""
        engine = self.engine
        out = torch.empty_like(x)
        size = self.online.sample_batch_size
        with self.no_grad():
            for begin in range(0, x.shape[0], size):
                rows = slice(begin, begin + size)
                chunk = x[rows].to(engine.device)
                n = chunk.shape[0]
                chunk_cond = index_rows(cond, rows)
                uncond = expand_rows(engine.uncond, n) if self.guided else None
                for i in range(stop):
                    chunk = self.sampler.step(i, self._predict(engine.sampling_policy, chunk, i, chunk_cond, uncond),
                                              chunk)
                out[rows] = chunk.cpu()
        return out.clone()  # out of inference mode: an ordinary tensor the differentiable steps can start from

    def _predict(self, policy, x: torch.Tensor, i: int, cond, uncond) -> torch.Tensor:
        engine = self.engine
        model_input = self.sampler.model_input(x, i).to(engine.bundle.dtype)
        with engine.autocast:
            return guided_prediction(policy, model_input, self.sampler.timestep(i, x.shape[0], x.device), cond,
                                     uncond, self.scale)

    # ------------------------------------------------------------------ the loss
    def preference_groups(self, batch: dict[str, Any]) -> int:
        return len(batch["texts"])

    def differentiable_steps(self, x: torch.Tensor, start: int, cond, uncond
                             ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Steps [start, N) with gradient through the policy: (the last step's predicted x0, the policy's guided
        predictions, the reference's at the same x_i (none without the KL)).

        The last step's predicted x0 is what gets decoded, as NeMo's generate() decodes pred_x0: with DDIM's last
        step from t = 1 to the final alpha (alphas_cumprod[0]) the sample x_0 itself barely depends on the
        prediction (sqrt(1 - a_0) - sqrt(1 - a_1) sqrt(a_0 / a_1) ~ 0), so its reward gradient would all but
        vanish; for Euler and flow steps to sigma 0 the two are the same."""
        engine = self.engine
        predictions, references = [], []
        for i in range(start, self.sampler.num_steps):
            if self.cfg.checkpointing:
                prediction = checkpoint(self._predict, engine.policy, x, i, cond, uncond, use_reentrant=False)
            else:
                prediction = self._predict(engine.policy, x, i, cond, uncond)
            predictions.append(prediction)
            if self.cfg.kl_coeff > 0:
                model_input = self.sampler.model_input(x.detach(), i).to(engine.bundle.dtype)
                references.append(engine.reference_prediction(
                    model_input, self.sampler.timestep(i, x.shape[0], x.device), cond, uncond, self.scale))
            x, x0 = self.sampler.step_with_x0(i, prediction, x)
        return x0, predictions, references

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] with gradient, vae_batch_size images per decode (each checkpointed)."""
        bundle = self.engine.bundle

        def decode(chunk):
            return ((bundle.decode_latents(chunk).float() + 1) / 2).clamp(0, 1)

        size = self.cfg.vae_batch_size
        chunks = [checkpoint(decode, latents[s:s + size], use_reentrant=False) if self.cfg.checkpointing
                  else decode(latents[s:s + size]) for s in range(0, latents.shape[0], size)]
        return torch.cat(chunks)

    def reward(self, pixels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(N,) weighted sum of the differentiable rewards, with gradient to the pixels, and each term."""
        weighted = self.engine.reward
        total, terms = 0.0, {}
        for name, reward in weighted.rewards.items():
            scores = reward(pixels, texts, batch_size=weighted.batch_size).to(pixels.device)
            terms[name] = scores.detach()
            total = total + weighted.weights[name] * scores
        return total, terms

    def kl(self, predictions: list[torch.Tensor], references: list[torch.Tensor]) -> torch.Tensor:
        """(N,) DRaFT+'s penalty: the mean over the steps of mean((pred - ref)^2) per sample (fused op)."""
        errors = [ops.sample_errors(p, r.to(p.dtype), backend=self.engine.loss_backend)[0]
                  for p, r in zip(predictions, references)]
        return torch.stack(errors).mean(dim=0)

    def forward(self, batch: dict[str, Any], epoch: int) -> StepOutput:
        engine = self.engine
        device = engine.device
        texts = batch["texts"]
        x = batch["x"].to(device)
        n = x.shape[0]
        cond = _conditioning_rows(batch["cond"], device)
        uncond = expand_rows(engine.uncond, n) if self.guided else None
        if "lv_noise" in batch:
            last = self.sampler.num_steps - 1
            rewards, kls, all_terms = [], [], []
            for j in range(batch["lv_noise"].shape[1]):
                x_last = self.sampler.renoise(x, last, batch["lv_noise"][:, j].to(device))
                final, predictions, references = self.differentiable_steps(x_last, last, cond, uncond)
                reward, terms = self.reward(self.decode(final), texts)
                rewards.append(reward)
                all_terms.append(terms)
                if references:
                    kls.append(self.kl(predictions, references))
            reward = torch.stack(rewards).mean(dim=0)
            kl = torch.stack(kls).mean(dim=0) if kls else None
            terms = {name: torch.stack([t[name] for t in all_terms]).mean(dim=0) for name in all_terms[0]}
        else:
            final, predictions, references = self.differentiable_steps(x, batch["start"], cond, uncond)
            reward, terms = self.reward(self.decode(final), texts)
            kl = self.kl(predictions, references) if references else None
        loss = -reward.mean()
        metrics = {"reward": reward.detach().mean(),
                   **{f"reward_{name}": value.mean() for name, value in terms.items()}}
        if kl is not None:
            loss = loss + self.cfg.kl_coeff * kl.mean().to(loss.device)
            metrics["kl"] = kl.detach().mean()
        return StepOutput(loss, metrics, n)
