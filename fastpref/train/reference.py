"""Which reference a training step compares the policy to, and in which dtype; the reference model itself.

e_ref comes, in order of preference, from the cache (precomputed for the same (t, eps): no reference forward at
all), from the policy with its LoRA adapters switched off, or from a frozen copy of the initial denoiser (full
fine-tuning). `plan_reference` decides, from the config and the dataset, before any model is loaded (a cache that
cannot serve the run fails at once); `ReferenceModel` then serves the predictions.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fastpref.config import ConfigError
from fastpref.models.bundle import FLOW_FAMILIES, LEGACY_FLOW_TIMESTEPS, flow_timestep_record, scheduler_timestep_shift
from fastpref.train.config import DTYPES

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_reference_dtype(setting: str, device: torch.device, weight_dtype: torch.dtype,
                            mixed_precision: str = "no") -> torch.dtype:
    """The dtype of full fine-tuning's frozen reference copy for train.reference_dtype (see TrainConfig).

    auto: on a CUDA device the policy's compute dtype (the autocast dtype of speed.mixed_precision, else the weights'
    dtype): 16-bit under bf16 / fp16 autocast, where the copy costs half the memory and rounds as the policy does;
    on CPU the weights' dtype.
    """
    if setting != "auto":
        return DTYPES[setting]
    if device.type != "cuda":
        return weight_dtype
    return AUTOCAST_DTYPES.get(mixed_precision, weight_dtype)


def reference_precision_gap(reference_dtype: torch.dtype, weight_dtype: torch.dtype,
                            mixed_precision: str = "no") -> str | None:
    """Why a frozen reference in `reference_dtype` would not round as the policy does (None: it would)."""
    name = str(reference_dtype).removeprefix("torch.")
    autocast_dtype = AUTOCAST_DTYPES.get(mixed_precision)
    if autocast_dtype is not None:  # the reference runs under the same autocast: only another 16-bit dtype differs
        if reference_dtype in (torch.bfloat16, torch.float16) and reference_dtype != autocast_dtype:
            return f"the frozen reference is kept in {name} and the training autocasts to {mixed_precision}"
        return None
    if reference_dtype != weight_dtype:
        return f"the frozen reference runs in {name} and the policy in {str(weight_dtype).removeprefix('torch.')}"
    return None


def cached_flow_timesteps(cache_config: dict) -> dict | None:
    """The flow_timestep_record a cache's e_ref was drawn with (fastpref/data/cache.py): its manifest's
    flow_timesteps_drawn; a flow cache without one was made before the record existed (or at the legacy draws,
    which are not recorded): shift 1.0, logit-normal(0, 1). None for families without flow matching."""
    if "flow_timesteps_drawn" in cache_config:
        return cache_config["flow_timesteps_drawn"]
    return dict(LEGACY_FLOW_TIMESTEPS) if cache_config.get("family") in FLOW_FAMILIES else None


def flow_timesteps_gap(cached: dict | None, training: dict | None) -> str | None:
    """What differs between the flow timestep draws of a cache and of training (None: they draw the same t)."""
    if cached == training:
        return None
    if cached is None or training is None:
        return (f"the cached reference errors were drawn at {'DDPM' if cached is None else 'flow'} timesteps and "
                f"training draws {'DDPM' if training is None else 'flow'} timesteps")
    names = {"shift": "the model scheduler's timestep shift"}
    diffs = []
    for key in dict.fromkeys(["shift", "weighting", *sorted({*cached, *training})]):
        if cached.get(key) != training.get(key):
            what = names.get(key, f"flow_timesteps.{key}")
            diffs.append(f"{what}: cache {cached.get(key, 'unused')!r}, training {training.get(key, 'unused')!r}")
    return "the cached reference errors were drawn at other timesteps than training draws (" + "; ".join(diffs) + ")"


ReferenceMode = Literal["auto", "cached", "adapters_off", "frozen_copy", "none"]


@contextlib.contextmanager
def adapters_disabled(denoiser: torch.nn.Module):
    """The LoRA reference: the very same network with its adapters switched off."""
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()


@contextlib.contextmanager
def checkpointing_paused(module: torch.nn.Module):
    """Gradient checkpointing off for a forward whose graph must stay valid after the context: a checkpointed
    block would recompute itself in the backward, when the adapters are on again."""
    paused = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in paused:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in paused:
            m.gradient_checkpointing = True


def frozen_copy(denoiser: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A frozen (requires_grad False, eval) deep copy of `denoiser` on its device, its floating-point parameters and
    buffers in `dtype` (None: as they are).

    The cast tensors go into deepcopy's memo, so no full-precision copy exists even for a moment: copying an fp32
    SDXL U-Net first and casting it after would need 10 GB more device memory at startup than the 5 GB bf16 copy.
    """
    memo: dict[int, Any] = {}
    if dtype is not None:
        for tensor in itertools.chain(denoiser.parameters(), denoiser.buffers()):
            if tensor.is_floating_point() and tensor.dtype != dtype and id(tensor) not in memo:
                cast = tensor.detach().to(dtype)
                memo[id(tensor)] = torch.nn.Parameter(cast, requires_grad=False) \
                    if isinstance(tensor, torch.nn.Parameter) else cast
    return copy.deepcopy(denoiser, memo).requires_grad_(False).eval()


