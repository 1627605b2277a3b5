"""ModelBundle: what the trainer needs from a text-to-image diffusion model, whatever its family.

A bundle holds the diffusers/transformers components (denoiser, VAE, text encoders + tokenizers,
schedulers) and answers four questions the same way for every family:

    cond = bundle.encode_prompt(captions)       # dict of denoiser kwargs, batch-first tensors
    noisy = bundle.add_noise(latents, noise, t)  # forward process at timesteps t
    pred = bundle.denoise(noisy, t, cond)        # the denoiser's raw prediction
    goal = bundle.target(latents, noise, t)      # what pred is trained towards (eps / v / velocity)

Timesteps `t` are always in the denoiser's own units, 0..num_train_timesteps: integer DDPM steps
for epsilon / v-prediction, sigma * num_train_timesteps (float) for flow matching, exactly what the
diffusers pipelines feed the denoiser. Flow models draw their training sigmas as diffusers' SD3
training scripts do, through the scheduler's `shift` (SD3-Medium: 3.0; see FlowTimestepSampling).
Prompt encoding reuses the family's diffusers pipeline (`encode_prompt`) so that training sees the
embeddings sampling will see. A family subclass (sd.py,
sdxl.py, sd3.py) says how to build its pipeline and how its denoiser takes the conditioning.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from fastpref.models.flow_timesteps import (FLOW_FAMILIES, FLOW_SCHEME_PARAMETERS,  # noqa: F401 (re-exported)
                                            FLOW_WEIGHTING_SCHEMES, LEGACY_FLOW_TIMESTEPS, FlowTimestepSampling,
                                            FlowTimestepsConfig, flow_timestep_record, scheduler_timestep_shift,
                                            shift_sigmas, static_timestep_shift)
from fastpref.utils.imports import require

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
Conditioning = dict[str, torch.Tensor]
# what a flow model's per-sample error is measured on (ModelBundle.error_space_weight); auto = x0 for flow models
ERROR_SPACES = ("auto", "velocity", "x0", "eps")


@dataclass(eq=False)
class ModelBundle:
    family: ClassVar[str] = ""

    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module | None]
    tokenizers: list[Any]
    noise_scheduler: Any  # the training scheduler: DDPMScheduler or FlowMatchEulerDiscreteScheduler
    sample_scheduler: Any  # the pipeline's scheduler (DDIM, Euler, flow Euler, ...)
    prediction_type: str
    source: str | None = None  # path or hub id it was loaded from
    _pipeline: Any = field(default=None, repr=False)
    # flow models only: the density of the training sigmas (the shift comes from the noise scheduler's config)
    flow_timestep_sampling: FlowTimestepSampling = field(default_factory=FlowTimestepSampling)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")

    # ------------------------------------------------------------------ family hooks
    def build_pipeline(self):
        """The family's diffusers pipeline around these very modules (no copies)."""
        raise NotImplementedError

    def encode_prompt(self, captions: list[str]) -> Conditioning:
        raise NotImplementedError

    def denoise(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    def encoder_features(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
        """The hidden states of the denoiser's encoder half, outermost first (see `unet_encoder_features`):
        what NCP (fastpref/train/ncp.py) measures its errors in. U-Net families only."""
        raise NotImplementedError(
            f"the {self.family or type(self).__name__} family's denoiser ({type(self.denoiser).__name__}) has no "
            "U-Net encoder half to take features from"
        )

    # ------------------------------------------------------------------ shared
    @property
    def pipeline(self):
        if self._pipeline is None:
            self._pipeline = self.build_pipeline()
        return self._pipeline

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    @property
    def uses_shift_factor(self) -> bool:
        # SD3's pipeline subtracts vae.config.shift_factor before scaling; SD / SDXL pipelines do not
        return False

    def text_modules(self) -> list[torch.nn.Module]:
        return [encoder for encoder in self.text_encoders if encoder is not None]

    @property
    def timestep_shift(self) -> float:
        """The flow scheduler's static shift (1.0 for DDPM schedulers and for use_dynamic_shifting, whose training
        grid diffusers leaves unshifted)."""
        return static_timestep_shift(self.noise_scheduler.config, self.prediction_type == "flow")

    @property
    def flow_timestep_record(self) -> dict[str, Any] | None:
        """flow_timestep_record(timestep_shift, flow_timestep_sampling) for flow bundles; None for DDPM ones."""
        if self.prediction_type != "flow":
            return None
        return flow_timestep_record(self.timestep_shift, self.flow_timestep_sampling)

    def with_flow_timesteps(self, sampling: FlowTimestepSampling) -> "ModelBundle":
        """A shallow copy (the same modules) drawing flow training timesteps with `sampling`; self for DDPM
        bundles, whose draws it would not change."""
        if self.prediction_type != "flow" or sampling == self.flow_timestep_sampling:
            return self
        bundle = copy.copy(self)
        bundle.flow_timestep_sampling = sampling
        return bundle

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps: uniform integers (DDPM); for flow models shifted sigmas * T with sigmas drawn as
        diffusers' SD3 scripts draw them (flow_timestep_sampling, default logit-normal(0, 1); see
        FlowTimestepSampling). add_noise recovers sigma as t / T."""
        if self.prediction_type == "flow":
            sigmas = shift_sigmas(self.flow_timestep_sampling.unshifted_sigmas(batch_size, generator),
                                  self.timestep_shift)
            return (sigmas * self.num_train_timesteps).to(self.device)
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator).to(self.device)

    def flow_sigmas_of_u(self, u: torch.Tensor) -> torch.Tensor:
        """The sigma diffusers' SD3 scripts train at for a density draw u in [0, 1] (compute_density_for_timestep_
        sampling), without the grid's floor: shift(1 - u). The timestep is this * num_train_timesteps."""
        return shift_sigmas(1.0 - u, self.timestep_shift)

    def _flow_sigmas(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sigmas = t.to(torch.float32) / self.num_train_timesteps
        return sigmas.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "flow":
            sigmas = self._flow_sigmas(t, latents)
            return (1.0 - sigmas) * latents + sigmas * noise
        return self.noise_scheduler.add_noise(latents, noise, t.long())

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, t.long())
        # rectified flow: x_t = (1 - s) x0 + s eps, so dx_t/ds = eps - x0 (what SD3 predicts)
        return noise - latents

    def error_space_weight(self, t: torch.Tensor, error_space: str = "auto") -> torch.Tensor | None:
        """The per-sample weight that turns the error against `target` into the error in `error_space` (None: 1).

        Flow models predict the velocity v = eps - x0 at x_t = (1 - s) x0 + s eps (s = t / T). The x0 a prediction
        v' implies is x_t - s v', the eps is x_t + (1 - s) v', so per sample
            x0 error = s^2 * velocity error,   eps error = (1 - s)^2 * velocity error    (exactly).
        "auto" is "x0": diffusers' SD3 training scripts (examples/dreambooth/train_dreambooth_sd3.py and
        train_dreambooth_lora_sd3.py, `--precondition_outputs` default 1) train the preconditioned output
        model_pred * (-sigmas) + noisy_model_input against the latents (their loss weighting is 1 under logit_normal). eps / v-prediction models have one error space, their target's: "auto" only.
        """
        if error_space not in ERROR_SPACES:
            raise ValueError(f"error_space {error_space!r} is not one of {ERROR_SPACES}")
        if self.prediction_type != "flow":
            if error_space != "auto":
                raise ValueError(f"error_space {error_space!r} is for flow-matching models; this "
                                 f"{self.family or 'model'} predicts {self.prediction_type} (leave error_space: auto)")
            return None
        space = "x0" if error_space == "auto" else error_space
        if space == "velocity":
            return None
        sigmas = t.to(torch.float32) / self.num_train_timesteps
        return sigmas.square() if space == "x0" else (1.0 - sigmas).square()

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
                      vae: torch.nn.Module | None = None) -> torch.Tensor:
        """Pixels in [-1, 1], (B, 3, H, W) -> the scaled latents the denoiser works on (with `vae` instead of the
        bundle's when given: the cache's fp32 upcast or a recipe's VAE override)."""
        vae = vae if vae is not None else self.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=generator)
        if self.uses_shift_factor:
            latents = latents - vae.config.shift_factor
        return latents * vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of encode_images (up to the VAE's reconstruction error): pixels in about [-1, 1]."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        if self.uses_shift_factor:
            latents = latents + self.vae.config.shift_factor
        return self.vae.decode(latents).sample

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ModelBundle":
        moves = {key: value for key, value in (("device", device), ("dtype", dtype)) if value is not None}
        for module in [self.denoiser, self.vae, *self.text_modules()]:
            module.to(**moves)
        return self

    def save_pretrained(self, out_dir: str | Path, **kwargs) -> None:
        """A complete diffusers pipeline folder (loads with the family's pipeline class and load())."""
        self.pipeline.save_pretrained(str(out_dir), **kwargs)


# ------------------------------------------------------------------------------ U-Net encoder features


def unet_encoder_features(
    unet: torch.nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """[conv_in output, output of each down block, mid-block output] of a diffusers UNet2DConditionModel.

    Exactly the first half of `UNet2DConditionModel.forward` (time / added embeddings, conv_in, the down blocks
    with their cross-attention, the mid block) without the up blocks: the "encoder" of Noise-Conditioned
    Perception. A down block's output is the (downsampled) hidden state it hands to the next block, not its skip
    connections. Differentiable with respect to `sample`; attention masks, ControlNet / T2I residuals and GLIGEN
    are not supported (the trainer uses none of them).
    """
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    class_emb = unet.get_class_embed(sample=sample, class_labels=None)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    if unet.config.addition_embed_type == "image_hint":
        raise NotImplementedError("unet_encoder_features: addition_embed_type 'image_hint' is not supported")
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs or {})
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}
    )
    hidden = unet.conv_in(sample)
    features = [hidden]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, _ = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, _ = block(hidden_states=hidden, temb=emb)
        features.append(hidden)
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            hidden = unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden = unet.mid_block(hidden, emb)
        features.append(hidden)
    return features


