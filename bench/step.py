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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baseline_dpo  # noqa: E402
import flops as flop_count  # noqa: E402
import gpu_days  # noqa: E402

from fastpref.env_report import environment  # noqa: E402
from fastpref.train.objectives import ObjectiveConfig  # noqa: E402
from fastpref.train.speed import SpeedConfig, UnsupportedSpeedOption  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONFIG_DIR = ROOT / "configs" / "models"
REAL_ARCHS = {"sd15": "sd15.json", "sdxl": "sdxl.json", "sd3": "sd3-medium.json"}
TOY_ARCHS = {"toy-sd": "sd", "toy-sdxl": "sdxl", "toy-sd3": "sd3"}
PHASES = ("data", "encode", "reference", "policy", "optimizer", "communication")
RANK_GROUP_SIZE = 4  # RankDPO's K
# dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name()
GPU_PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                        ("A10G", 70.0), ("L4", 121.0), ("RTX 4090", 165.0))


# ====================================================================================== architectures


def _round_width(value: float, multiple: int = 8) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _groups_for(channels: list[int], limit: int = 32) -> int:
    divisor = math.gcd(*channels)
    return max(g for g in range(1, min(limit, divisor) + 1) if divisor % g == 0)


def _heads_for(width: int, heads: int) -> int:
    return heads if width % heads == 0 else math.gcd(width, heads)


def scale_spec(spec: dict, width: float) -> dict:
    """The same architecture (depths, block types, head counts) with every width multiplied by `width`."""
    if width == 1.0:
        return spec
    if not 0 < width <= 1:
        raise ValueError(f"--width-scale must be in (0, 1], got {width}")
    spec = copy.deepcopy(spec)
    s = lambda value: _round_width(value * width)  # noqa: E731
    texts = []
    for entry in spec["text_encoders"]:
        cfg = entry["config"]
        if entry["class"] == "T5EncoderModel":
            cfg.update(d_model=s(cfg["d_model"]), d_ff=s(cfg["d_ff"]), d_kv=max(8, s(cfg["d_kv"])))
        else:
            cfg.update(hidden_size=s(cfg["hidden_size"]), intermediate_size=s(cfg["intermediate_size"]),
                       projection_dim=s(cfg["projection_dim"]))
            cfg["num_attention_heads"] = _heads_for(cfg["hidden_size"], cfg["num_attention_heads"])
        texts.append(cfg)
    vae = spec["vae"]["config"]
    vae["block_out_channels"] = [s(c) for c in vae["block_out_channels"]]
    vae["norm_num_groups"] = _groups_for(vae["block_out_channels"])
    den = spec["denoiser"]["config"]
    if spec["family"] in ("sd", "sdxl"):
        den["block_out_channels"] = [s(c) for c in den["block_out_channels"]]
        den["norm_num_groups"] = _groups_for(den["block_out_channels"])
        heads = den["attention_head_dim"]
        den["attention_head_dim"] = ([_heads_for(c, h) for c, h in zip(den["block_out_channels"], heads)]
                                     if isinstance(heads, list) else math.gcd(heads, *den["block_out_channels"]))
        if spec["family"] == "sd":
            den["cross_attention_dim"] = texts[0]["hidden_size"]
        else:
            den["cross_attention_dim"] = texts[0]["hidden_size"] + texts[1]["hidden_size"]
            den["addition_time_embed_dim"] = s(den["addition_time_embed_dim"])
            den["projection_class_embeddings_input_dim"] = 6 * den["addition_time_embed_dim"] + texts[1]["projection_dim"]
    else:
        den["attention_head_dim"] = max(8, s(den["attention_head_dim"]))
        den["caption_projection_dim"] = den["attention_head_dim"] * den["num_attention_heads"]
        den["joint_attention_dim"] = texts[2]["d_model"]
        den["pooled_projection_dim"] = texts[0]["projection_dim"] + texts[1]["projection_dim"]
    spec["width_scale"] = width
    return spec