class ReferenceModel:
    """Where e_ref comes from: the cache, the policy with adapters off (LoRA), or a frozen copy (full FT).

    The frozen copy may run in another dtype than the policy (train.reference_dtype: bf16 on GPUs by default, half
    the memory of an fp32 copy): `predict` then casts its inputs to the copy's dtype and its prediction back.
    """

    def __init__(self, mode: str, denoiser: torch.nn.Module, dtype: torch.dtype | None = None):
        self.mode = mode
        self.frozen = None
        if mode == "frozen_copy":
            # On the device, never offloaded: a CPU reference would make every step wait on PCIe.
            self.frozen = frozen_copy(denoiser, dtype)

    @property
    def dtype(self) -> torch.dtype | None:
        """The frozen copy's dtype (None: no frozen copy)."""
        return next(self.frozen.parameters()).dtype if self.frozen is not None else None

    @torch.no_grad()
    def predict(self, bundle, noisy, t, cond, autocast) -> torch.Tensor:
        with autocast:
            if self.mode == "adapters_off":
                with adapters_disabled(bundle.denoiser):
                    return bundle.denoise(noisy, t, cond)
            if self.mode == "frozen_copy":
                reference = with_denoiser(bundle, self.frozen)
                dtype = self.dtype
                if dtype == bundle.dtype:  # the policy's inputs, as the policy gets them
                    return reference.denoise(noisy, t, cond)
                # a copy kept in another dtype (train.reference_dtype): its inputs in its dtype, the prediction back
                # in the latents' (float32), with or without autocast
                cond = {key: value.to(dtype) if value.is_floating_point() else value for key, value in cond.items()}
                return reference.denoise(noisy.to(dtype), t, cond).to(noisy.dtype)
        raise RuntimeError(f"reference mode {self.mode!r} makes no predictions")

    def encoder_features(self, bundle, latents, t, cond, autocast) -> list[torch.Tensor]:
        """NCP's feature extractor: the encoder half of the frozen initial denoiser (adapters off / frozen copy).

        Runs with gradients enabled when the caller's are, so they reach `latents` (hence the policy); the
        encoder's own weights are frozen and get none.
        """
        if self.mode not in ("adapters_off", "frozen_copy"):
            raise RuntimeError(f"reference mode {self.mode!r} has no model to take encoder features from")
        module = bundle.denoiser if self.mode == "adapters_off" else self.frozen
        dtype = next(module.parameters()).dtype
        cond = {key: value.to(dtype) if value.is_floating_point() else value for key, value in cond.items()}
        with autocast, contextlib.ExitStack() as stack:
            if self.mode == "adapters_off":
                stack.enter_context(adapters_disabled(module))
                stack.enter_context(checkpointing_paused(module))
            return with_denoiser(bundle, module).encoder_features(latents.to(dtype), t, cond)


def with_denoiser(bundle, denoiser: torch.nn.Module):
    """The same bundle (shared components) running another denoiser module."""
    return bundle if denoiser is bundle.denoiser else dataclasses.replace(bundle, denoiser=denoiser, _pipeline=None)


@dataclass
class ReferencePlan:
    mode: str  # cached / adapters_off / frozen_copy / none
    dtype: torch.dtype | None  # the frozen copy's (None for the other modes)


def plan_reference(cfg, dataset, family: str, device: torch.device, rank: int = 0, world_size: int = 1,
                   stacklevel: int = 2) -> ReferencePlan:
    """The reference of a run of TrainConfig `cfg` on CachedDataset `dataset` (train.reference, resolved).

    auto: the cached e_ref when the cache can serve the whole run at the training's precision and flow timesteps,
    else live (adapters_off for LoRA, frozen_copy for full fine-tuning), with a warning saying why. An explicit
    `cached` the dataset cannot serve is a ConfigError, raised before any model loads."""
    checks = _CacheChecks(cfg, dataset, family, rank, world_size)
    mode = _reference_mode(cfg, dataset, checks, stacklevel + 1)
    dtype = frozen_copy_dtype(cfg, device, stacklevel + 1) if mode == "frozen_copy" else None
    return ReferencePlan(mode, dtype)


