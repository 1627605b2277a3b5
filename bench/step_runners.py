"""bench/step.py's runners: the workloads (batches as the cache stream yields them, or the baseline's pixels
and token ids), fastpref's step and the faithful Diffusion-DPO step behind one call, and the measurement of a
row (timed steps, phase split, peak memory, FLOPs)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import baseline_dpo
import flops as flop_count
from common import PhaseTimer, summarize, synchronize
from step_archs import Arch

from fastpref.train.speed import SpeedConfig, UnsupportedSpeedOption

PHASES = ("data", "encode", "reference", "policy", "optimizer", "communication")
RANK_GROUP_SIZE = 4  # RankDPO's K


@dataclass
class Workload:
    objective: str  # dpo | rankdpo
    mode: str  # full | lora
    pairs: int  # DPO pairs per step; RankDPO runs the same number of images (pairs * 2 / K groups of K)

    @property
    def group_size(self) -> int:
        return 2 if self.objective == "dpo" else RANK_GROUP_SIZE

    @property
    def groups(self) -> int:
        return max(1, self.pairs * 2 // self.group_size)

    @property
    def images(self) -> int:
        return self.groups * self.group_size

    @property
    def preference_pairs(self) -> int:
        """Ordered pairs the loss learns from per step: P for DPO, G * K(K-1)/2 for RankDPO."""
        return self.groups * self.group_size * (self.group_size - 1) // 2


def cached_batch(arch: Arch, bundle_dtype: torch.dtype, work: Workload, seed: int) -> dict:
    """A batch as fastpref's cache stream yields it (CPU tensors): latents, conditioning, psi, e_ref."""
    gen = torch.Generator().manual_seed(seed)
    g, k = work.groups, work.group_size
    h, w = arch.latent_hw
    cond_dtype = bundle_dtype
    length = arch.text_length
    if arch.family == "sd":
        cond = {"encoder_hidden_states": torch.randn(g, length, arch.spec["denoiser"]["config"]["cross_attention_dim"],
                                                     generator=gen).to(cond_dtype)}
    elif arch.family == "sdxl":
        den = arch.spec["denoiser"]["config"]
        pooled = den["projection_class_embeddings_input_dim"] - 6 * den["addition_time_embed_dim"]
        side = float(arch.resolution)
        cond = {"encoder_hidden_states": torch.randn(g, length, den["cross_attention_dim"], generator=gen).to(cond_dtype),
                "text_embeds": torch.randn(g, pooled, generator=gen).to(cond_dtype),
                "time_ids": torch.tensor([side, side, 0.0, 0.0, side, side]).repeat(g, 1).to(cond_dtype)}
    else:
        den = arch.spec["denoiser"]["config"]
        cond = {"encoder_hidden_states": torch.randn(g, length, den["joint_attention_dim"], generator=gen).to(cond_dtype),
                "pooled_projections": torch.randn(g, den["pooled_projection_dim"], generator=gen).to(cond_dtype)}
    psi = torch.rand(g, k, generator=gen)
    batch = {
        "latents": torch.randn(g, k, arch.latent_channels, h, w, generator=gen),
        "cond": cond,
        "psi": psi,
        "group_ids": torch.arange(g) + seed * g,
        "e_ref": 1.0 + 0.01 * torch.rand(g, k, generator=gen),
    }
    if torch.cuda.is_available():
        batch = {key: ({k2: v.pin_memory() for k2, v in value.items()} if isinstance(value, dict) else value.pin_memory())
                 for key, value in batch.items()}
    return batch