# ------------------------------------------------------------------------------ loading helpers


def load_component(cls, path: str | Path, subfolder: str, dtype: torch.dtype | None):
    """cls.from_pretrained(path, subfolder=...) with an error that names the path and subfolder."""
    kwargs = {"subfolder": subfolder}
    if dtype is not None:
        # transformers >= 5 calls it `dtype`; diffusers (and older transformers) `torch_dtype`
        kwargs["dtype" if cls.__module__.startswith("transformers") else "torch_dtype"] = dtype
    local = Path(path)
    if local.exists() and not (local / subfolder).is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} has no {subfolder!r} subfolder (needed for {cls.__name__})")
    try:
        return cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as err:
        raise type(err)(f"could not load {cls.__name__} from {str(path)!r}, subfolder {subfolder!r}: {err}") from err


def load_vae(path: str | Path, dtype: torch.dtype | None = None):
    """An AutoencoderKL from a VAE folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix: config at its root), or from
    the vae/ subfolder of a pipeline folder; errors name the path."""
    diffusers = require("diffusers", "loading a VAE")
    local = Path(path)
    subfolder = "vae" if local.exists() and (local / "vae").is_dir() and not (local / "config.json").exists() else ""
    if local.exists() and not subfolder and not (local / "config.json").exists():
        raise FileNotFoundError(f"vae: {str(path)!r} holds neither a VAE (config.json) nor a vae/ subfolder")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        return diffusers.AutoencoderKL.from_pretrained(str(path), subfolder=subfolder or None, **kwargs)
    except (OSError, ValueError) as err:
        raise type(err)(f"vae: could not load an AutoencoderKL from {str(path)!r}: {err}") from err


