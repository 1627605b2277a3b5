"""Online methods: the policy samples its own training data while it trains (GRPO, SPO, DRaFT).

An online method is a rollout (the current policy samples images for the next prompts under torch.no_grad, a
reward scores them, the method turns them into training examples) plus a loss on those examples, trained by the
same loop, checkpoints, parallel strategies, metrics and validation grids as the offline objectives:

    fastpref train --config recipe.yaml objective.name=grpo          # or spo / draft
    fastpref run configs/toy-grpo.yaml                                # an online recipe: prompts only, no cache

Pieces (this package):
- sampler.py: the steps with per-step Gaussian log-probabilities (`ddim_step` eta >= 0 for eps / v models,
  `flow_sde_step` / `flow_euler_step` for flow models), `guided_prediction` (CFG in one batched call),
  `sampling_timesteps`, `gaussian_log_prob`, `seeded_normal` (noise keyed by (seed, epoch, prompt id, what)).
- rollout.py: `PromptStream` (a seeded order per epoch, `per_rollout` prompts at a time, resumable),
  `RolloutPrompts.shard` (this process's contiguous share), `sample_trajectories` (G images per prompt, every x_t
  and log-prob kept), `decode_images`, `WeightedReward` (sum of weighted fastpref rewards), `unconditional_
  conditioning`, and `gather_permute_split` (all-gather per-sample rows, order them by a global key, one seeded
  permutation, split evenly over processes and optimizer steps: the same global batches for any world size).
- config.py: the train config's `online:` section (prompts, rollout size, sampler, reward) and one sub-section per
  method (`online.grpo`; a method adds its own field there), plus ONLINE_METHODS (objective name -> class).
- grpo.py: GRPO (Flow-GRPO / DanceGRPO); spo.py: SPO; draft.py: DRaFT.

The engine: fastpref.train.online.OnlineTrainer (a fastpref.train.loop.Trainer). It loads the model (keeping the
VAE and text encoders, frozen), adds LoRA or trains fully, wraps the denoiser with the parallel strategy, builds
the reward, the reference (LoRA: the same network with adapters off; full: a frozen copy, fastpref.train.step.
ReferenceModel) when the method asks for one, and then, for every `steps_per_rollout` optimizer steps, asks the
method for a rollout and feeds its micro-batches to the loop's unchanged `optimizer_step` (loss weighting by
`preference_groups`, non-finite skips, clipping, DDP / FSDP2 / ZeRO). Checkpoints hold the prompt position
(epoch, position), the method's `state_dict()` and the EMA; checkpoint_every and max_steps must be multiples of
steps_per_rollout, so no rollout is ever cut by a checkpoint and a SIGKILLed run resumes exactly.

The method contract (what OnlineTrainer calls; GRPOMethod is the worked example):

    class MyMethod:
        name = "mymethod"                       # objective.name, registered in config.ONLINE_METHODS
        @staticmethod
        def needs_reference(cfg) -> bool        # cfg: TrainConfig; decides whether a reference model is built
        @staticmethod
        def configured_steps_per_rollout(cfg) -> int
        def __init__(self, engine)               # engine: the OnlineTrainer (attributes below)
        steps_per_rollout: int                  # optimizer steps per rollout
        variable_steps: bool                    # optional: True lets rollout() return any number (>= 1) of steps;
                                                # checkpoints may then fall inside a rollout (its rest is saved)
        micro_batches_per_step: int             # the same on every process and every step
        rollout_metrics: dict[str, float]       # statistics of the last rollout, logged with each of its steps
        ema_settings: (decay, every) | None     # optional: the engine keeps an EMA of the trainable weights
        def rollout(self, prompts: RolloutPrompts) -> list[list[dict]]   # per optimizer step, its micro-batches
        def preference_groups(self, batch) -> int    # what the batch's loss is a mean over; 0: weighed 0
        def forward(self, batch, epoch) -> fastpref.train.step.StepOutput   # the loss (never None: a micro-batch
                                                # without examples still runs a forward, weighed 0, so every
                                                # process joins the same collectives)
        def state_dict(self) -> dict / load_state_dict(self, state)      # plain data / tensors only

    rollout() gets the prompts of all processes: `prompts.shard(engine.rank, engine.world_size)` is this process's
    share; it samples under torch.no_grad with engine.sampling_policy (the unwrapped denoiser: no DDP hooks, FSDP2
    still gathers its shards), the denoiser in eval mode and the attention backend set by the engine. Examples that
    vary in number per process (SPO's kept pairs, GRPO's nonzero advantages) go through gather_permute_split with
    a generator seeded from (seed, epoch, prompts.start), so every process gets an equal share of the same global
    set. forward() runs the policy through engine.policy (the strategy's wrapper) under engine.autocast; a loss
    that backpropagates through sampling (DRaFT) simply does its sampling inside forward.

    engine attributes: cfg (TrainConfig), bundle, policy, sampling_policy, reference (ReferenceModel; mode
    "none" when not needed), reference_prediction(latents, t, cond, uncond, guidance_scale) (guided, no grad),
    encode(texts) -> cond, uncond (one row of the pipeline's negative conditioning), reward (WeightedReward),
    gather(tensor) (all processes' rows, rank order, CPU), autocast, attention, device, rank, world_size, seed,
    loss_backend.
"""
