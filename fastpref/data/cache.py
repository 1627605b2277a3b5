"""Stage 3, cache: everything the training step would otherwise recompute, encoded once.

Reads <input>/synth (images) and, when present, <input>/label (psi), and writes <output>/cache with the same
shards. Big per-group tensors are one .npy per group (what DALI's numpy reader streams); small ones per shard:

    latents/gNNNNNNNN.npy        (K, C, h, w) VAE posterior samples (seeded per image), scaled as the denoiser sees them
    latents_flip/gNNNNNNNN.npy   (K, C, h, w) latents of the horizontally flipped images (flip: true)
    cond.<key>/gNNNNNNNN.npy     the prompt's conditioning from ModelBundle.encode_prompt, batch dim dropped
                                 (encoder_hidden_states; + text_embeds, time_ids for SDXL; + pooled_projections for SD3)
    group_ids.npy (G,) int64, psi.npy (G, K) float32 (when labelled)
    e_ref.npy     (G, E, K) float32: the reference model's per-sample error (fastpref.ops.reference.
                  sample_errors_reference, unweighted: a trainer's per-sample weight w_i multiplies it) at the
                  (t, eps) of fastpref.data.noise for epochs 0..E-1 (on the mirrored latents where draw_flips says so)

    empty_cond.<key>.npy          caption_dropout > 0: the empty caption's conditioning (same in every shard)
    image_cond.time_ids/gNNNNNNNN.npy  (K, 6) float32, SDXL with recorded image sizes (the importer's original_size /
                                 crop_top_left): per-image time_ids, replacing the prompt's cond.time_ids

e_ref is computed from the stored (rounded) latents and conditioning exactly as the training step computes the
policy's error: the denoiser's weights in `dtype` (= train.model.dtype), under the autocast of `mixed_precision` (=
train.speed.mixed_precision), float32 latents / noise / targets, the conditioning cast to the weights' dtype, the
empty caption where the group's caption-dropout draw says so (fastpref.data.noise.draw_caption_dropout). The plan
records that recipe as reference_recipe (reference_recipe()), which the trainer compares with its own before it uses
the cached e_ref (a cache made before the record, or with mixed_precision: no, reads as the legacy recipe: weights
and inputs in `dtype`, no autocast).

Bit-equal e_ref: a sample's error also depends, by float rounding, on the memory layout of the denoiser's input, on
how many rows its forward has (kernels pick their algorithm by it; which rows, and where, does not matter) and on
the error kernel. e_ref is computed from contiguous inputs, as the training step's batches are; with
reference_errors.forward_rows = the training step's images per forward and reference_errors.loss_backend = the
trainer's loss_backend, the cached e_ref are the policy's errors at step 0 bit for bit (tests/train/
test_fidelity.py, fp32 / bf16 / fp16 autocast on CPU). Both are runtime fields, like batch_size: not in the plan.
A training forward of another row count (the last batch, or pairwise groups dropped for ties) and another
intra-op thread count than the cache's can still differ by rounding (docs/decisions.md).

VAE precision: the images are encoded by `vae` (an AutoencoderKL folder or hub id, e.g. the fp16-fix SDXL VAE)
when set, else the model's; a VAE whose config sets force_upcast (SDXL's, SD3's) encodes in float32 whatever
`dtype` is, as diffusers does (the cache runs once). A shard whose latents (or conditioning, or e_ref) hold a NaN /
inf, after rounding to store_dtype, is refused, naming it.

Flow-matching families (sd3) draw e_ref's timesteps through the model scheduler's shift and the `flow_timesteps`
section (fastpref.models.bundle.FlowTimestepsConfig). The plan (and so the manifest) records what those draws were
made with under config["flow_timesteps_drawn"], e.g. {"shift": 3.0, "weighting": "logit_normal", "logit_mean": 0.0,
"logit_std": 1.0} (fastpref.models.bundle.flow_timestep_record), which the trainer compares with its own before it
uses the cached e_ref. The record is left out where it equals LEGACY_FLOW_TIMESTEPS (shift 1.0, logit-normal(0, 1)):
the draws every flow cache was made with before the record existed, so a flow manifest without one reads as
that, and the plans (hashes) of such caches (toy-sd3's included) are those they always had. Families without flow
matching record nothing (uniform DDPM steps) and refuse a non-default flow_timesteps section.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Literal

import numpy as np

from fastpref.config import ConfigError
from fastpref.data.noise import draw_caption_dropout, draw_flips, draw_timesteps_and_noise
from fastpref.data.shards import Manifest, ShardError, StageDir, run_worker_stage, stage_config
from fastpref.data.synth import image_seed, load_bundle, resolve_device
from fastpref.models.bundle import (FLOW_FAMILIES, LEGACY_FLOW_TIMESTEPS, FlowTimestepsConfig, flow_timestep_record,
                                    scheduler_timestep_shift)
from fastpref.utils.imports import require


@dataclasses.dataclass
class ReferenceErrorConfig:
    epochs: int = 0  # epochs of e_ref to precompute; 0 = none (the trainer then runs the reference itself)
    seed: int = 0  # the training noise seed; the trainer must use the same (dataset.noise_seed)
    # runtime, not in the plan: they change e_ref by float rounding only ("Bit-equal e_ref" in the module docstring)
    # images per e_ref denoiser forward = the training step's: data.batch_groups x the images its objective uses
    # per group (K for rankdpo / kto, 2 for dpo); null: batch_size // K whole groups per forward
    forward_rows: int | None = None
    # the per-sample error kernel = the trainer's loss_backend ("auto" resolves on the cache's device as the
    # trainer's does on its own)
    loss_backend: Literal["auto", "triton", "native", "reference"] = "auto"


@dataclasses.dataclass
class CacheConfig:
    input: str  # dataset root holding synth/ (and label/)
    family: Literal["sd", "sdxl", "sd3"]
    model: str  # the reference model (= the policy's starting point): local folder, hub id or toy name
    output: str | None = None  # dataset root to write cache/ into; default: input
    # dtype of the weights (denoiser, text encoders; the VAE too unless force_upcast): e_ref's denoiser must hold the
    # trained denoiser's weights dtype (train.model.dtype) for the trainer to use the cached e_ref
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # autocast of e_ref's denoiser forward (= train.speed.mixed_precision)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    vae: str | None = None  # encode with this AutoencoderKL (folder or hub id) instead of the model's
    # probability that a group trains on the empty caption in an epoch (Diffusion-DPO: 0.2); drawn per (seed, epoch,
    # group) by fastpref.data.noise, applied by the dataset's stream and by e_ref alike
    caption_dropout: float = 0.0
    store_dtype: Literal["float32", "float16"] = "float16"  # on-disk dtype of latents and conditioning
    flip: bool = False  # also cache latents of the horizontally flipped images
    seed: int = 0  # seeds the VAE posterior samples (per image)
    reference_errors: ReferenceErrorConfig = dataclasses.field(default_factory=ReferenceErrorConfig)
    batch_size: int = 32  # images (and prompt groups x K for e_ref) per forward
    device: str = "auto"
    shard_index: int | None = None
    num_workers: int | None = None
    overwrite: bool = False
    progress: bool = True
    # flow (sd3) families: how e_ref's training timesteps are drawn (the shift is the model scheduler's); the trainer
    # must be given the same section to use the cached e_ref. sd / sdxl: must stay at the defaults
    flow_timesteps: FlowTimestepsConfig = dataclasses.field(default_factory=FlowTimestepsConfig)

    def validate(self) -> None:
        if self.batch_size < 1 or self.reference_errors.epochs < 0:
            raise ConfigError("batch_size must be >= 1 and reference_errors.epochs >= 0")
        rows = self.reference_errors.forward_rows
        if rows is not None and rows < 1:
            raise ConfigError(f"reference_errors.forward_rows: must be >= 1 (the training step's images per "
                              f"denoiser forward) or null, got {rows}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        self.flow_timesteps.check_family(self.family)


RUNTIME_FIELDS = ("input", "output", "device", "shard_index", "num_workers", "overwrite", "progress", "batch_size")
# reference_errors' fields that decide how e_ref is batched and reduced (rounding), not what it is
REFERENCE_ERRORS_RUNTIME_FIELDS = ("forward_rows", "loss_backend")
# in the plan as its effect, the flow_timesteps_drawn record (see the module docstring), not as the section
PLAN_RECORDED_FIELDS = ("flow_timesteps",)
# in the plan only when set away from their defaults, so that caches made before they existed keep their plans
PLAN_FIELDS_AT_DEFAULT_OMITTED = {"mixed_precision": "no", "vae": None, "caption_dropout": 0.0}
FLOAT_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
AUTOCAST_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


def reference_recipe(weights: str, mixed_precision: str = "no", fp8: bool = False) -> dict[str, Any]:
    """How a per-sample error is computed, as the cache manifest records it and the trainer compares it: the
    denoiser's weights dtype, the autocast, the dtype of the latents / noise / target fed to it (the training step
    feeds float32; the legacy cache rounded them to its weights' dtype when it ran without autocast)."""
    inputs = "float32" if weights == "float32" or mixed_precision != "no" else weights
    recipe: dict[str, Any] = {"weights": weights, "autocast": mixed_precision, "inputs": inputs}
    if fp8:
        recipe["fp8"] = True
    return recipe