def raw_inputs(arch: Arch, bundle, groups: int, per_group: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(pixels (groups * per_group, 3, H, W), token ids per text encoder (groups, L)): what the baseline reads."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(groups * per_group, 3, arch.resolution, arch.resolution, generator=gen) * 2 - 1
    ids = []
    for encoder, entry in zip(bundle.text_modules(), arch.spec["text_encoders"]):
        ids.append(torch.randint(0, encoder.config.vocab_size, (groups, entry["sequence_length"]), generator=gen))
    return pixels, ids


@dataclass
class Variant:
    name: str
    section: str  # headline | ablation
    system: str  # fastpref | baseline
    work: Workload
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    cached_latents: bool = True
    cached_reference: bool = True
    skip_reason: str = ""


class FastprefRunner:
    """fastpref's step as the Trainer runs it (TrainStep + Parallel + speed switches) on cached batches."""

    def __init__(self, arch: Arch, variant: Variant, device: torch.device):
        from fastpref.config import from_dict, to_dict
        from fastpref.train.config import TrainConfig
        from fastpref.train.loop import LoraConfig, add_lora
        from fastpref.train.parallel import build_parallel
        from fastpref.train.reference import frozen_copy_dtype
        from fastpref.train.speed import apply_model_speedups, build_optimizer, set_attention_backend
        from fastpref.train.step import ReferenceModel, build_step

        self.arch, self.variant, self.device = arch, variant, device
        speed, work = variant.speed, variant.work
        # the TrainConfig a recipe with these settings would give: the step, its reference dtype and loss backend
        # are then built by the trainer's own functions
        cfg = from_dict(TrainConfig, {"model": {"path": arch.name}, "data": {"root": "-"}, "output_dir": "-",
                                      "mode": work.mode, "objective": {"name": work.objective},
                                      "speed": to_dict(speed),
                                      "loss_backend": "auto" if speed.fused_loss else "reference"})
        bundle = arch.build(device)
        self.bundle = bundle
        if variant.cached_latents:
            # the cache supplies latents and text states: the step needs neither the VAE nor the text encoders
            bundle.vae, bundle.text_encoders = None, []
        else:
            weight_dtype = torch.bfloat16 if speed.mixed_precision == "bf16" else torch.float32
            for module in [bundle.vae, *bundle.text_modules()]:
                module.requires_grad_(False).to(dtype=weight_dtype).eval()
        denoiser = bundle.denoiser
        reference_mode = "cached" if variant.cached_reference else ("adapters_off" if work.mode == "lora" else "frozen_copy")
        ref_dtype = frozen_copy_dtype(cfg, device) if reference_mode == "frozen_copy" else None
        self.reference = ReferenceModel(reference_mode, denoiser, dtype=ref_dtype)
        if work.mode == "lora":
            add_lora(denoiser, LoraConfig())
        denoiser.train()
        self.speedups = apply_model_speedups(denoiser, speed, device)
        self.attention = set_attention_backend(denoiser, speed.attention, device)
        self.parallel = build_parallel("none", device, 1.0, speed.mixed_precision)
        module, _, _ = self.parallel.wrap(
            denoiser, lambda params: build_optimizer(params, speed.optimizer, 1e-6, 0.0),
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))
        self.step_fn = build_step(cfg, bundle, module, self.reference, noise_seed=0, device=device)
        self.batches = [cached_batch(arch, bundle.dtype, work, seed) for seed in range(2)]
        if not variant.cached_latents:
            self.raw = [raw_inputs(arch, bundle, work.groups, work.group_size, seed)
                        for seed in range(2)]
        self.calls = 0

    def encode(self, batch: dict, index: int) -> dict:
        """Without the latent cache: the VAE and text encoders run on pixels and token ids, as in the baseline."""
        bundle, work = self.bundle, self.variant.work
        pixels, ids = self.raw[index]
        with torch.no_grad():
            latents = baseline_dpo.encode_pixels(bundle, pixels.to(self.device)).float()
            cond = baseline_dpo.encode_text(bundle, [i.to(self.device) for i in ids])
            if bundle.family == "sdxl":
                cond["time_ids"] = batch["cond"]["time_ids"].to(self.device)
        latents = latents.view(work.groups, work.group_size, *latents.shape[1:])
        return {**batch, "latents": latents, "cond": cond}

    def __call__(self, timer=baseline_dpo.no_timer, epoch: int = 0) -> None:
        index = self.calls % len(self.batches)
        self.calls += 1
        batch = self.batches[index]
        if not self.variant.cached_latents:
            with timer("encode"):
                batch = self.encode(batch, index)
        parallel = self.parallel
        with timer("policy"):
            parallel.zero_grad()
            with self.attention:
                out = self.step_fn.forward(batch, epoch)
                parallel.backward(out.loss)
        with timer("optimizer"):
            parallel.step()  # clips to max_grad_norm (1.0, as the baseline) itself

    @contextlib.contextmanager
    def instrumented(self, timer: PhaseTimer):
        """The noise draw timed as 'data' and the live reference forward as 'reference', through the step's own
        phase hook (TrainStep.phase)."""
        untimed = self.step_fn.phase
        self.step_fn.phase = timer
        try:
            yield
        finally:
            self.step_fn.phase = untimed


