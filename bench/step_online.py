"""bench/step.py --method spo|grpo|draft: one online step timed by phase, on the trainer's own code path.

One row = one rollout and the optimizer step(s) it feeds, exactly as `fastpref train` runs them: a
fastpref.train.online.OnlineTrainer built from the method's recipe (configs/toy-spo.yaml, sd15-spo.yaml, ...,
shrunk by the bench's overrides), whose `batches()` asks SPOMethod / GRPOMethod for a rollout and whose
`optimizer_step` (the loop's) runs the method's forward, backward and the optimizer. Only the model load differs:
the bundle is the bench's architecture (bench/step_archs.py: the toy models, or SD1.5 / SDXL / SD3 with random
weights, narrowed by --width-scale), and for the random-weight architectures (no tokenizer) the text conditioning
is random tensors of the denoiser's shapes.

Phases (exclusive wall time, a device sync at each edge; bench/common.PhaseTimer):
  encode     the prompts' text encoding (toy models only; random tensors for the real architectures)
  sampling   the rollout's denoiser calls (CFG: 2 rows per latent) and sampler math, the pair / advantage
             bookkeeping (gather, permute, split)
  decode     VAE decodes (SPO: every candidate's predicted x0 at each decision; GRPO: the final images)
  reward     the reward model (SPO: the step-aware preference model; GRPO: online.reward)
  reference  the reference forward of the loss (adapters off / frozen copy), no gradient
  policy     the policy forward + backward and the loss
  optimizer  clipping + the optimizer step
  other      the rest of the step (zero_grad, micro-batch weighing)
DRaFT (--method draft; fastpref.online.draft.DRaFTMethod, one micro-batch of every image of the step) has its own:
  encode, sample_prefix  the first N - K sampling steps, batched, under inference_mode (DRaFTMethod.sample_prefix)
  differentiable         the last K steps with gradient (checkpointed or not), reference  DRaFT+'s KL reference
  decode, reward         the differentiable VAE decode and reward, loss  the KL and the loss
  backward               the backward (with checkpointing: the recomputed denoiser / decoder forwards)
  optimizer, other
and a peak memory per row: torch.cuda.max_memory_allocated on a GPU; on a CPU the growth of the process's RSS
high-water mark (reset once the trainer is built; PeakMemory) over its RSS then; bench/step.py still runs each DRaFT
row in a fresh process, for kernels that refuse the reset.
The instrumentation wraps the engine's functions and objects; it computes nothing of its own (tested: an
instrumented step leaves the same weights as a plain one).

FLOPs (bench/flops.py conventions, only what runs): every denoiser call is counted from its actual rows, latent
size and text length (a forward pre-hook), so CFG's doubled rows, SPO's k candidates and the micro-batches'
placeholder rows are counted as executed; a call with gradient adds the backward (bench/flops.backward_flops, full
or LoRA); VAE decodes from the rows decoded (flops.vae_decoder_forward_flops); the reward model and the text
encoders, whose architectures vary, by torch's FlopCounterMode (math attention) on the first warm-up step, per
image / prompt, times the images / prompts of each step. MFU = FLOPs of the timed steps / their time / peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

import flops as flop_count
from common import PhaseTimer, summarize, synchronize, write_csv
from step_archs import Arch

ROOT = Path(__file__).resolve().parents[1]
ONLINE_PHASES = ("encode", "sampling", "decode", "reward", "reference", "policy", "optimizer", "other")
DRAFT_PHASES = ("encode", "sample_prefix", "differentiable", "reference", "decode", "reward", "loss", "backward",
                "optimizer", "other")


def phases_of(method: str) -> tuple[str, ...]:
    return DRAFT_PHASES if method == "draft" else ONLINE_PHASES

# the recipe each (method, architecture) row starts from; its sizes are then shrunk by the bench's settings
RECIPES = {
    ("spo", "toy-sd"): "configs/toy-spo.yaml", ("spo", "toy-sdxl"): "configs/toy-spo.yaml",
    ("spo", "sd15"): "configs/sd15-spo.yaml", ("spo", "sdxl"): "configs/sdxl-spo.yaml",
    ("grpo", "toy-sd3"): "configs/toy-grpo.yaml", ("grpo", "toy-sd"): "configs/toy-grpo-sd.yaml",
    ("grpo", "toy-sdxl"): "configs/toy-grpo-sd.yaml", ("grpo", "sd3"): "configs/sd3-grpo-geneval.yaml",
    # no SDXL GRPO recipe exists (Flow-GRPO's are SD3): the DanceGRPO-style DDIM settings of toy-grpo-sd
    ("grpo", "sdxl"): "configs/toy-grpo-sd.yaml",
    # DRaFT: the toy recipe's sampler and LoRA on every toy model; NeMo-Aligner's SD1.5 / SDXL DRaFT+ recipes
    ("draft", "toy-sd"): "configs/toy-draft.yaml", ("draft", "toy-sdxl"): "configs/toy-draft.yaml",
    ("draft", "toy-sd3"): "configs/toy-draft.yaml",
    ("draft", "sd15"): "configs/sd15-draftp.yaml", ("draft", "sdxl"): "configs/sdxl-draftp.yaml",
}


@dataclasses.dataclass
class OnlineSettings:
    method: str  # spo | grpo | draft
    prompts: int = 1  # prompts per rollout
    group_size: int = 2  # SPO: k candidates per step; GRPO: G images per prompt
    num_steps: int = 6  # sampling steps
    divert_start_step: int = 2  # SPO: steps before the chain branches
    train_batch_size: int = 4  # pairs (SPO) / samples (GRPO) per micro-batch
    timestep_fraction: float | None = None  # GRPO: None keeps the recipe's
    # SPO: 0 keeps a pair at every decision and GRPO trains every sample (drop_zero_advantage off): with random
    # weights few pairs pass SPO's threshold and all GRPO rewards may tie, which would skip the update; the row
    # then times the update at its largest (every decision / sample trained), the recipe's cost at most
    keep_all: bool = True
    # DRaFT: K differentiable steps, activation checkpointing of each denoiser call / decode, DRaFT+'s KL coefficient
    # (None keeps the recipe's); every image of the step (prompts x group_size) is one micro-batch
    k: int = 1
    checkpointing: bool = True
    kl_coeff: float | None = None


def online_config(arch: Arch, settings: OnlineSettings, device: torch.device, out: str):
    """The TrainConfig of the row: the method's recipe for this architecture with the bench's sizes."""
    from fastpref.pipeline import train_config_of_recipe

    key = (settings.method, arch.name)
    if key not in RECIPES:
        raise ValueError(f"--method {settings.method} --arch {arch.name}: no recipe to bench "
                         f"({sorted(a for m, a in RECIPES if m == settings.method)})")
    toy_path = {"sd": "toy-sd", "sdxl": "toy-sdxl", "sd3": "toy-sd3"}[arch.family]
    overrides = [f"model.path={toy_path}", f"model.family={arch.family}", f"output_dir={out}", "parallel=none",
                 "max_steps=1", "checkpoint_every=1", "validation.every=0", "online.prompts=toy:train",
                 f"online.prompts_per_rollout={settings.prompts}", f"online.num_steps={settings.num_steps}",
                 f"online.resolution={arch.resolution}", f"online.sample_batch_size={settings.prompts * settings.group_size}"]
    m = settings.method
    if m == "draft":
        if not 1 <= settings.k <= settings.num_steps:
            raise ValueError(f"--k {settings.k}: DRaFT's K must be in [1, --num-steps {settings.num_steps}]")
        images = settings.prompts * settings.group_size
        overrides += [f"online.group_size={settings.group_size}", "online.draft.variant=k",
                      f"online.draft.k={settings.k}", f"online.draft.batch_size={images}",
                      f"online.draft.vae_batch_size={images}",
                      f"online.draft.checkpointing={str(settings.checkpointing).lower()}"]
        if settings.kl_coeff is not None:
            overrides.append(f"online.draft.kl_coeff={settings.kl_coeff}")
    elif m == "spo":
        if settings.keep_all:
            overrides.append("online.spo.threshold=0.0")
        # one optimizer step over the whole rollout, whatever rule the recipe uses (pairs_per_step: one step per N
        # kept pairs), so that the row is one SPO step over every kept pair
        overrides += [f"online.spo.num_candidates={settings.group_size}", "online.spo.steps_per_rollout=1",
                      "online.spo.pairs_per_step=null",
                      f"online.spo.divert_start_step={settings.divert_start_step}",
                      f"online.spo.train_batch_size={settings.train_batch_size}"]
    else:
        if settings.keep_all:
            overrides.append("online.grpo.drop_zero_advantage=false")
        overrides += [f"online.group_size={settings.group_size}", "online.grpo.steps_per_rollout=1",
                      "online.grpo.inner_epochs=1",
                      f"online.grpo.train_batch_size={settings.train_batch_size}"]
        if settings.timestep_fraction is not None:
            overrides.append(f"online.grpo.timestep_fraction={settings.timestep_fraction}")
    if device.type != "cuda":
        # CPU: fp32 and no checkpointing (bench/step.py's fastpref_speed says why)
        overrides += ["speed.mixed_precision='no'", "speed.gradient_checkpointing=false"]
    cfg = train_config_of_recipe(str(ROOT / RECIPES[key]), overrides)
    cfg.device = str(device)
    if not arch.toy:
        # the real runs' rewards need downloaded weights: the shipped toy SPM for SPO, the prompt-blind toy quality
        # reward for GRPO (any resolution); their FLOPs are counted as executed
        cfg.online.reward = {"spm": 1.0} if m == "spo" else {"quality": 1.0}  # DRaFT: differentiable
        cfg.online.reward_paths = {}
    return cfg


def random_conditioning(bundle, n: int, device: torch.device, text_length: int) -> dict[str, torch.Tensor]:
    """Random text states of the denoiser's shapes (the random-weight architectures have no tokenizer)."""
    config = bundle.denoiser.config
    gen = torch.Generator().manual_seed(n)
    if bundle.family == "sd3":
        cond = {"encoder_hidden_states": torch.randn(n, text_length, config.joint_attention_dim, generator=gen),
                "pooled_projections": torch.randn(n, config.pooled_projection_dim, generator=gen)}
    else:
        cond = {"encoder_hidden_states": torch.randn(n, text_length, config.cross_attention_dim, generator=gen)}
        if bundle.family == "sdxl":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            cond["text_embeds"] = torch.randn(n, pooled, generator=gen)
            cond["time_ids"] = bundle.time_ids(n).cpu()
    return {key: value.to(device=device, dtype=bundle.dtype) for key, value in cond.items()}


