"""SPO's step-wise resampler: the rollout of Step-aware Preference Optimization (RockeyCoss/SPO,
spo_training_and_inference/spo/custom_diffusers/multi_sample_pipeline{,_sdxl}.py), on fastpref's sampler.

For each prompt, DDIM with eta (1) and CFG (5) over `num_steps` (20) steps:

- steps before `divert_start_step` (4) run one trajectory;
- at `divert_start_step` the chain branches: k candidates x_{t-1} are drawn from the same x_t;
- each candidate then runs `num_inner_step` further single steps (SDXL: 3; SD1.5: 0), and at the next step the
  step-aware preference model scores every candidate's predicted x0 (decoded) at that step's t -- the denoiser call
  that predicts this x0 is the one the next step needs anyway, so scoring costs the VAE decode and the SPM only;
- best and worst by score, softmax over the two; the pair is kept if p_best - p_worst > threshold, as one training
  pair per transition of the chunk: (x_t^w, x_t^l, t, x_{t-1}^w, x_{t-1}^l, prompt) (at the branching step
  x_t^w = x_t^l, the same x_t);
- the chain continues from one candidate chosen uniformly at random (not the best: SPO's choice, so the
  trajectory distribution stays the policy's), which branches into k new candidates;
- after the last step the k clean images are scored at t = 0 and compared the same way.

As in SPO's SDXL pipeline, with num_inner_step > 0 the last step never branches (its candidates are the chains);
with num_inner_step = 0 (SPO's SD1.5 pipeline) every step from divert_start_step on branches, the last one too.

Randomness: every draw comes from a generator seeded by (seed, epoch, prompt id, what) -- the initial latents
("spo/init"), each step's variance noise ("spo/step{i}", k per prompt once branched) and the uniform choice
("spo/choice{i}") -- so a prompt's rollout does not depend on the batch it is in, the rank count or the device,
and a resumed run redraws exactly the rollout of the uninterrupted one (for the same policy weights).

Flow-matching models are refused: DDIM's eta posterior, the Gaussian SPO's ratio is taken of, exists only for
the DDPM forward process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from fastpref.config import ConfigError
from fastpref.online.spo_config import check_candidates

# (pixels in [0, 1] (N, 3, H, W), prompts (N,), timesteps (N,)) -> (N,) preference scores
PreferenceFn = Callable[[torch.Tensor, list, torch.Tensor], torch.Tensor]


@dataclass
class SPOSamplingConfig:
    """The `online.spo` section: how SPO samples and selects its step-wise pairs (defaults: SPO's SD1.5 config,
    spo_training_and_inference/configs/basic_config.py + spo_sd-v1-5_4k-prompts_num-sam-4_10ep_bs10.py)."""

    num_steps: int = 20  # sample.num_steps
    guidance_scale: float = 5.0  # sample.guidance_scale
    eta: float = 1.0  # sample.eta
    divert_start_step: int = 4  # train.divert_start_step
    num_candidates: int = 4  # sample.num_sample_each_step (k)
    num_inner_step: int = 0  # sample.num_inner_step (SDXL: 3)
    threshold: float = 0.3  # compare_func_cfg.threshold (SDXL: 0.4)
    negative_prompt: str = ""

    def validate(self) -> None:
        check_candidates(self.threshold, self.num_candidates)
        if self.num_steps < 2:
            raise ConfigError(f"num_steps: must be >= 2, got {self.num_steps}")
        if not 0 <= self.divert_start_step < self.num_steps:
            raise ConfigError(f"divert_start_step: must be in [0, num_steps - 1] = [0, {self.num_steps - 1}], got "
                              f"{self.divert_start_step}")
        if self.num_inner_step < 0:
            raise ConfigError(f"num_inner_step: must be >= 0, got {self.num_inner_step}")
        if not self.eta > 0:
            raise ConfigError(f"eta: must be > 0 (SPO's ratio is of the step's Gaussian; eta 0 is deterministic), "
                              f"got {self.eta}")
        if self.guidance_scale < 1.0:
            raise ConfigError(f"guidance_scale: must be >= 1, got {self.guidance_scale}")


def check_model_family(model: str, family: str | None, key: str = "model",
                       why: str = "SPO needs DDIM's eta posterior, which exists for eps- / v-prediction (DDPM) models "
                                  "only (sd, sdxl)", hint: str = "") -> str:
    """The family of a model path / toy name / hub id (family given), refusing flow matching before any load."""
    from fastpref.models import detect_family, resolve_path
    from fastpref.models.bundle import FLOW_FAMILIES

    if family is None:
        try:
            family = detect_family(resolve_path(model))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{key}: {err}{hint}") from None
    if family in FLOW_FAMILIES:
        raise ConfigError(f"{key}: {model!r} is a flow-matching model (family {family!r}); {why}")
    return family


@dataclass
class StepPairs:
    """The kept step-wise pairs of one rollout. P pairs; rows of the (P, 2, ...) tensors are (winner, loser).

    latents: x_t (P, 2, C, H, W) float32 -- equal rows at a branching step;
    next_latents: x_{t-1} (P, 2, C, H, W) float32; timesteps: (P,) int64 t of the transition;
    step_index: (P,) int64 the transition's index in the schedule; prompt_index: (P,) int64 index into `prompts`;
    prompts: the rollout's prompts; prompt_ids: their global ids (what seeded them).
    stats: candidates scored, decisions, pairs kept, per-step decisions / kept counts, mean SPM score of the
    final images.
    """

    latents: torch.Tensor
    next_latents: torch.Tensor
    timesteps: torch.Tensor
    step_index: torch.Tensor
    prompt_index: torch.Tensor
    prompts: list[str]
    prompt_ids: list  # str (prompt-file ids) or int
    stats: dict[str, float] = field(default_factory=dict)
    decisions_per_step: torch.Tensor | None = None  # (num_steps,) comparisons of the candidates branched at step i
    kept_per_step: torch.Tensor | None = None  # (num_steps,) of them kept

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])


def spm_preference_fn(reward) -> PreferenceFn:
    """A StepAwarePreferenceReward as the resampler's scorer (no gradient)."""

    @torch.no_grad()
    def score(pixels: torch.Tensor, prompts: list, timesteps: torch.Tensor) -> torch.Tensor:
        return reward(pixels, prompts, timesteps=timesteps.cpu())

    return score