def has_subfolder(path: str | Path, subfolder: str) -> bool:
    """True when a local model folder (or its model_index.json entry) has this component."""
    local = Path(path)
    if local.exists():
        index = local / "model_index.json"
        if index.exists():
            import json

            entry = json.loads(index.read_text()).get(subfolder)
            if entry is not None and entry != [None, None]:
                return (local / subfolder).is_dir()
            return False
        return (local / subfolder).is_dir()
    # a hub id: trust the standard layout; a missing component then fails loudly in load_component
    return True


def load_schedulers(path: str | Path, sample_cls_name: str | None = None):
    """(training scheduler, sampling scheduler) from the folder's scheduler/ config.

    The sampling scheduler is whatever the checkpoint ships (e.g. PNDM for SD1.5) unless
    sample_cls_name overrides it; the training scheduler is DDPM (or flow Euler for flow models)
    built from the same config, so betas / shift agree.
    """
    diffusers = require("diffusers", "loading schedulers")
    config_dict = diffusers.DDPMScheduler.load_config(str(path), subfolder="scheduler")
    cls_name = sample_cls_name or config_dict.get("_class_name")
    sample_cls = getattr(diffusers, cls_name, None)
    if sample_cls is None:
        raise ValueError(f"{str(path)!r}: scheduler class {cls_name!r} is not in diffusers")
    sample_scheduler = sample_cls.from_config(config_dict)
    if cls_name.startswith("FlowMatch"):
        noise_scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config_dict)
    else:
        noise_scheduler = diffusers.DDPMScheduler.from_config(config_dict)
    return noise_scheduler, sample_scheduler


