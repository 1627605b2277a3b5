"""Training timesteps of the flow-matching (SD3) bundles: the scheduler's static shift, the density of the training
sigmas (FlowTimestepSampling, as diffusers' SD3 training scripts draw them), the `flow_timesteps` config section and
the record a cache manifest keeps of them. Re-exported by fastpref.models.bundle."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fastpref.config import ConfigError
from fastpref.utils.imports import require

FLOW_WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform")
FLOW_FAMILIES = ("sd3",)  # the families whose bundles are flow-matching (prediction_type "flow")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's static shift: shift * s / (1 + (shift - 1) * s); the identity (the very
    same tensor) at shift 1."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


@dataclass(frozen=True)
class FlowTimestepSampling:
    """How flow-matching (SD3) bundles draw training sigmas: diffusers' SD3 training scripts
    (examples/dreambooth/train_dreambooth_sd3.py), made continuous.

    diffusers draws u = compute_density_for_timestep_sampling(weighting_scheme, logit_mean, logit_std, mode_scale)
    in [0, 1] and trains at timesteps[(u * T).long()] / sigmas[...] of the training FlowMatchEulerDiscreteScheduler,
    whose grid descends from sigma 1 and is shifted: sigma = shift(1 - floor(u T) / T). Here
    sigma = shift(1 - u) without the floor (`ModelBundle.flow_sigmas_of_u`), so t = sigma * T is a float; the two
    agree exactly where u T is an integer and within `shift` timesteps (1 at shift 1) elsewhere. At u = 0.5 and
    shift 3 (SD3-Medium): sigma = 0.75, t = 750.

    As in diffusers, the sign of logit_mean is the opposite of the SD3 paper's m: a positive logit_mean makes
    u larger, i.e. sigma *smaller* (cleaner inputs). logit_normal draws the unshifted sigma as
    sigmoid(logit_std * w - logit_mean), w ~ N(0, 1), which is 1 - u for u ~ sigmoid(N(logit_mean, logit_std)) and,
    at the defaults, bit for bit sigmoid(w): the sampling every flow bundle used before the shift was applied.

    Configs set it with the `flow_timesteps` section of the cache and train configs (FlowTimestepsConfig).
    """

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29  # diffusers' scripts' default for weighting_scheme "mode"

    def __post_init__(self):
        if self.weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme {self.weighting_scheme!r} is not one of {FLOW_WEIGHTING_SCHEMES}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")

    def unshifted_sigmas(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch_size,) float32 sigmas in [0, 1] before the scheduler's shift, on the CPU."""
        if self.weighting_scheme == "logit_normal":
            w = torch.randn(batch_size, generator=generator)
            return torch.sigmoid(self.logit_std * w - self.logit_mean)
        r = torch.rand(batch_size, generator=generator)
        if self.weighting_scheme == "mode":
            u = 1 - r - self.mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
        else:
            u = r
        return 1.0 - u


# the parameters of FlowTimestepSampling each weighting scheme reads (the others do not change its draws)
FLOW_SCHEME_PARAMETERS = {"logit_normal": ("logit_mean", "logit_std"), "mode": ("mode_scale",), "uniform": ()}


@dataclass
class FlowTimestepsConfig:
    """The `flow_timesteps` section of the cache and train configs: the FlowTimestepSampling of flow-matching
    (SD3) bundles, e.g. `flow_timesteps: {weighting: logit_normal, logit_mean: 0.0, logit_std: 1.0}`.

    The cache (its reference errors) and the trainer must use the same section, or `reference: auto` runs the
    reference live and `reference: cached` is refused. Parameters the chosen weighting does not read must stay at
    their defaults, and families without flow matching (sd, sdxl: uniform DDPM steps) refuse a non-default section
    (`check_family`). The shift is not set here: it is the model's (its scheduler config's `shift`).
    """

    weighting: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    logit_mean: float = 0.0  # logit_normal: diffusers' sign (positive: smaller sigmas, cleaner inputs)
    logit_std: float = 1.0  # logit_normal; > 0
    mode_scale: float = 1.29  # mode

    def validate(self) -> None:
        for name in ("logit_mean", "logit_std", "mode_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name}: must be a finite number, got {getattr(self, name)}")
        if not self.logit_std > 0:
            raise ConfigError(f"logit_std: must be > 0, got {self.logit_std}")
        default = FlowTimestepsConfig()
        for scheme, names in FLOW_SCHEME_PARAMETERS.items():
            for name in names:
                if scheme != self.weighting and getattr(self, name) != getattr(default, name):
                    raise ConfigError(f"{name}: {getattr(self, name)} is read by weighting: {scheme} only, and this "
                                      f"section has weighting: {self.weighting} (allowed values of weighting: "
                                      f"{list(FLOW_WEIGHTING_SCHEMES)}); set weighting: {scheme} or leave {name} "
                                      f"at its default {getattr(default, name)}")

    def is_default(self) -> bool:
        return self == FlowTimestepsConfig()

    def sampling(self) -> FlowTimestepSampling:
        return FlowTimestepSampling(weighting_scheme=self.weighting, logit_mean=self.logit_mean,
                                    logit_std=self.logit_std, mode_scale=self.mode_scale)

    def check_family(self, family: str, key: str = "flow_timesteps") -> None:
        """ConfigError naming `key` when a non-default section is set for a family without flow matching."""
        if family not in FLOW_FAMILIES and not self.is_default():
            raise ConfigError(f"{key}: set to {dataclasses.asdict(self)}, but family {family!r} trains on uniform "
                              f"DDPM timesteps; the section is for the flow-matching families {list(FLOW_FAMILIES)} "
                              "only (remove it, or leave it at its defaults)")


def flow_timestep_record(shift: float, sampling: FlowTimestepSampling) -> dict[str, Any]:
    """What decides a flow bundle's timestep draws, as the cache manifest records it: the scheduler's shift, the
    weighting scheme and the parameters that scheme reads, e.g. {"shift": 3.0, "weighting": "logit_normal",
    "logit_mean": 0.0, "logit_std": 1.0}. Equal records draw the same t from the same generator."""
    record: dict[str, Any] = {"shift": float(shift), "weighting": sampling.weighting_scheme}
    for name in FLOW_SCHEME_PARAMETERS[sampling.weighting_scheme]:
        record[name] = float(getattr(sampling, name))
    return record


# The draws of every flow bundle before the shift and the sampling settings existed (and of toy-sd3, shift 1.0):
# what a flow cache without a record was computed at.
LEGACY_FLOW_TIMESTEPS = flow_timestep_record(1.0, FlowTimestepSampling())


def static_timestep_shift(scheduler_config, flow: bool) -> float:
    """The training grid's static shift for a scheduler config (a dict or a diffusers FrozenDict): its `shift` for
    flow schedulers, 1.0 for DDPM ones and under use_dynamic_shifting (diffusers leaves that grid unshifted)."""
    if not flow or scheduler_config.get("use_dynamic_shifting", False):
        return 1.0
    return float(scheduler_config.get("shift", 1.0))


def scheduler_timestep_shift(path: str | Path) -> float:
    """The ModelBundle.timestep_shift a model folder (or hub id) will load with, from its scheduler config alone
    (no weights read): lets the cache plan and the trainer's cached-reference checks know it before loading."""
    diffusers = require("diffusers", "reading a scheduler config")
    config = diffusers.DDPMScheduler.load_config(str(path), subfolder="scheduler")
    return static_timestep_shift(config, str(config.get("_class_name", "")).startswith("FlowMatch"))