def build_trainer(arch: Arch, cfg, device: torch.device):
    """fastpref's OnlineTrainer for `cfg`, on the bench's bundle of `arch` (everything else the trainer's own)."""
    from fastpref.train.online import OnlineTrainer

    bundle = arch.build(device)
    patches = [mock.patch("fastpref.models.load", lambda *args, **kwargs: bundle)]
    if not arch.toy:
        uncond = lambda b: {k: v[:1] for k, v in random_conditioning(b, 1, device, arch.text_length).items()}  # noqa: E731
        patches.append(mock.patch("fastpref.train.online.unconditional_conditioning", uncond))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        trainer = OnlineTrainer(cfg)
    if not arch.toy:
        trainer.encode = lambda texts: random_conditioning(bundle, len(texts), device, arch.text_length)
    return trainer


class OnlineStep:
    """One online step (rollout + its optimizer step) of a trainer, optionally timed by phase and FLOP-counted."""

    def __init__(self, trainer, arch: Arch):
        self.trainer, self.arch = trainer, arch
        self.batches = trainer.batches()
        self.mode = trainer.cfg.mode
        self.timer: PhaseTimer | None = None
        self.context = "sampling"
        self.flops = {}  # phase -> model FLOPs of the current step
        self.rows = {}  # what was executed: denoiser rows per context, decoded images, scored images, prompts
        self.per_item: dict[str, float] | None = None  # reward / encode FLOPs per image / prompt (FlopCounterMode)
        self._counting = False
        self._install()

    # ------------------------------------------------------------------ instrumentation
    def _phase(self, name: str):
        return self.timer(name) if self.timer is not None else contextlib.nullcontext()

    def _add(self, phase: str, value: float, rows_key: str | None = None, rows: int = 0) -> None:
        self.flops[phase] = self.flops.get(phase, 0.0) + value
        if rows_key:
            self.rows[rows_key] = self.rows.get(rows_key, 0) + rows

    def _install(self) -> None:
        import fastpref.online.grpo as grpo_module
        import fastpref.online.spo as spo_module

        trainer, arch = self.trainer, self.arch
        bundle = trainer.bundle
        family, den_config = arch.family, arch.spec["denoiser"]["config"]

        def denoiser_hook(module, args, kwargs):
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            text = kwargs.get("encoder_hidden_states")
            forward = flop_count.denoiser_forward_flops(family, den_config, sample.shape[0], tuple(sample.shape[-2:]),
                                                        text.shape[1])
            phase = self.context
            if phase == "backward":  # a checkpointed call recomputed by the backward
                self._add("recomputed", forward.total)
                return
            self._add(phase, forward.total, f"{phase}_denoiser_rows", sample.shape[0])
            if torch.is_grad_enabled():
                self._add(phase, flop_count.backward_flops(forward, self.mode).total)
                if trainer.cfg.speed.gradient_checkpointing:
                    self._add("recomputed", forward.recomputed)

        def decoder_hook(module, args, kwargs):
            z = args[0] if args else kwargs["z"]
            value = flop_count.vae_decoder_forward_flops(arch.spec["vae"]["config"], z.shape[0], tuple(z.shape[-2:]))
            if self.context == "backward":  # DRaFT's checkpointed decode, recomputed
                self._add("recomputed", value.total)
                return
            self._add("decode", value.total, "decoded_images", z.shape[0])
            if torch.is_grad_enabled():  # DRaFT: the gradient to the latents through the frozen decoder
                self._add("decode", flop_count.backward_flops(value, "lora").total)

        denoisers = [bundle.denoiser] + ([trainer.reference.frozen] if trainer.reference.frozen is not None else [])
        self._handles = [module.register_forward_pre_hook(denoiser_hook, with_kwargs=True) for module in denoisers]
        self._handles.append(bundle.vae.decoder.register_forward_pre_hook(decoder_hook, with_kwargs=True))

        def timed(phase: str, fn, context: str | None = None, per_item: str | None = None, count=None):
            def wrapper(*args, **kwargs):
                previous = self.context
                self.context = context or previous
                try:
                    with self._phase(phase):
                        if per_item is None:
                            return fn(*args, **kwargs)
                        items = count(*args, **kwargs)
                        self.rows[per_item] = self.rows.get(per_item, 0) + items
                        result = fn(*args, **kwargs)
                        if self._counting:
                            self.per_item[per_item] = self._count_flops(fn, args, kwargs) / max(items, 1)
                        return result
                finally:
                    self.context = previous
            return wrapper

        method = trainer.method
        parallel = trainer.parallel
        trainer.encode = timed("encode", trainer.encode, per_item="encoded_prompts",
                               count=lambda texts: len(texts))
        trainer.reference_prediction = timed("reference", trainer.reference_prediction, context="reference")
        parallel.step = timed("optimizer", parallel.step)
        self._patches = []
        if method.name == "draft":
            # DRaFTMethod calls these through self, so the instance attributes are what its step runs
            method.rollout = timed("sample_prefix", method.rollout, context="sample_prefix")
            method.sample_prefix = timed("sample_prefix", method.sample_prefix, context="sample_prefix")
            method.forward = timed("loss", method.forward, context="differentiable")
            method.differentiable_steps = timed("differentiable", method.differentiable_steps)
            method.decode = timed("decode", method.decode)
            method.reward = timed("reward", method.reward, per_item="scored_images",
                                  count=lambda pixels, *a, **k: pixels.shape[0])
            parallel.backward = timed("backward", parallel.backward, context="backward")
            return
        method.rollout = timed("sampling", method.rollout, context="sampling")
        method.forward = timed("policy", method.forward, context="policy")
        parallel.backward = timed("policy", parallel.backward)
        if method.name == "spo":
            method.preference = timed("reward", method.preference, per_item="scored_images",
                                      count=lambda pixels, *a, **k: pixels.shape[0])
            self._patches = [mock.patch.object(spo_module, "_decode", timed("decode", spo_module._decode))]
        else:
            trainer.reward = _TimedReward(trainer.reward, timed("reward", trainer.reward.__call__,
                                                                per_item="scored_images",
                                                                count=lambda pixels, *a, **k: pixels.shape[0]))
            self._patches = [mock.patch.object(grpo_module, "decode_images",
                                               timed("decode", grpo_module.decode_images))]

    @staticmethod
    def _count_flops(fn, args, kwargs) -> float:
        """FlopCounterMode of a second, discarded call (the math attention path, whose FLOPs torch counts; its
        numerics differ from the fused kernel's, so the step itself never runs under it)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as mode:
            fn(*args, **kwargs)
        return mode.get_total_flops()

    # ------------------------------------------------------------------ one step
    def __call__(self, timer: PhaseTimer | None = None, count: bool = False) -> dict:
        """Run one rollout + optimizer step; returns its FLOPs by phase, executed rows and the loop's metrics."""
        self.timer, self._counting = timer, count
        if count:
            self.per_item = {}
        self.flops, self.rows = {}, {}
        with contextlib.ExitStack() as stack:
            for patch in self._patches:
                stack.enter_context(patch)
            with self._phase("other"):
                metrics, _ = self.trainer.optimizer_step(self.batches)
        self.timer = None
        self.trainer.step += 1
        per_item = self.per_item or {}
        for key, phase in (("scored_images", "reward"), ("encoded_prompts", "encode")):
            self._add(phase, per_item.get(key, 0.0) * self.rows.get(key, 0))
        return {"flops": dict(self.flops), "rows": dict(self.rows), "metrics": metrics}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class _TimedReward:
    """The engine's WeightedReward with its call timed (attributes such as last_terms read through)."""

    def __init__(self, reward, call):
        self._reward, self._call = reward, call

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._reward, name)