# settings a pipeline folder carries for fastpref, next to model_index.json
FASTPREF_METADATA = "fastpref.json"


def _fastpref_metadata(path: str | Path) -> dict:
    import json

    metadata = Path(path) / FASTPREF_METADATA
    if not metadata.exists():
        return {}
    try:
        data = json.loads(metadata.read_text())
        return {key: dict(data.get(key, {})) for key in ("pipeline_load_kwargs", "pipeline_call_kwargs")}
    except (ValueError, TypeError) as err:
        raise ValueError(f"{str(metadata)!r} is not valid fastpref metadata: {err}") from err


def pipeline_call_kwargs(path: str | Path) -> dict:
    """Keyword arguments a saved pipeline must be called with to sample as it was trained
    (e.g. toy-sd3: max_sequence_length=0); {} for folders without fastpref.json and hub ids."""
    return _fastpref_metadata(path).get("pipeline_call_kwargs", {})


def pipeline_load_kwargs(path: str | Path) -> dict:
    """Keyword arguments DiffusionPipeline.from_pretrained needs for this folder (e.g. an SD3
    pipeline without T5 must be given text_encoder_3=None, tokenizer_3=None)."""
    return _fastpref_metadata(path).get("pipeline_load_kwargs", {})


def write_pipeline_metadata(path: str | Path, load_kwargs: dict, call_kwargs: dict) -> None:
    import json

    metadata = {"pipeline_load_kwargs": load_kwargs, "pipeline_call_kwargs": call_kwargs}
    (Path(path) / FASTPREF_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")


def load_pipeline(path: str | Path, **kwargs):
    """diffusers.DiffusionPipeline.from_pretrained with the folder's fastpref load kwargs applied."""
    diffusers = require("diffusers", "loading a diffusers pipeline")
    return diffusers.DiffusionPipeline.from_pretrained(str(path), **{**pipeline_load_kwargs(path), **kwargs})


def prediction_type_of(noise_scheduler) -> str:
    if type(noise_scheduler).__name__.startswith("FlowMatch"):
        return "flow"
    return noise_scheduler.config.prediction_type


# ------------------------------------------------------------------------ toy / test configurations


def ddpm_scheduler_config(prediction_type: str, **overrides) -> dict:
    """SD1.5 / SDXL's scaled-linear DDPM schedule (the toy UNet families share it)."""
    return dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **overrides,
    )


def toy_vae_config(size: str = "toy") -> dict:
    """AutoencoderKL 32x32x3 -> 4x8x8 for the toy world: 'toy' is the shipped one, 'tiny' for tests."""
    if size == "tiny":
        channels, groups = (8, 16, 16), 8
    elif size == "toy":
        # wider at the 8x8 level than the prototype's (32, 64, 64): capacity is cheap there, and
        # the prototype's reconstructions lost corners
        channels, groups = (32, 64, 128), 32
    else:
        raise ValueError(f"unknown size {size!r} (expected 'toy' or 'tiny')")
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=32,
    )


def clip_text_config(tokenizer, hidden: int, layers: int, heads: int, projection_dim: int | None = None) -> dict:
    """A CLIPTextConfig dict sized for the toy, with the tokenizer's special-token ids.

    eos_token_id must be the tokenizer's: CLIPTextModel pools the hidden state at the first eos
    (the legacy argmax rule applies only when eos_token_id == 2).
    """
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    if projection_dim is not None:
        config["projection_dim"] = projection_dim
    return config