@dataclass
class Arch:
    name: str
    family: str
    spec: dict  # denoiser / text_encoders / vae / scheduler configs (configs/models/*.json layout)
    resolution: int
    toy: bool = False

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.spec["vae"]["config"]["block_out_channels"]) - 1)

    @property
    def latent_hw(self) -> tuple[int, int]:
        side = self.resolution // self.vae_factor
        return side, side

    @property
    def latent_channels(self) -> int:
        return self.spec["vae"]["config"].get("latent_channels", 4)

    @property
    def text_length(self) -> int:
        return self.spec["denoiser_text_length"]

    def denoiser_forward_flops(self, images: int) -> flop_count.Flops:
        return flop_count.denoiser_forward_flops(self.family, self.spec["denoiser"]["config"], images, self.latent_hw,
                                                 self.text_length)

    def encode_flops(self, images: int, captions: int) -> flop_count.Flops:
        """What the baseline's per-step encoding executes: the VAE encoder on the images, the text encoders."""
        total = flop_count.vae_encoder_forward_flops(self.spec["vae"]["config"], images, (self.resolution,) * 2)
        for entry in self.spec["text_encoders"]:
            if entry["class"] == "T5EncoderModel":
                total += flop_count.t5_encoder_forward_flops(entry["config"], captions, entry["sequence_length"])
            else:
                total += flop_count.clip_text_forward_flops(entry["config"], captions, entry["sequence_length"],
                                                            with_projection=entry["class"].endswith("Projection"))
        return total

    def describe(self) -> str:
        width = self.spec.get("width_scale", 1.0)
        return f"{self.name} {self.resolution}px" + (f" width x{width:g}" if width != 1.0 else "")

    def build(self, device: torch.device):
        """A random-weight bundle of this architecture on `device` (built there: no host copy of big weights)."""
        if self.toy:
            from fastpref.models import family_module
            from fastpref.toy.tokenizer import build_tokenizer

            module = family_module(self.family)
            config = module.tiny_config("toy")
            with torch.device(device):
                return module.build_random(config, build_tokenizer(), seed=0)
        return build_from_spec(self.spec, device)


def build_from_spec(spec: dict, device: torch.device):
    import diffusers
    import transformers

    from fastpref.models import family_module

    torch.manual_seed(0)
    bundle_cls = {"sd": "SDBundle", "sdxl": "SDXLBundle", "sd3": "SD3Bundle"}[spec["family"]]
    with torch.device(device):
        denoiser = getattr(diffusers, spec["denoiser"]["class"])(**spec["denoiser"]["config"])
        vae = diffusers.AutoencoderKL(**spec["vae"]["config"])
        encoders = []
        for entry in spec["text_encoders"]:
            config_cls = transformers.T5Config if entry["class"] == "T5EncoderModel" else transformers.CLIPTextConfig
            encoders.append(getattr(transformers, entry["class"])(config_cls(**entry["config"])))
    scheduler_cls = getattr(diffusers, spec["scheduler"]["class"])
    scheduler = scheduler_cls.from_config(spec["scheduler"]["config"])  # ignores DDIM-only keys
    bundle = getattr(family_module(spec["family"]), bundle_cls)(
        denoiser=denoiser, vae=vae, text_encoders=encoders, tokenizers=[None] * len(encoders),
        noise_scheduler=scheduler, sample_scheduler=scheduler,
        prediction_type="flow" if spec["family"] == "sd3" else spec["scheduler"]["config"]["prediction_type"],
        source=f"random weights: configs/models ({spec['name']})",
    )
    if spec["family"] == "sd3":
        bundle.max_sequence_length = spec["text_encoders"][2]["sequence_length"]
    return bundle


def load_arch(name: str, width: float = 1.0, resolution: int | None = None) -> Arch:
    if name in TOY_ARCHS:
        if width != 1.0 or resolution not in (None, 32):
            raise ValueError(f"--arch {name}: the toy models have one shape (32 px); drop --width-scale/--resolution")
        return Arch(name, TOY_ARCHS[name], toy_spec(name), 32, toy=True)
    if name not in REAL_ARCHS:
        raise ValueError(f"unknown --arch {name!r} (choose from {sorted(TOY_ARCHS) + sorted(REAL_ARCHS)})")
    path = CONFIG_DIR / REAL_ARCHS[name]
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the architecture config: {err}") from err
    spec = scale_spec(spec, width)
    resolution = resolution or spec["resolution"]
    factor = 2 ** (len(spec["vae"]["config"]["block_out_channels"]) - 1)
    if resolution % (factor * 8):
        raise ValueError(f"--resolution {resolution}: must be a multiple of {factor * 8} for {name}")
    return Arch(name, spec["family"], spec, resolution)


def toy_spec(name: str) -> dict:
    """The toy model's configs in the configs/models layout (for the FLOP counts)."""
    from fastpref.models import family_module
    from fastpref.toy.tokenizer import build_tokenizer

    family = TOY_ARCHS[name]
    config = family_module(family).tiny_config("toy")
    tokenizer = build_tokenizer()
    length = tokenizer.model_max_length
    from fastpref.models.bundle import clip_text_config

    encoders = []
    for key in ("text_encoder", "text_encoder_2"):
        if key in config:
            text = config[key]
            cfg = clip_text_config(tokenizer, text["hidden"], text["layers"], text["heads"], text.get("projection_dim"))
            cls = "CLIPTextModelWithProjection" if (family == "sd3" or key == "text_encoder_2") else "CLIPTextModel"
            encoders.append({"class": cls, "sequence_length": length, "config": cfg})
    denoiser_key = "transformer" if family == "sd3" else "unet"
    return {"name": name, "family": family, "denoiser": {"config": config[denoiser_key]}, "text_encoders": encoders,
            "vae": {"config": config["vae"]}, "denoiser_text_length": length + config.get("max_sequence_length", 0)}