def _step_noise(seed: int, epoch: int, prompt_ids, per_prompt: int, shape, what: str, device) -> torch.Tensor:
    from fastpref.online.sampler import seeded_normal

    return seeded_normal(seed, epoch, prompt_ids, per_prompt, tuple(shape), f"spo/{what}").to(device)


def _choices(seed: int, epoch: int, prompt_ids, k: int, step: int) -> torch.Tensor:
    from fastpref.data.noise import group_generator

    return torch.tensor([int(torch.randint(k, (1,), generator=group_generator(seed, epoch, p,
                                                                                 f"online/spo/choice{step}")))
                         for p in prompt_ids], dtype=torch.long)


def _decode(bundle, latents: torch.Tensor) -> torch.Tensor:
    return (bundle.decode_latents(latents).float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def resample(bundle, prompts: Sequence[str], prompt_ids: Sequence, preference: PreferenceFn,
             config: SPOSamplingConfig, *, seed: int, epoch: int, cond: dict | None = None,
             uncond: dict | None = None, latent_shape: tuple[int, ...] | None = None, autocast=None) -> StepPairs:
    """SPO's step-wise rollout of `prompts` with the bundle's current denoiser (see the module docstring).

    cond / uncond: the prompts' Conditioning (one row per prompt) and the negative prompt's (one row); encoded
    here when None. latent_shape: (C, h, w) of the latents (default: the denoiser's sample_size and channels).
    autocast: a context for the denoiser calls (the trainer's mixed precision).
    """
    import contextlib

    from fastpref.online.sampler import ddim_step, guided_prediction, sampling_timesteps

    if bundle.prediction_type == "flow":
        raise ValueError(f"SPO: the {bundle.family or 'given'} model is flow matching; SPO needs DDIM's eta "
                         "posterior (eps / v-prediction models only)")
    config.validate()
    prompts, prompt_ids = list(prompts), list(prompt_ids)
    b, k = len(prompts), config.num_candidates
    if len(prompt_ids) != b:
        raise ValueError(f"SPO: {b} prompts but {len(prompt_ids)} prompt ids")
    device = bundle.device
    schedule = sampling_timesteps(bundle, config.num_steps)
    timesteps = schedule.timesteps
    if cond is None:
        cond = bundle.encode_prompt(prompts)
    if uncond is None:
        if config.negative_prompt:
            uncond = bundle.encode_prompt([config.negative_prompt])
        else:  # the pipeline's own negative conditioning (SDXL: zeros, force_zeros_for_empty_prompt)
            from fastpref.online.rollout import unconditional_conditioning

            uncond = unconditional_conditioning(bundle)
    if latent_shape is None:
        unet_config = bundle.denoiser.config
        size = unet_config.sample_size
        latent_shape = (unet_config.in_channels, size, size) if isinstance(size, int) else (unet_config.in_channels, *size)

    def conditioning(rows_per_prompt: int):
        c = {key: value.repeat_interleave(rows_per_prompt, dim=0) for key, value in cond.items()}
        u = {key: value.expand(b * rows_per_prompt, *value.shape[1:]) for key, value in uncond.items()}
        return c, u

    def predict(x: torch.Tensor, t, rows_per_prompt: int) -> torch.Tensor:
        c, u = conditioning(rows_per_prompt)
        with autocast or contextlib.nullcontext():
                return guided_prediction(bundle, x.to(bundle.dtype), torch.full((x.shape[0],), int(t), device=device),
                                     c, u, config.guidance_scale).float()

    def step(pred, t, x, rows_per_prompt: int, i: int):
        noise = _step_noise(seed, epoch, prompt_ids, rows_per_prompt, x.shape[1:], f"step{i}", device)
        return ddim_step(schedule.scheduler, pred, int(t), x, eta=config.eta, noise=noise)

    expanded = [p for p in prompts for _ in range(k)]
    kept_latents, kept_next, kept_t, kept_step, kept_prompt = [], [], [], [], []
    # indexed by the step whose candidates were compared (the chunk's branching step)
    decisions_per_step = torch.zeros(config.num_steps, dtype=torch.long)
    kept_per_step = torch.zeros(config.num_steps, dtype=torch.long)
    scored = 0
    # the transitions of the current chunk: (x_t (B, k, ...), t, x_{t-1} (B, k, ...), step index, std > 0)
    chunk: list[tuple[torch.Tensor, int, torch.Tensor, int, bool]] = []

    def decide(candidates: torch.Tensor, score_t: int, step_i: int) -> torch.Tensor:
        """Score the k chains (B*k rows of decoded predicted x0 / clean images) and keep the chunk's pairs;
        returns the (B, k) scores."""
        nonlocal scored
        scores = preference(candidates, expanded, torch.full((b * k,), score_t, dtype=torch.long)).float()
        scores = scores.reshape(b, k).cpu()
        scored += b * k
        best, worst = scores.argmax(dim=1), scores.argmin(dim=1)
        pair = torch.stack([scores.gather(1, best[:, None])[:, 0], scores.gather(1, worst[:, None])[:, 0]], dim=1)
        p = pair.softmax(dim=1)
        keep = (p[:, 0] - p[:, 1]) > config.threshold
        decisions_per_step[step_i] += b
        kept_per_step[step_i] += int(keep.sum())
        rows = torch.nonzero(keep)[:, 0]
        if len(rows) == 0:
            return scores
        pick = torch.stack([best[rows], worst[rows]], dim=1).to(device)  # (R, 2)
        rows_d = rows.to(device)
        for x_t, t, x_prev, index, trainable in chunk:
            if not trainable:  # a deterministic step (std 0, e.g. set_alpha_to_one's last step): no ratio to train
                continue
            gather = pick[:, :, None, None, None].expand(-1, -1, *x_t.shape[2:])
            kept_latents.append(x_t[rows_d].gather(1, gather).cpu())
            kept_next.append(x_prev[rows_d].gather(1, gather).cpu())
            kept_t.append(torch.full((len(rows),), t, dtype=torch.long))
            kept_step.append(torch.full((len(rows),), index, dtype=torch.long))
            kept_prompt.append(rows.clone())
        return scores

    x = _step_noise(seed, epoch, prompt_ids, 1, latent_shape, "init", device) * float(schedule.scheduler.init_noise_sigma)
    branched = False
    last = config.num_steps - 1
    final_scores = torch.zeros(0)
    for i, t in enumerate(timesteps.tolist()):
        if i < config.divert_start_step:
            x = step(predict(x, t, 1), t, x, 1, i).prev_sample
            continue
        if not branched:  # branch: k candidates from the one x_t
            pred = predict(x, t, 1)
            taken = step(pred.repeat_interleave(k, 0), t, x.repeat_interleave(k, 0), k, i)
            new = taken.prev_sample
            chunk = [(x.repeat_interleave(k, 0).reshape(b, k, *x.shape[1:]), t, new.reshape(b, k, *x.shape[1:]), i,
                      bool((taken.std > 0).all()))]
            x, branched = new, True
        else:
            # x: B*k chains at t. A decision step scores their predicted x0 at t, then branches the chosen chain.
            pred = predict(x, t, k)
            since = i - config.divert_start_step
            is_decision = since % (config.num_inner_step + 1) == 0 and not (i == last and config.num_inner_step > 0)
            if is_decision:
                x0 = ddim_step(schedule.scheduler, pred, t, x, eta=config.eta, prev_sample=x).pred_original_sample
                decide(_decode(bundle, x0), t, chunk[0][3])
                choice = _choices(seed, epoch, prompt_ids, k, i).to(device)
                rows = torch.arange(b, device=device) * k + choice
                x_one, pred_one = x[rows], pred[rows]
                taken = step(pred_one.repeat_interleave(k, 0), t, x_one.repeat_interleave(k, 0), k, i)
                new = taken.prev_sample
                chunk = [(x_one.repeat_interleave(k, 0).reshape(b, k, *x.shape[1:]), t,
                          new.reshape(b, k, *x.shape[1:]), i, bool((taken.std > 0).all()))]
            else:  # an inner step: every chain one step further
                taken = step(pred, t, x, k, i)
                new = taken.prev_sample
                chunk.append((x.reshape(b, k, *x.shape[1:]), t, new.reshape(b, k, *x.shape[1:]), i,
                              bool((taken.std > 0).all())))
            x = new
        if i == last:
            final_scores = decide(_decode(bundle, x), 0, chunk[0][3])
    shape = (0, 2, *latent_shape)
    pairs = StepPairs(
        latents=torch.cat(kept_latents) if kept_latents else torch.zeros(shape),
        next_latents=torch.cat(kept_next) if kept_next else torch.zeros(shape),
        timesteps=torch.cat(kept_t) if kept_t else torch.zeros(0, dtype=torch.long),
        step_index=torch.cat(kept_step) if kept_step else torch.zeros(0, dtype=torch.long),
        prompt_index=torch.cat(kept_prompt) if kept_prompt else torch.zeros(0, dtype=torch.long),
        prompts=prompts,
        prompt_ids=prompt_ids,
        decisions_per_step=decisions_per_step,
        kept_per_step=kept_per_step,
    )
    decisions = int(decisions_per_step.sum())
    pairs.stats = {
        "candidates_scored": float(scored),
        "decisions": float(decisions),
        "decisions_kept": float(kept_per_step.sum()),
        "pairs": float(len(pairs)),
        "kept_rate": float(kept_per_step.sum()) / max(decisions, 1),
        "spm_score_final": float(final_scores.mean()) if final_scores.numel() else float("nan"),
    }
    return pairs



# ---------------------------------------------------------------------------------------------- the method


class SPOMethod:
    """SPO on the online engine (fastpref/train/online.py; the contract in fastpref/online/__init__.py).

    One rollout: online.prompts_per_rollout prompts resampled step-wise by the current policy (`resample`; SPM =
    the `spm` reward of online.reward); the kept pairs of all processes are gathered, permuted with a seeded
    permutation and split evenly over processes x spo.steps_per_rollout optimizer steps
    (rollout.gather_permute_split), so 1 and N processes train on the same pairs; with spo.pairs_per_step, over
    ceil(kept pairs / pairs_per_step) steps instead (SPO's rule: the steps per rollout vary; the engine then
    checkpoints between the steps of a rollout, its remaining micro-batches included). Each optimizer step runs its
    pairs in micro-batches of spo.train_batch_size: the policy's and the reference's (adapters off / frozen copy)
    guided DDIM(eta) means of x_{t-1} given x_t at the stored x_{t-1}^w, x_{t-1}^l, and fastpref.ops.spo_loss
    (beta, clip_eps). The micro-batch count is fixed (the most pairs a step can get); empty ones are placeholders
    weighed 0, as the engine requires.
    """

    name = "spo"

    def __init__(self, engine):
        import math

        from fastpref.online.rollout import latent_shape
        from fastpref.online.sampler import sampling_timesteps

        self.engine = engine
        self.online = engine.cfg.online
        self.cfg = self.online.spo
        bundle = engine.bundle
        if bundle.prediction_type == "flow":
            raise ConfigError(f"model.path: {engine.cfg.model.path!r} is flow matching; SPO needs DDIM's eta posterior")
        self.sampling = SPOSamplingConfig(
            num_steps=self.online.num_steps, guidance_scale=max(self.online.guidance_scale, 1.0), eta=self.online.eta,
            divert_start_step=self.cfg.divert_start_step, num_candidates=self.cfg.num_candidates,
            num_inner_step=self.cfg.num_inner_step, threshold=self.cfg.threshold)
        self.sampling.validate()
        self.schedule = sampling_timesteps(bundle, self.online.num_steps)
        self.shape = latent_shape(bundle, self.online.resolution)
        self.preference = spm_preference_fn(engine.reward.rewards["spm"])
        transitions = self.online.num_steps - self.cfg.divert_start_step  # one pair per transition at most
        # the engine lets the steps of a rollout vary (and checkpoints inside a rollout) when this is true
        self.variable_steps = self.cfg.pairs_per_step is not None
        if self.variable_steps:
            self.max_pairs_per_part = self.cfg.pairs_per_step // engine.world_size
        else:
            split = engine.world_size * self.cfg.steps_per_rollout
            self.max_pairs_per_part = (self.online.prompts_per_rollout * transitions) // split
        if self.max_pairs_per_part < 1:
            raise ConfigError(f"online.spo.steps_per_rollout: {self.cfg.steps_per_rollout} steps x {engine.world_size} "
                              f"processes exceed the {self.online.prompts_per_rollout * transitions} pairs a rollout "
                              "can keep")
        self.chunks = max(1, math.ceil(self.max_pairs_per_part / self.cfg.train_batch_size))
        self.rollout_metrics: dict[str, float] = {}
        self.last_steps = self.cfg.steps_per_rollout  # optimizer steps of the last rollout

    # ------------------------------------------------------------------ what the engine asks
    @staticmethod
    def needs_reference(cfg) -> bool:
        return True  # the ratio is policy / reference

    @staticmethod
    def configured_steps_per_rollout(cfg) -> int:
        """Also the engine's hook before the model loads: a flow model is refused here, naming the key. With
        pairs_per_step a rollout's steps vary, checkpoints may fall inside it: any checkpoint_every (1)."""
        check_model_family(cfg.model.path, cfg.model.family, key="model.path")
        return 1 if cfg.online.spo.pairs_per_step is not None else cfg.online.spo.steps_per_rollout

    @property
    def steps_per_rollout(self) -> int:
        return self.last_steps if self.variable_steps else self.cfg.steps_per_rollout

    @property
    def micro_batches_per_step(self) -> int:
        return self.chunks

    def state_dict(self) -> dict:
        return {}  # a rollout is a pure function of (policy, seed, epoch, prompt ids): nothing to carry over

    def load_state_dict(self, state: dict) -> None:
        pass

    def rollout(self, prompts) -> list[list[dict]]:
        import math

        from fastpref.data.noise import group_generator
        from fastpref.online.rollout import gather_permute_split

        engine = self.engine
        mine = prompts.shard(engine.rank, engine.world_size)
        cond = engine.encode(mine.texts)
        pairs = resample(engine.bundle, mine.texts, mine.ids, self.preference, self.sampling, seed=engine.seed,
                         epoch=prompts.epoch, cond=cond, uncond=engine.uncond, latent_shape=self.shape,
                         autocast=engine.autocast)
        steps = self.online.num_steps
        keys = (mine.start + pairs.prompt_index) * steps + pairs.step_index  # unique over the rollout
        index = pairs.prompt_index
        rows = {"latents": pairs.latents, "next_latents": pairs.next_latents, "timesteps": pairs.timesteps,
                "step_index": pairs.step_index,
                **{f"cond.{key}": value.detach().cpu()[index] for key, value in cond.items()}}
        decisions = engine.gather(pairs.decisions_per_step[None].double()).sum(0)
        kept = engine.gather(pairs.kept_per_step[None].double()).sum(0)
        stats = {name: engine.gather(torch.tensor([value], dtype=torch.float64))
                 for name, value in pairs.stats.items()}
        steps_this_rollout = self.cfg.steps_per_rollout
        if self.variable_steps:  # the same count on every process: from the gathered pair counts
            steps_this_rollout = max(1, math.ceil(int(stats["pairs"].sum()) / self.cfg.pairs_per_step))
        self.last_steps = steps_this_rollout
        permutation = group_generator(engine.seed, prompts.epoch, prompts.start, "online/spo-permute")
        parts = gather_permute_split(rows, keys, permutation, parts=steps_this_rollout)
        placeholder = {"latents": torch.zeros(1, 2, *self.shape), "next_latents": torch.zeros(1, 2, *self.shape),
                       "timesteps": self.schedule.timesteps[:1].clone(), "step_index": torch.zeros(1, dtype=torch.long),
                       **{f"cond.{key}": value.detach().cpu()[:1] for key, value in cond.items()}}
        metrics = {
            "spo_steps": float(steps_this_rollout),
            "spo_pairs_trained": float(sum(int(part["timesteps"].shape[0]) for part in parts) * engine.world_size),
            "spo_pairs": float(stats["pairs"].sum()),
            "spo_candidates": float(stats["candidates_scored"].sum()),
            "spo_pairs_per_candidate": float(stats["pairs"].sum() / stats["candidates_scored"].sum().clamp(min=1)),
            "spo_kept_rate": float(kept.sum() / decisions.sum().clamp(min=1)),
            "spm_score_final": float(stats["spm_score_final"].mean()),
        }
        for i in range(steps):
            if decisions[i] > 0:
                metrics[f"spo_kept_rate_step{i:02d}"] = float(kept[i] / decisions[i])
        self.rollout_metrics = metrics
        return [self._micro_batches(part, placeholder) for part in parts]

    def _micro_batches(self, part: dict, placeholder: dict) -> list[dict]:
        size = self.cfg.train_batch_size
        batches = []
        for c in range(self.chunks):
            rows = {name: value[c * size:(c + 1) * size] for name, value in part.items()}
            count = int(rows["timesteps"].shape[0])
            batches.append({"rows": rows if count else placeholder, "count": count})
        return batches

    # ------------------------------------------------------------------ the loss
    def preference_groups(self, batch: dict) -> int:
        """The pairs the micro-batch's loss is a mean over (0: a placeholder forward, weighed 0)."""
        return int(batch["count"])

    def forward(self, batch: dict, epoch: int):
        from fastpref import ops
        from fastpref.online.rollout import expand_rows
        from fastpref.online.sampler import ddim_step, guided_prediction
        from fastpref.train.step import StepOutput

        engine, online = self.engine, self.online
        rows = batch["rows"]
        device, dtype = engine.device, engine.bundle.dtype
        x = rows["latents"].flatten(0, 1).to(device)  # (2n, ...) rows w0, l0, w1, l1, ...: the ops' pair layout
        taken = rows["next_latents"].flatten(0, 1).to(device)
        n = x.shape[0]
        t = rows["timesteps"].repeat_interleave(2)
        cond = {key[5:]: value.repeat_interleave(2, dim=0).to(device) for key, value in rows.items()
                if key.startswith("cond.")}
        guided = self.cfg.cfg and online.guidance_scale > 1
        uncond = expand_rows(engine.uncond, n) if guided else None
        scale = online.guidance_scale if guided else 1.0
        with engine.autocast:
            prediction = guided_prediction(engine.policy, x.to(dtype), t.to(device), cond, uncond, scale)
        step = ddim_step(self.schedule.scheduler, prediction, t, x, eta=online.eta, prev_sample=taken)
        with torch.no_grad():
            reference = engine.reference_prediction(x.to(dtype), t.to(device), cond, uncond, scale)
            reference_mean = ddim_step(self.schedule.scheduler, reference, t, x, eta=online.eta,
                                       prev_sample=taken).mean
        out = ops.spo_loss(step.mean, reference_mean, taken, step.std.detach(), beta=self.cfg.beta,
                           clip_eps=self.cfg.clip_eps, backend=engine.loss_backend)
        return StepOutput(out.loss, out.metrics, n)


__all__ = ["SPOMethod", "SPOSamplingConfig", "StepPairs", "check_model_family", "resample", "spm_preference_fn"]