def _reference_mode(cfg, dataset, checks: _CacheChecks, stacklevel: int) -> str:
    if not cfg.objective.needs_reference:
        return "none"
    if cfg.reference != "auto":
        if cfg.reference == "cached":
            if dataset.e_ref is None:
                raise ConfigError(f"reference: 'cached' but {cfg.data.root} holds no reference errors "
                                  "(run `fastpref cache` with reference_errors.epochs > 0)")
            if too_short := checks.too_short():
                raise ConfigError(f"reference: cached, but {too_short}")
            if timesteps := checks.timesteps_mismatch():
                raise ConfigError(f"reference: cached, but {timesteps}; recache with the training's flow_timesteps "
                                  "and model, set flow_timesteps to the cache's, or use reference: auto (runs the "
                                  "reference live)")
            if mismatch := checks.precision_mismatch():
                warnings.warn(f"reference: cached, but {mismatch}; the margins start biased", stacklevel=stacklevel)
        return cfg.reference
    live = "adapters_off" if cfg.mode == "lora" else "frozen_copy"
    if dataset.e_ref is None or cfg.objective.feature_space == "ncp":
        return live
    if timesteps := checks.timesteps_mismatch():
        warnings.warn(f"{timesteps}: running the reference live ({live}) instead; cache the reference errors "
                      "with the training's flow_timesteps and model to skip it", stacklevel=stacklevel)
        return live
    mismatch = checks.precision_mismatch() or checks.too_short()
    if mismatch:
        warnings.warn(f"{mismatch}: running the reference live ({live}) instead; cache the reference errors "
                      "with the training precision to skip it", stacklevel=stacklevel)
        return live
    return "cached"


def frozen_copy_dtype(cfg, device: torch.device, stacklevel: int = 2) -> torch.dtype:
    """The frozen copy's dtype (reference_dtype); warns when it does not round as the policy does."""
    weights = DTYPES[cfg.model.dtype]
    dtype = resolve_reference_dtype(cfg.reference_dtype, device, weights, cfg.speed.mixed_precision)
    if gap := reference_precision_gap(dtype, weights, cfg.speed.mixed_precision):
        warnings.warn(f"reference_dtype: {cfg.reference_dtype}: {gap}; at step 0 their errors differ by rounding, "
                      "which beta magnifies into a biased margin. Set reference_dtype to the training precision "
                      "to start unbiased (an fp32 copy takes twice the memory of a bf16 one)", stacklevel=stacklevel)
    return dtype


class _CacheChecks:
    """Why a dataset's cached e_ref could not serve a run (each check: None when it can)."""

    def __init__(self, cfg, dataset, family: str, rank: int, world_size: int):
        self.cfg, self.dataset, self.family, self.rank, self.world_size = cfg, dataset, family, rank, world_size

    def too_short(self) -> str | None:
        """Why the cached e_ref would run out before max_steps."""
        cfg = self.cfg
        per_epoch = len(self.dataset.stream(cfg.data.batch_groups, seed=cfg.seed, rank=self.rank,
                                            world_size=self.world_size))
        epochs = math.ceil(cfg.max_steps * cfg.grad_accumulation / max(per_epoch, 1))
        if epochs > self.dataset.reference_epochs:
            return (f"the cache holds reference errors for {self.dataset.reference_epochs} epochs and training "
                    f"needs {epochs} (max_steps={cfg.max_steps} at {per_epoch} batches per epoch)")
        return None

    def timesteps_mismatch(self) -> str | None:
        """Why the cached e_ref was drawn at other timesteps than training draws. A flow cache whose manifest records
        no flow_timesteps_drawn counts as shift 1.0 with the default flow_timesteps."""
        cache_config = self.dataset.manifest.config
        gap = flow_timesteps_gap(cached_flow_timesteps(cache_config), training_flow_timesteps(self.cfg, self.family))
        if gap and "flow_timesteps_drawn" not in cache_config and cache_config.get("family") in FLOW_FAMILIES:
            gap += (" (the cache records no flow timesteps: it was made before they were recorded, or at the legacy "
                    "shift 1.0 / default flow_timesteps, and is read as that)")
        return gap

    def precision_mismatch(self) -> str | None:
        """Why the cached e_ref would not equal the live reference's: beta (2500 for SD) magnifies a precision gap
        between cache and training into a biased margin at step 0."""
        # the cache records how its e_ref were computed (weights dtype, autocast, input dtypes: fastpref/data/cache.py)
        from fastpref.data.cache import cached_reference_recipe, reference_recipe, reference_recipe_gap

        cfg = self.cfg
        training = reference_recipe(cfg.model.dtype, cfg.speed.mixed_precision, cfg.speed.fp8)
        return reference_recipe_gap(cached_reference_recipe(self.dataset.manifest.config), training)


def training_flow_timesteps(cfg, family: str) -> dict | None:
    """The flow_timestep_record training will draw with (None: not a flow family), known before the model loads:
    the shift from cfg.model.path's scheduler config, the sampling from cfg.flow_timesteps."""
    if family not in FLOW_FAMILIES:
        return None
    from fastpref.models import resolve_path

    shift = scheduler_timestep_shift(resolve_path(cfg.model.path))
    return flow_timestep_record(shift, cfg.flow_timesteps.sampling())