class BaselineRunner:
    def __init__(self, arch: Arch, variant: Variant, device: torch.device):
        from fastpref.train.loop import LoraConfig, add_lora

        self.arch, self.variant, self.device = arch, variant, device
        bundle = arch.build(device)
        if variant.work.mode == "lora":
            add_lora(bundle.denoiser, LoraConfig())
        self.step_fn = baseline_dpo.BaselineDPOStep(bundle, mode=variant.work.mode,
                                                    mixed_precision=variant.speed.mixed_precision)
        work = variant.work
        self.batches = []
        for seed in range(2):
            pixels, ids = raw_inputs(arch, bundle, work.pairs, 2, seed)
            # the script's layout: all winners, then all losers
            pixels = pixels.view(work.pairs, 2, *pixels.shape[1:]).transpose(0, 1).reshape(pixels.shape)
            if device.type == "cuda":
                pixels, ids = pixels.pin_memory(), [i.pin_memory() for i in ids]
            self.batches.append(baseline_dpo.BaselineBatch(pixels, ids))
        self.calls = 0

    def __call__(self, timer=baseline_dpo.no_timer, epoch: int = 0) -> None:
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        self.step_fn(batch, timer)

    @contextlib.contextmanager
    def instrumented(self, timer):
        yield


@dataclass
class Settings:
    device: torch.device
    steps: int
    warmup: int
    phase_steps: int
    time_budget_s: float
    started: float
    peak_tflops: float
    peak_source: str
    profile: bool
    out_dir: Path
    tag: str
    warmed: bool = False


def measure(arch: Arch, variant: Variant, settings: Settings) -> dict:
    device = settings.device
    row = base_row(arch, variant)
    if variant.skip_reason:
        row["status"] = variant.skip_reason
        return row
    if time.perf_counter() - settings.started > settings.time_budget_s:
        row["status"] = f"skipped: time budget ({settings.time_budget_s:.0f} s) spent on the rows above"
        return row
    runner = None
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        runner = (FastprefRunner if variant.system == "fastpref" else BaselineRunner)(arch, variant, device)
        # the first row of a process also pays one-time costs (allocator growth, lazy kernels and imports)
        extra = 0 if settings.warmed else 2
        settings.warmed = True
        for _ in range(settings.warmup + extra):
            runner()
        synchronize(device)
        times = []
        for _ in range(settings.steps):
            start = time.perf_counter()
            runner()
            synchronize(device)
            times.append(time.perf_counter() - start)
        timer = PhaseTimer(device)
        with runner.instrumented(timer):
            for _ in range(settings.phase_steps):
                runner(timer)
        if settings.profile and variant.name == "fastpref" and variant.section == "headline":
            write_profile(runner, arch, variant, settings)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    except UnsupportedSpeedOption as err:
        row["status"] = f"cannot run here: {err}"
        return row
    except torch.OutOfMemoryError as err:
        row["status"] = f"out of memory: {str(err).splitlines()[0][:160]}"
        return row
    finally:
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fill_row(row, arch, variant, times, timer, peak, settings)
    return row