def cached_reference_recipe(cache_config: dict) -> dict[str, Any]:
    """The reference_recipe a cache's e_ref was computed with: its manifest's record, else (caches made before it,
    and every cache without autocast) its dtype's legacy recipe."""
    if "reference_recipe" in cache_config:
        return dict(cache_config["reference_recipe"])
    return reference_recipe(cache_config.get("dtype", "float32"))


def describe_recipe(recipe: dict[str, Any]) -> str:
    compute = "fp8" if recipe.get("fp8") else AUTOCAST_NAMES.get(recipe["autocast"], recipe["weights"])
    details = []
    if recipe["autocast"] != "no":
        details.append(f"{recipe['weights']} weights under {recipe['autocast']} autocast")
    if recipe["inputs"] != "float32":
        details.append(f"latents, noise and targets rounded to {recipe['inputs']}")
    return f"in {compute}" + (f" ({'; '.join(details)})" if details else "")


def reference_recipe_gap(cached: dict[str, Any], training: dict[str, Any]) -> str | None:
    """Why cached e_ref would not equal the training step's reference errors (None: same recipe)."""
    if cached == training:
        return None
    return f"cached reference errors were computed {describe_recipe(cached)}, training runs {describe_recipe(training)}"


def planned_flow_timesteps(config: CacheConfig, bundle=None) -> dict | None:
    """The flow_timestep_record the cache's e_ref will be drawn with (None: not a flow model), known before the model
    loads: the shift from `bundle` when given, else from config.model's scheduler config."""
    from fastpref.models import resolve_path

    if bundle is not None:
        if bundle.prediction_type != "flow":
            return None
        shift = bundle.timestep_shift
    elif config.family in FLOW_FAMILIES:
        shift = scheduler_timestep_shift(resolve_path(config.model))
    else:
        return None
    return flow_timestep_record(shift, config.flow_timesteps.sampling())