# ====================================================================================== timing


class PhaseTimer:
    """Exclusive wall time per phase (a phase nested in another is subtracted from it); syncs CUDA at the edges."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}
        self._stack: list[list] = []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            self._sync()
            _, inner = self._stack.pop()
            elapsed = time.perf_counter() - start
            self.totals[name] = self.totals.get(name, 0.0) + elapsed - inner
            if self._stack:
                self._stack[-1][1] += elapsed


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ====================================================================================== workloads


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


# ====================================================================================== runners


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
        from fastpref.train.loop import LoraConfig, add_lora
        from fastpref.train.parallel import build_parallel
        from fastpref.train.speed import apply_model_speedups, autocast, build_optimizer, set_attention_backend
        from fastpref.train.step import ReferenceModel, TrainStep

        self.arch, self.variant, self.device = arch, variant, device
        speed, work = variant.speed, variant.work
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
        ref_dtype = torch.bfloat16 if speed.mixed_precision == "bf16" else None
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
        objective = ObjectiveConfig(name=work.objective)
        self.step_fn = TrainStep(bundle, module, objective, self.reference, noise_seed=0,
                                 autocast=autocast(device, speed.mixed_precision),
                                 loss_backend="auto" if speed.fused_loss else "reference")
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
            parallel.clip_grad_norm(1.0)
            parallel.step()

    @contextlib.contextmanager
    def instrumented(self, timer: PhaseTimer):
        """Attribute the noise draw to 'data' and the live reference forward to 'reference'."""
        import fastpref.train.step as step_module

        draw, predict = step_module.draw_timesteps_and_noise, self.reference.predict

        def timed_draw(*args, **kwargs):
            with timer("data"):
                return draw(*args, **kwargs)

        def timed_predict(*args, **kwargs):
            with timer("reference"):
                return predict(*args, **kwargs)

        step_module.draw_timesteps_and_noise = timed_draw
        self.reference.predict = timed_predict
        try:
            yield
        finally:
            step_module.draw_timesteps_and_noise = draw
            del self.reference.predict


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


# ====================================================================================== measurement


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
    """(model FLOPs, hardware FLOPs) of one step; conventions in bench/flops.py and bench/README.md."""
    work = variant.work
    forward = arch.denoiser_forward_flops(work.images)
    backward = flop_count.backward_flops(forward, work.mode)
    reference = forward.total  # the recipe needs the reference forward on every image
    model = forward.total + backward.total + reference
    checkpointing = (baseline_dpo.uses_checkpointing(arch.family) if variant.system == "baseline"
                     else variant.speed.gradient_checkpointing)
    hardware = forward.total + backward.total + (forward.recomputed if checkpointing else 0.0)
    if variant.system == "baseline" or not variant.cached_reference:
        hardware += reference
    if variant.system == "baseline" or not variant.cached_latents:
        hardware += arch.encode_flops(work.images, work.groups).total
    return model, hardware


def fill_row(row, arch, variant, times, timer, peak, settings):
    work = variant.work
    median = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4) if len(times) >= 2 else [median] * 3
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


# ====================================================================================== output


CSV_ENV_KEYS = ("device", "torch", "diffusers", "transformers", "peft", "triton", "torchao", "bitsandbytes")


def add_ratios(rows: list[dict]) -> None:
    """fastpref / baseline at the same images per step: pairs/s for DPO; images/s for RankDPO (no public baseline)."""
    baselines = {(r["arch"], r["mode"]): r for r in rows if r["system"] == "baseline" and r["status"] == "ok"}
    headline_fastpref = {(r["arch"], r["objective"], r["mode"]): r for r in rows
                         if r["section"] == "headline" and r["system"] == "fastpref" and r["status"] == "ok"}
    for row in rows:
        row["vs_baseline"] = ""
        row["vs_fastpref"] = ""
        base = baselines.get((row["arch"], row["mode"]))
        if row["status"] == "ok" and base is not None and row["system"] == "fastpref":
            row["vs_baseline"] = round(row["images_per_s"] / base["images_per_s"], 3)
        ref = headline_fastpref.get((row["arch"], row["objective"], row["mode"]))
        if row["status"] == "ok" and ref is not None and row["section"] == "ablation":
            row["vs_fastpref"] = round(row["images_per_s"] / ref["images_per_s"], 3)


def fmt(value, digits=3):
    if value in ("", None):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown(rows, env, settings, arch_notes, speed_note, estimates) -> str:
    lines = [f"# fastpref step benchmark ({settings.tag})", ""]
    lines.append(f"- device: {env['device']}; torch {env['torch']}, diffusers {env.get('diffusers', '?')}, "
                 f"transformers {env.get('transformers', '?')}, peft {env.get('peft', '?')}")
    lines.append(f"- peak used for MFU/HFU: {settings.peak_source}")
    lines.append(f"- timing: {settings.warmup} warm-up, median of {settings.steps} steps; phases from "
                 f"{settings.phase_steps} further steps with a device sync at each phase edge")
    lines.extend(f"- {note}" for note in arch_notes + [speed_note])
    lines.append("")
    header = ("| arch | section | variant | objective | mode | img/step | step ms | pairs/s | img/s | data | encode "
              "| reference | policy f+b | optimizer | comm | peak GiB | MFU | HFU | x baseline | x fastpref | status |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        phases = [fmt(r.get(f"{p}_ms")) for p in PHASES]
        lines.append("| " + " | ".join([
            r["shape"], r["section"], r["variant"], r["objective"], r["mode"], str(r["images_per_step"]),
            fmt(r.get("step_ms")), fmt(r.get("pairs_per_s")), fmt(r.get("images_per_s")), *phases,
            fmt(r.get("peak_mem_GiB")), fmt(r.get("MFU"), 2), fmt(r.get("HFU"), 2), fmt(r.get("vs_baseline")),
            fmt(r.get("vs_fastpref")), r["status"]]) + " |")
    lines.append("")
    lines.append("Phases are milliseconds per step. 'x baseline': fastpref images/s over the public Diffusion-DPO "
                 "step's at the same images per step (pairs/s ratio for DPO). 'x fastpref': an ablation row's "
                 "images/s over the full fastpref configuration.")
    if estimates:
        lines += ["", "## GPU-days of the published SDXL recipes at the measured speed", "",
                  gpu_days.markdown(estimates)]
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, title: str) -> None:
    from fastpref.utils.imports import require

    matplotlib = require("matplotlib", "the benchmark plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["status"] == "ok"]
    if not measured:
        return
    labels = [f"{r['arch']} {r['objective']}/{r['mode']}\n{r['variant']}" for r in measured]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.45 * len(measured) + 2), sharey=True)
    y = range(len(measured))
    colors = ["tab:orange" if r["system"] == "baseline" else ("tab:blue" if r["section"] == "headline" else "tab:gray")
              for r in measured]
    ax1.barh(list(y), [r["images_per_s"] for r in measured], color=colors)
    ax1.set_xlabel("images / s (higher is better)")
    ax1.set_yticks(list(y), labels, fontsize=7)
    ax1.invert_yaxis()
    left = [0.0] * len(measured)
    for phase in PHASES:
        values = [r[f"{phase}_ms"] for r in measured]
        ax2.barh(list(y), values, left=left, label=phase)
        left = [a + b for a, b in zip(left, values)]
    ax2.set_xlabel("ms per step, by phase")
    ax2.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows, env, settings, arch_notes, speed_note, estimates) -> dict[str, Path]:
    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"step-{settings.tag}.csv", "md": out / f"step-{settings.tag}.md",
             "png": out / f"step-{settings.tag}.png"}
    fields = list(dict.fromkeys(key for row in rows for key in row))
    env_fields = {f"env_{key}": env.get(key, "") for key in CSV_ENV_KEYS}
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields + list(env_fields) + ["peak_source", "speed_config"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: row.get(k, "") for k in fields}, **env_fields, "peak_source": settings.peak_source,
                             "speed_config": row.get("speed_config", "")})
    paths["md"].write_text(markdown(rows, env, settings, arch_notes, speed_note, estimates))
    plot(rows, paths["png"], f"fastpref step vs public Diffusion-DPO step — {env['device']}")
    return paths


def print_table(rows) -> None:
    header = (f"{'arch':24} {'variant':36} {'obj/mode':13} {'img':>4} {'step ms':>9} {'img/s':>8} {'MFU':>7} "
              f"{'x base':>7} {'x fp':>6}  status")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['shape'][:24]:24} {r['variant'][:36]:36} {r['objective'] + '/' + r['mode']:13} "
              f"{r['images_per_step']:>4} {fmt(r.get('step_ms')):>9} {fmt(r.get('images_per_s')):>8} "
              f"{fmt(r.get('MFU'), 2):>7} {fmt(r.get('vs_baseline')):>7} {fmt(r.get('vs_fastpref')):>6}  "
              f"{r['status'] if r['status'] != 'ok' else ''}")


# ====================================================================================== main


def run(args) -> dict[str, Path]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    peak, peak_source = peak_tflops(device)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = args.tag or f"{'-'.join(args.arch)}-{device.type}{'-smoke' if args.smoke else ''}-{stamp}"
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
    parser.add_argument("--tag", help="results file stem (default: arch-device-date)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help=f"output folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
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