# ====================================================================================== a row


def measure_online(arch: Arch, settings: OnlineSettings, device: torch.device, steps: int, warmup: int,
                   phase_steps: int, peak_tflops: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = online_config(arch, settings, device, out)
        trainer = build_trainer(arch, cfg, device)
        runner = OnlineStep(trainer, arch)
        memory = PeakMemory(device)
        runner(count=True)  # warm-up; measures the reward's / text encoders' FLOPs per item
        for _ in range(max(warmup - 1, 0)):
            runner()
        synchronize(device)
        times, step_flops, results = [], [], []
        for _ in range(steps):
            start = time.perf_counter()
            result = runner()
            synchronize(device)
            times.append(time.perf_counter() - start)
            step_flops.append(sum(v for k, v in result["flops"].items() if k != "recomputed"))
            results.append(result)
        timer = PhaseTimer(device)
        phased_wall = 0.0
        for _ in range(phase_steps):
            start = time.perf_counter()
            results.append(runner(timer))
            phased_wall += time.perf_counter() - start
        runner.close()
        peak = memory.peak()
    row = online_row(arch, settings, cfg, times, step_flops, results, timer, phase_steps, phased_wall, peak_tflops)
    row["peak_gib"], row["peak_kind"] = round(peak / 2**30, 3), memory.kind
    return row


class PeakMemory:
    """Peak memory of what runs after it is made: CUDA's max_memory_allocated, or on a CPU the growth of the
    process's resident-set high-water mark over its RSS now. Linux lets a process reset that mark to its current RSS
    (/proc/self/clear_refs "5"), so the build's own transient peak cannot hide the step's; where the reset is refused
    it falls back to ru_maxrss, which never goes down (exact only in a fresh process whose build peaked lower)."""

    def __init__(self, device: torch.device):
        self.device = device
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.kind = "cuda max_memory_allocated"
            return
        self._reset = _reset_rss_high_water_mark()
        self._base = _status_kib("VmRSS") * 1024 if self._reset else _ru_maxrss_bytes()
        self.kind = "RSS growth over the built trainer"

    def peak(self) -> int:
        synchronize(self.device)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        high = _status_kib("VmHWM") * 1024 if self._reset else _ru_maxrss_bytes()
        return max(high - self._base, 0)


def _reset_rss_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_kib("VmHWM") > 0
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _ru_maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def online_row(arch, settings, cfg, times, step_flops, results, timer, phase_steps, phased_wall, peak_tflops) -> dict:
    stats = summarize(times)
    last = results[-1]
    method = settings.method
    n = max(phase_steps, 1)
    row = {"arch": arch.name, "shape": arch.describe(), "section": "online", "variant": f"fastpref {method}",
           "system": "fastpref", "objective": method, "mode": cfg.mode, "prompts": settings.prompts,
           "group_size": settings.group_size, "num_steps": settings.num_steps,
           "guidance_scale": cfg.online.guidance_scale, "keep_all": settings.keep_all, "status": "ok",
           "step_ms": round(stats["median"] * 1e3, 3), "min_ms": round(stats["min"] * 1e3, 3),
           "p25_ms": round(stats["p25"] * 1e3, 3), "p75_ms": round(stats["p75"] * 1e3, 3)}
    if method == "draft":
        draft = cfg.online.draft
        row.update(k=draft.k, checkpointing=draft.checkpointing, kl_coeff=draft.kl_coeff)
    for phase in phases_of(method):
        row[f"{phase}_ms"] = round(timer.totals.get(phase, 0.0) / n * 1e3, 3)
    row["phase_sum_ms"] = round(sum(timer.totals.values()) / n * 1e3, 3)
    row["phased_step_ms"] = round(phased_wall / n * 1e3, 3)
    for key, value in last["rows"].items():
        row[key] = value
    metrics = last["metrics"]
    if method == "spo":
        row["pairs_trained"] = int(metrics.get("spo_pairs", 0))
    for phase in [p for p in phases_of(method) if p not in ("loss", "backward", "optimizer", "other")]:
        row[f"{phase}_GFLOP"] = float(f"{last['flops'].get(phase, 0.0) / 1e9:.6g}")
    model = sum(step_flops)
    recomputed = sum(r["flops"].get("recomputed", 0.0) for r in results[:len(times)])
    row["model_TFLOP_per_step"] = float(f"{model / len(times) / 1e12:.5g}")
    row["MFU"] = float(f"{model / sum(times) / (peak_tflops * 1e12):.4g}")
    row["HFU"] = float(f"{(model + recomputed) / sum(times) / (peak_tflops * 1e12):.4g}")
    row["images_per_s"] = round(settings.prompts * settings.group_size / stats["median"], 4)
    return row


# ====================================================================================== report


def write_online(rows: list[dict], env: dict, tag: str, out_dir: Path, peak_source: str, notes: list[str],
                 timing: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"step-online-{tag}.csv", "md": out_dir / f"step-online-{tag}.md"}
    write_csv(paths["csv"], [{**row, "peak_source": peak_source} for row in rows], env)
    if rows and rows[0]["objective"] == "draft":
        return write_draft(rows, env, paths, peak_source, notes, timing)
    lines = [f"# fastpref online step benchmark: SPO step / GRPO iteration ({tag})", ""]
    lines += _header_notes(env, peak_source, notes, timing)
    lines.append("- one step = one rollout (sampling, decode, reward) + the optimizer step it feeds, through "
                 "fastpref's OnlineTrainer.batches / optimizer_step; FLOPs only of what ran (bench/step_online.py)")
    lines.append("")
    columns = [("arch", lambda r: r["shape"]), ("method", lambda r: r["objective"]), ("mode", lambda r: r["mode"]),
               ("prompts x k/G", lambda r: f"{r['prompts']} x {r['group_size']}"),
               ("steps", lambda r: str(r["num_steps"])), *_timing_columns(ONLINE_PHASES),
               ("phase sum", lambda r: _fmt(r.get("phase_sum_ms"))),
               ("denoiser rows (sampling / reference / policy)",
                lambda r: " / ".join(str(r.get(f"{c}_denoiser_rows", 0)) for c in ("sampling", "reference", "policy"))),
               ("decoded", lambda r: str(r.get("decoded_images", 0))), *_closing_columns()]
    lines += _markdown_table(rows, columns)
    lines += ["", "Phases: milliseconds per step (exclusive). Denoiser rows are executed rows: CFG doubles them; "
              "SPO's policy / reference rows are 2 x pairs (winner, loser) x 2 (CFG), including a placeholder pair "
              "for an empty micro-batch; GRPO's are samples x trained steps x 2 (CFG)."]
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths


def _timing_columns(phases) -> list[tuple[str, Callable[[dict], str]]]:
    return [("step ms", lambda r: _fmt(r.get("step_ms"))),
            *[(phase, lambda r, phase=phase: _fmt(r.get(f"{phase}_ms"))) for phase in phases]]


def _closing_columns() -> list[tuple[str, Callable[[dict], str]]]:
    return [("TFLOP/step", lambda r: _fmt(r.get("model_TFLOP_per_step"))), ("MFU", lambda r: _fmt(r.get("MFU"))),
            ("status", lambda r: r["status"])]


def _markdown_table(rows: list[dict], columns: list[tuple[str, Callable[[dict], str]]]) -> list[str]:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]