def group_file(field: str, group_id: int) -> str:
    return f"{field}/g{group_id:08d}.npy"


def open_inputs(root: str) -> tuple[Manifest, Manifest | None]:
    """(synth manifest, label manifest or None when the dataset is unlabelled)."""
    synth = StageDir(root, "synth").open()
    label_dir = StageDir(root, "label")
    if not label_dir.path.exists():
        return synth, None
    label = label_dir.open()
    if label.data["input_fingerprint"] != synth.fingerprint:
        raise ShardError(f"{label.path}: labels were computed from a different synth output; rerun the label stage")
    return synth, label


class _Encoder:
    """Runs the bundle in no-grad batches and rounds outputs to the storage dtype."""

    def __init__(self, bundle, config: CacheConfig):
        from fastpref.train.speed import autocast

        self.torch = require("torch")
        self.bundle = bundle
        self.config = config
        self.store = np.float16 if config.store_dtype == "float16" else np.float32
        self.recipe = reference_recipe(config.dtype, config.mixed_precision)
        self.autocast = lambda: autocast(bundle.device, config.mixed_precision)  # a fresh context per use
        self.vae = self._vae()

    def _vae(self):
        """The VAE that encodes: the override when set, upcast to float32 when its config says force_upcast (the
        bundle's own is copied first, so a given bundle is left as it was)."""
        torch, bundle, config = self.torch, self.bundle, self.config
        if config.vae:
            from fastpref.models import resolve_path
            from fastpref.models.bundle import load_vae

            vae = load_vae(resolve_path(config.vae), getattr(torch, config.dtype)).to(bundle.device).eval()
        else:
            vae = bundle.vae
        if getattr(vae.config, "force_upcast", False) and vae.dtype != torch.float32:
            vae = (copy.deepcopy(vae) if vae is bundle.vae else vae).to(torch.float32)
        return vae

    def latents(self, images: np.ndarray, group_ids: list[int], flip: bool) -> np.ndarray:
        """(G, K, S, S, 3) uint8 -> (G, K, C, h, w) stored latents; each image has its own posterior seed."""
        torch, bundle = self.torch, self.bundle
        groups, k = images.shape[:2]
        flat = images.reshape(groups * k, *images.shape[2:])
        seeds = [image_seed(self.config.seed, g, j, "flip" if flip else "plain") for g in group_ids for j in range(k)]
        out = []
        for start in range(0, len(flat), self.config.batch_size):
            pixels = torch.from_numpy(flat[start : start + self.config.batch_size]).permute(0, 3, 1, 2)
            pixels = pixels.to(bundle.device, torch.float32) / 127.5 - 1.0
            if flip:
                pixels = pixels.flip(-1)
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start : start + len(pixels)]]
            with torch.no_grad():
                out.append(bundle.encode_images(pixels, generator=generators, vae=self.vae).float().cpu().numpy())
        latents = np.concatenate(out).astype(self.store)
        return latents.reshape(groups, k, *latents.shape[1:])

    def conditioning(self, prompts: list[str]) -> dict[str, np.ndarray]:
        chunks: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(prompts), self.config.batch_size):
            with self.torch.no_grad():
                cond = self.bundle.encode_prompt(prompts[start : start + self.config.batch_size])
            for key, value in cond.items():
                chunks.setdefault(key, []).append(value.float().cpu().numpy())
        return {key: np.concatenate(parts).astype(self.store) for key, parts in chunks.items()}

    def image_conditioning(self, groups: list[dict], image_size: tuple[int, int]) -> dict[str, np.ndarray]:
        """{"time_ids": (G, K, 6) float32} for SDXL when every image records its source size and crop (imported
        data), else {} (the prompt's full-resolution time_ids stay)."""
        images = [image for group in groups for image in group["images"]]
        if self.bundle.family != "sdxl" or not images or not all("original_size" in im for im in images):
            return {}
        ids = self.bundle.image_time_ids([im["original_size"] for im in images],
                                         [im.get("crop_top_left", (0, 0)) for im in images], image_size)
        return {"time_ids": ids.float().cpu().numpy().reshape(len(groups), -1, ids.shape[-1])}

    def reference_errors(
        self, latents: np.ndarray, latents_flip: np.ndarray | None, cond: dict[str, np.ndarray], group_ids: list[int],
        image_cond: dict[str, np.ndarray] | None = None, empty_cond: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """(G, E, K) e_ref at the training draws of fastpref.data.noise (flip, caption dropout, t, eps)."""
        torch, bundle, cfg = self.torch, self.bundle, self.config
        groups, k = latents.shape[:2]
        errors = np.zeros((groups, cfg.reference_errors.epochs, k), dtype=np.float32)
        groups_per_batch = self.groups_per_forward_batch(k)
        for epoch in range(cfg.reference_errors.epochs):
            for start in range(0, groups, groups_per_batch):
                rows = slice(start, min(start + groups_per_batch, groups))
                ids = group_ids[rows]
                x0 = latents[rows]
                if latents_flip is not None:
                    flips = draw_flips(cfg.reference_errors.seed, epoch, ids).numpy()
                    x0 = np.where(flips[:, None, None, None, None], latents_flip[rows], x0)
                x0 = torch.from_numpy(x0.astype(np.float32))
                draw = draw_timesteps_and_noise(cfg.reference_errors.seed, epoch, ids, tuple(x0.shape[2:]), bundle)
                batch_cond = {key: value[rows] for key, value in cond.items()}
                if cfg.caption_dropout > 0:
                    dropped = draw_caption_dropout(cfg.reference_errors.seed, epoch, ids, cfg.caption_dropout).numpy()
                    batch_cond = {key: np.where(dropped.reshape(-1, *[1] * (value.ndim - 1)), empty_cond[key][None],
                                                value) for key, value in batch_cond.items()}
                batch_images = {key: value[rows] for key, value in (image_cond or {}).items()}
                e = self.errors_at(x0, draw.timesteps, draw.noise, batch_cond, batch_images)
                errors[rows, epoch] = e.reshape(len(ids), k).numpy()
        return errors

    def groups_per_forward_batch(self, k: int) -> int:
        """Groups of K images whose e_ref are computed together: batch_size // K, rounded to a multiple of
        forward_rows' groups when set (so that only a shard's last batch of an epoch pads a forward)."""
        rows = self.config.reference_errors.forward_rows
        if rows is None:
            return max(1, self.config.batch_size // k)
        whole = math.lcm(rows, k)  # rows that are both whole forwards and whole groups
        return whole // k * max(1, self.config.batch_size // whole)

    def errors_at(self, x0, timesteps, noise, cond: dict[str, np.ndarray], image_cond: dict[str, np.ndarray] = None):
        """Per-sample reference errors (G*K,) for groups of latents x0 (G, K, ...) under per-group (t, eps), computed
        as fastpref.train.step.TrainStep computes the policy's: float32 latents, noise and target (rounded to the
        weights' dtype only by the legacy no-autocast 16-bit recipe) in the contiguous layout the step's batches
        have, conditioning in the weights' dtype, the denoiser under the recipe's autocast in forwards of
        forward_rows images, the error by the trainer's loss kernel (fastpref.ops.sample_errors of loss_backend)."""
        torch, bundle = self.torch, self.bundle
        groups, k = x0.shape[:2]
        dtype, device = bundle.dtype, bundle.device
        inputs = getattr(torch, self.recipe["inputs"])
        # contiguous: latents straight from the VAE are channels_last (the strides of its mid-block attention's
        # reshape, kept by numpy), which the training step's (np.load'ed) batches are not; CPU group norms reduce
        # in another order on them, which moved 1 to 4 e_ref in 16 under 16-bit autocast (docs/decisions.md)
        x0 = x0.reshape(groups * k, *x0.shape[2:]).to(device, inputs).contiguous()
        eps = noise.repeat_interleave(k, dim=0).to(device, inputs).contiguous()
        t = timesteps.repeat_interleave(k, dim=0).to(device)
        cond_rows = {key: torch.from_numpy(np.ascontiguousarray(value)).repeat_interleave(k, 0).to(device, dtype)
                     for key, value in cond.items()}
        for key, value in (image_cond or {}).items():
            cond_rows[key] = torch.from_numpy(np.ascontiguousarray(value)).flatten(0, 1).to(device, dtype)
        with torch.no_grad():
            noisy, target = bundle.add_noise(x0, eps, t), bundle.target(x0, eps, t)
            errors = [self.forward_errors(noisy[rows], t[rows], {key: value[rows] for key, value in cond_rows.items()},
                                          target[rows]) for rows in self.forward_slices(len(x0))]
        return torch.cat(errors).float().cpu()

    def forward_slices(self, num_rows: int) -> list[slice]:
        rows = self.config.reference_errors.forward_rows or num_rows
        return [slice(start, min(start + rows, num_rows)) for start in range(0, num_rows, rows)]

    def forward_errors(self, noisy, t, cond_rows: dict, target):
        """The errors of one denoiser forward, padded to forward_rows images by repeating its last row when short:
        CPU kernels pick their algorithm by the row count (float32 GEMMs of 1-2 rows, PyTorch's 1x1 convolutions
        from 16 rows), so a sample's bits depend on how many rows its forward had, and not on which rows."""
        from fastpref.ops.library import sample_errors

        torch = self.torch
        rows, wanted = len(noisy), self.config.reference_errors.forward_rows or len(noisy)
        if rows < wanted:
            index = torch.cat([torch.arange(rows), torch.full((wanted - rows,), rows - 1)]).to(noisy.device)
            noisy, t, target = noisy[index], t[index], target[index]
            cond_rows = {key: value[index] for key, value in cond_rows.items()}
        with self.autocast():
            pred = self.bundle.denoise(noisy, t, cond_rows)
        errors, _ = sample_errors(pred, target, backend=self.config.reference_errors.loss_backend)
        return errors[:rows]


def check_finite(arrays: dict[str, np.ndarray], group_ids: list[int], where: str) -> None:
    """ShardError naming the shard, the field and the first groups when a stored array holds a NaN / inf."""
    for name, array in arrays.items():
        bad = ~np.isfinite(np.asarray(array, dtype=np.float32).reshape(len(group_ids), -1)).all(axis=1)
        if bad.any():
            groups = [group_ids[i] for i in np.flatnonzero(bad)[:5]]
            raise ShardError(
                f"{where}: non-finite {name} (NaN / inf after rounding to the stored dtype) in {int(bad.sum())} "
                f"group(s), e.g. group ids {groups}; nothing of this shard was written. An SDXL VAE in float16 "
                "overflows: leave its force_upcast on (float32 encoding) or set cache.vae to an fp16-safe VAE "
                "(madebyollin/sdxl-vae-fp16-fix)")


def plan_of(config: CacheConfig, drawn: dict | None) -> dict:
    """What the cache's output depends on (its manifest's config): see the module docstring for the records."""
    plan = stage_config(config, RUNTIME_FIELDS + PLAN_RECORDED_FIELDS)
    for name in REFERENCE_ERRORS_RUNTIME_FIELDS:
        plan["reference_errors"].pop(name, None)
    for name, default in PLAN_FIELDS_AT_DEFAULT_OMITTED.items():
        if plan.get(name) == default:
            del plan[name]
    if drawn is not None and drawn != LEGACY_FLOW_TIMESTEPS:
        plan["flow_timesteps_drawn"] = drawn
    recipe = reference_recipe(config.dtype, config.mixed_precision)
    if config.reference_errors.epochs > 0 and recipe != reference_recipe(config.dtype):
        plan["reference_recipe"] = recipe
    return plan


def run_cache(config: CacheConfig, bundle=None) -> Manifest | None:
    """Cache this worker's shards into <output>/cache; `bundle` overrides loading config.model (tests, notebooks).

    config.flow_timesteps applies to a given bundle too (to a shallow copy of it: the caller's is not changed)."""
    synth, label = open_inputs(config.input)
    fingerprint = synth.fingerprint + (f"+{label.fingerprint}" if label is not None else "")

    drawn = planned_flow_timesteps(config, bundle)
    stage = StageDir(config.output or config.input, "cache")
    if config.mixed_precision != "no":  # before the model loads: fp16 autocast needs a device that has it
        from fastpref.train.speed import UnsupportedSpeedOption, autocast_dtype

        device = bundle.device if bundle is not None else require("torch").device(resolve_device(config.device))
        try:
            autocast_dtype(device, config.mixed_precision)
        except UnsupportedSpeedOption as err:
            raise ConfigError(f"mixed_precision: {config.mixed_precision}: {err}") from None
    if config.reference_errors.epochs > 0:  # before the model loads, naming the key
        from fastpref.ops.library import resolve_backend

        device = bundle.device if bundle is not None else require("torch").device(resolve_device(config.device))
        try:
            resolve_backend(config.reference_errors.loss_backend, device)
        except RuntimeError as err:
            raise ConfigError(f"reference_errors.loss_backend: {config.reference_errors.loss_backend}: {err}") from None

    def load() -> _Encoder:
        model = bundle or load_bundle(config.family, config.model, config.dtype, resolve_device(config.device))
        model = model.with_flow_timesteps(config.flow_timesteps.sampling())  # a copy: a given bundle is left as is
        if model.flow_timestep_record != drawn:
            raise ShardError(f"{config.model}: the loaded model draws flow timesteps with {model.flow_timestep_record}"
                             f", its scheduler config said {drawn}; the cache plan would record the wrong one")
        return _Encoder(model, config)

    def write(index: int, writer, encoder: _Encoder) -> None:
        groups = synth.load_json(index, "groups.json")
        group_ids = [g["index"] for g in groups]
        images = synth.load(index, "images.npy")
        where = f"cache shard {index} ({stage.shard_dir(index)})"
        latents = encoder.latents(images, group_ids, flip=False)
        latents_flip = encoder.latents(images, group_ids, flip=True) if config.flip else None
        cond = encoder.conditioning([g["prompt"] for g in groups])
        image_cond = encoder.image_conditioning(groups, tuple(images.shape[2:4]))
        for key in image_cond:
            cond.pop(key, None)  # per-image values replace the prompt's
        empty_cond = None
        if config.caption_dropout > 0:
            empty_cond = {key: value[0] for key, value in encoder.conditioning([""]).items() if key in cond}
        check_finite({"latents": latents, **({"latents_flip": latents_flip} if latents_flip is not None else {}),
                      **{f"cond.{key}": value for key, value in cond.items()}}, group_ids, where)
        e_ref = None
        if config.reference_errors.epochs > 0:
            e_ref = encoder.reference_errors(latents, latents_flip, cond, group_ids, image_cond, empty_cond)
            check_finite({"e_ref": e_ref}, group_ids, where)
        for row, group_id in enumerate(group_ids):
            writer.save_array(group_file("latents", group_id), latents[row])
            if latents_flip is not None:
                writer.save_array(group_file("latents_flip", group_id), latents_flip[row])
            for key, value in cond.items():
                writer.save_array(group_file(f"cond.{key}", group_id), value[row])
            for key, value in image_cond.items():
                writer.save_array(group_file(f"image_cond.{key}", group_id), value[row])
        for key, value in (empty_cond or {}).items():
            writer.save_array(f"empty_cond.{key}.npy", value)
        writer.save_array("group_ids.npy", np.asarray(group_ids, dtype=np.int64))
        if label is not None:
            writer.save_array("psi.npy", label.load(index, "psi.npy").astype(np.float32))
        if e_ref is not None:
            writer.save_array("e_ref.npy", e_ref)

    plan = plan_of(config, drawn)
    shard_groups = [shard["num_groups"] for shard in synth.shards]
    return run_worker_stage(stage, config, plan, fingerprint, shard_groups, load, write)


def cli(argv: list[str]) -> int:
    from fastpref.data import stage_cli

    return stage_cli(argv, CacheConfig, run_cache, "cache", "cache VAE latents, text embeddings and reference errors")


if __name__ == "__main__":
    import sys

    sys.exit(cli(sys.argv[1:]))
