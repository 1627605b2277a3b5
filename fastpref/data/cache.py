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

e_ref is computed from the stored (rounded) latents and conditioning, so it is what the trainer's reference
forward would give on the streamed batch, up to the rounding of the compute dtype and batch size.

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

import dataclasses
from typing import Literal

import numpy as np

from fastpref.config import ConfigError
from fastpref.data.noise import draw_flips, draw_timesteps_and_noise
from fastpref.data.shards import Manifest, ShardError, StageDir, run_worker_stage, stage_config
from fastpref.data.synth import image_seed, load_bundle, resolve_device
from fastpref.models.bundle import (FLOW_FAMILIES, LEGACY_FLOW_TIMESTEPS, FlowTimestepsConfig, flow_timestep_record,
                                    scheduler_timestep_shift)
from fastpref.utils.imports import require


@dataclasses.dataclass
class ReferenceErrorConfig:
    epochs: int = 0  # epochs of e_ref to precompute; 0 = none (the trainer then runs the reference itself)
    seed: int = 0  # the training noise seed; the trainer must use the same (dataset.noise_seed)


@dataclasses.dataclass
class CacheConfig:
    input: str  # dataset root holding synth/ (and label/)
    family: Literal["sd", "sdxl", "sd3"]
    model: str  # the reference model (= the policy's starting point): local folder, hub id or toy name
    output: str | None = None  # dataset root to write cache/ into; default: input
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # compute dtype
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
        self.flow_timesteps.check_family(self.family)


RUNTIME_FIELDS = ("input", "output", "device", "shard_index", "num_workers", "overwrite", "progress", "batch_size")
# in the plan as its effect, the flow_timesteps_drawn record (see the module docstring), not as the section
PLAN_RECORDED_FIELDS = ("flow_timesteps",)


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
        self.torch = require("torch")
        self.bundle = bundle
        self.config = config
        self.store = np.float16 if config.store_dtype == "float16" else np.float32

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
                out.append(bundle.encode_images(pixels, generator=generators).float().cpu().numpy())
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

    def reference_errors(
        self, latents: np.ndarray, latents_flip: np.ndarray | None, cond: dict[str, np.ndarray], group_ids: list[int]
    ) -> np.ndarray:
        """(G, E, K) e_ref at the training draws of fastpref.data.noise."""
        torch, bundle, cfg = self.torch, self.bundle, self.config
        groups, k = latents.shape[:2]
        errors = np.zeros((groups, cfg.reference_errors.epochs, k), dtype=np.float32)
        groups_per_batch = max(1, cfg.batch_size // k)
        for epoch in range(cfg.reference_errors.epochs):
            for start in range(0, groups, groups_per_batch):
                rows = slice(start, min(start + groups_per_batch, groups))
                ids = group_ids[rows]
                x0 = torch.from_numpy(latents[rows].astype(np.float32))
                if latents_flip is not None:
                    flips = draw_flips(cfg.reference_errors.seed, epoch, ids)
                    mirrored = torch.from_numpy(latents_flip[rows].astype(np.float32))
                    x0 = torch.where(flips[:, None, None, None, None], mirrored, x0)
                draw = draw_timesteps_and_noise(cfg.reference_errors.seed, epoch, ids, tuple(x0.shape[2:]), bundle)
                e = self.errors_at(x0, draw.timesteps, draw.noise, {key: value[rows] for key, value in cond.items()})
                errors[rows, epoch] = e.reshape(len(ids), k).numpy()
        return errors

    def errors_at(self, x0, timesteps, noise, cond: dict[str, np.ndarray]):
        """Per-sample reference errors (G*K,) for groups of latents x0 (G, K, ...) under per-group (t, eps)."""
        from fastpref.ops.reference import sample_errors_reference

        torch, bundle = self.torch, self.bundle
        groups, k = x0.shape[:2]
        dtype, device = bundle.dtype, bundle.device
        x0 = x0.reshape(groups * k, *x0.shape[2:]).to(device, dtype)
        eps = noise.repeat_interleave(k, dim=0).to(device, dtype)
        t = timesteps.repeat_interleave(k, dim=0).to(device)
        cond_rows = {
            key: torch.from_numpy(value.astype(np.float32)).repeat_interleave(k, 0).to(device, dtype)
            for key, value in cond.items()
        }
        with torch.no_grad():
            pred = bundle.denoise(bundle.add_noise(x0, eps, t), t, cond_rows)
            errors, _ = sample_errors_reference(pred, bundle.target(x0, eps, t))
        return errors.float().cpu()


def run_cache(config: CacheConfig, bundle=None) -> Manifest | None:
    """Cache this worker's shards into <output>/cache; `bundle` overrides loading config.model (tests, notebooks).

    config.flow_timesteps applies to a given bundle too (to a shallow copy of it: the caller's is not changed)."""
    synth, label = open_inputs(config.input)
    fingerprint = synth.fingerprint + (f"+{label.fingerprint}" if label is not None else "")

    drawn = planned_flow_timesteps(config, bundle)

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
        latents = encoder.latents(images, group_ids, flip=False)
        latents_flip = encoder.latents(images, group_ids, flip=True) if config.flip else None
        cond = encoder.conditioning([g["prompt"] for g in groups])
        for row, group_id in enumerate(group_ids):
            writer.save_array(group_file("latents", group_id), latents[row])
            if latents_flip is not None:
                writer.save_array(group_file("latents_flip", group_id), latents_flip[row])
            for key, value in cond.items():
                writer.save_array(group_file(f"cond.{key}", group_id), value[row])
        writer.save_array("group_ids.npy", np.asarray(group_ids, dtype=np.int64))
        if label is not None:
            writer.save_array("psi.npy", label.load(index, "psi.npy").astype(np.float32))
        if config.reference_errors.epochs > 0:
            writer.save_array("e_ref.npy", encoder.reference_errors(latents, latents_flip, cond, group_ids))

    stage = StageDir(config.output or config.input, "cache")
    plan = stage_config(config, RUNTIME_FIELDS + PLAN_RECORDED_FIELDS)
    if drawn is not None and drawn != LEGACY_FLOW_TIMESTEPS:
        plan["flow_timesteps_drawn"] = drawn
    shard_groups = [shard["num_groups"] for shard in synth.shards]
    return run_worker_stage(stage, config, plan, fingerprint, shard_groups, load, write)


def cli(argv: list[str]) -> int:
    from fastpref.data import stage_cli

    return stage_cli(argv, CacheConfig, run_cache, "cache", "cache VAE latents, text embeddings and reference errors")


if __name__ == "__main__":
    import sys

    sys.exit(cli(sys.argv[1:]))