def _header_notes(env: dict, peak_source: str, notes: list[str], timing: str) -> list[str]:
    lines = [f"- device: {env['device']}; torch {env['torch']}, diffusers {env.get('diffusers', '?')}",
             f"- peak used for MFU/HFU: {peak_source}"]
    if hasattr(os, "getloadavg"):
        lines.append("- machine load when written (1 / 5 / 15-min averages): "
                     + " / ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores "
                     "(other jobs share this machine: absolute times are indicative, compare rows side by side)")
    lines.append(f"- timing: {timing}")
    return lines + [f"- {note}" for note in notes]


def write_draft(rows: list[dict], env: dict, paths: dict[str, Path], peak_source: str, notes: list[str],
                timing: str) -> dict[str, Path]:
    """The DRaFT table: one row per (architecture, K, checkpointing), phases and peak memory."""
    lines = ["# fastpref DRaFT step: time by phase and peak memory vs K", ""]
    lines += _header_notes(env, peak_source, notes, timing)
    lines.append("- one step = the first N - K sampling steps batched under inference_mode, the last K with gradient, "
                 "the differentiable decode and reward, DRaFT+'s KL when kl_coeff > 0, backward, optimizer, through "
                 "fastpref's OnlineTrainer and DRaFTMethod (bench/step_online.py); each row in a fresh process")
    lines.append("")
    columns = [("arch", lambda r: r["shape"]), ("images", lambda r: str(r["prompts"])),
               ("steps", lambda r: str(r["num_steps"])), ("K", lambda r: str(r["k"])),
               ("checkpointing", lambda r: str(r["checkpointing"])), ("kl_coeff", lambda r: str(r["kl_coeff"])),
               *_timing_columns(DRAFT_PHASES), ("peak GiB", lambda r: _fmt(r.get("peak_gib"))),
               ("peak", lambda r: r.get("peak_kind", "")), *_closing_columns()]
    lines += _markdown_table(rows, columns)
    lines += ["", "Phases: milliseconds per step (exclusive). Peak memory: CUDA max_memory_allocated, or on a CPU the "
              "growth of the row process's RSS high-water mark, reset once the trainer is built, over its RSS then."]
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths


def _fmt(value) -> str:
    if value in ("", None):
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