def base_row(arch: Arch, variant: Variant) -> dict:
    work = variant.work
    return {"arch": arch.name, "shape": arch.describe(), "section": variant.section, "variant": variant.name,
            "system": variant.system, "objective": work.objective, "mode": work.mode, "groups": work.groups,
            "group_size": work.group_size, "images_per_step": work.images, "pairs_per_step": work.preference_pairs,
            "status": "ok"}


def step_flops(arch: Arch, variant: Variant) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one step; conventions in bench/flops.py and bench/README.md.

    Model FLOPs are what this step executes of the models: the policy forward + backward, the reference forward
    only when it runs live, the VAE / text encoders only when they run. Work done once by the cache stage (latents,
    text states, cached reference errors) is charged to that stage (bench/gpu_days.py), not to the step, so the
    MFU of a cached step is not inflated by work it skipped. Hardware FLOPs add checkpointing's recomputation.
    """
    work = variant.work
    forward = arch.denoiser_forward_flops(work.images)
    backward = flop_count.backward_flops(forward, work.mode)
    model = forward.total + backward.total
    if variant.system == "baseline" or not variant.cached_reference:
        model += forward.total
    if variant.system == "baseline" or not variant.cached_latents:
        model += arch.encode_flops(work.images, work.groups).total
    checkpointing = (baseline_dpo.uses_checkpointing(arch.family) if variant.system == "baseline"
                     else variant.speed.gradient_checkpointing)
    hardware = model + (forward.recomputed if checkpointing else 0.0)
    return model, hardware


def cache_stage_flops(arch: Arch, images: int) -> dict[str, float]:
    """FLOPs the cache stage spends on `images`: VAE + text encoders once per image (text once per image is an
    upper bound: the K images of a prompt share a caption), and one reference forward per image and epoch."""
    return {"encode": arch.encode_flops(images, images).total, "reference": arch.denoiser_forward_flops(images).total}


def fill_row(row, arch, variant, times, timer, peak, settings):
    work = variant.work
    stats = summarize(times)
    median, quartiles = stats["median"], [stats["p25"], stats["median"], stats["p75"]]
    phase_total = sum(timer.totals.values()) / max(settings.phase_steps, 1)
    row.update(step_ms=round(median * 1e3, 3), min_ms=round(min(times) * 1e3, 3), p25_ms=round(quartiles[0] * 1e3, 3), p75_ms=round(quartiles[2] * 1e3, 3),
               pairs_per_s=round(work.preference_pairs / median, 4), images_per_s=round(work.images / median, 4))
    for phase in PHASES:
        row[f"{phase}_ms"] = round(timer.totals.get(phase, 0.0) / max(settings.phase_steps, 1) * 1e3, 3)
    row["phase_sum_ms"] = round(phase_total * 1e3, 3)
    row["peak_mem_GiB"] = round(peak, 3) if peak is not None else ""
    model, hardware = step_flops(arch, variant)
    row["model_TFLOP_per_step"] = float(f"{model / 1e12:.5g}")
    row["hardware_TFLOP_per_step"] = float(f"{hardware / 1e12:.5g}")
    cache = cache_stage_flops(arch, 1)
    row["cache_encode_TFLOP_per_image"] = float(f"{cache['encode'] / 1e12:.5g}")
    row["cache_reference_TFLOP_per_image_epoch"] = float(f"{cache['reference'] / 1e12:.5g}")
    row["MFU"] = round(model / median / (settings.peak_tflops * 1e12), 5)
    row["HFU"] = round(hardware / median / (settings.peak_tflops * 1e12), 5)


def write_profile(runner, arch: Arch, variant: Variant, settings: Settings) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if settings.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            runner()
        synchronize(settings.device)
    sort = "self_cuda_time_total" if settings.device.type == "cuda" else "self_cpu_time_total"
    path = settings.out_dir / f"step-{settings.tag}-profile.txt"
    path.write_text(f"torch.profiler, 2 steps of {variant.name} {variant.work.objective}/{variant.work.mode} on "
                    f"{arch.describe()}, sorted by {sort}\n\n"
                    + prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70) + "\n")
