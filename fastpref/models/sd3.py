"""Stable Diffusion 3 family (and toy-sd3): MMDiT (SD3Transformer2DModel) trained by flow matching.

    bundle = fastpref.models.sd3.load("stabilityai/stable-diffusion-3-medium-diffusers", dtype=torch.bfloat16)
    bundle = fastpref.models.sd3.load("fastpref/toy/weights/toy-sd3")

Text conditioning: CLIP-L and CLIP-G (both with projection) penultimate states side by side, then
T5 tokens along the sequence; pooled = both CLIP projections. T5 is optional: without it the SD3
pipeline appends `max_sequence_length` all-zero tokens. The toy models are trained with none
(max_sequence_length 0: 256 constant tokens would cost 5x the compute of the 8x8 image), which is
recorded in the folder's fastpref.json with what diffusers needs to load a T5-less SD3 folder:

    pipe = fastpref.models.bundle.load_pipeline(folder)   # passes text_encoder_3=None, tokenizer_3=None
    pipe(prompt, **fastpref.models.bundle.pipeline_call_kwargs(folder))   # max_sequence_length=0
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastpref.models.bundle import (
    Conditioning,
    ModelBundle,
    clip_text_config,
    has_subfolder,
    load_component,
    load_schedulers,
    pipeline_call_kwargs,
    pipeline_load_kwargs,
    prediction_type_of,
    write_pipeline_metadata,
    toy_vae_config,
)
from fastpref.models.null_t5 import write_null_t5
from fastpref.utils.imports import require

FAMILY = "sd3"
# what StableDiffusion3Pipeline uses when the caller does not say
PIPELINE_DEFAULT_T5_LENGTH = 256


class SD3Bundle(ModelBundle):
    family = FAMILY
    max_sequence_length: int = PIPELINE_DEFAULT_T5_LENGTH

    @property
    def uses_shift_factor(self) -> bool:
        return True

    @property
    def pipeline_call_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def build_pipeline(self):
        diffusers = require("diffusers", "the SD3 pipeline")
        encoders = list(self.text_encoders) + [None] * (3 - len(self.text_encoders))
        tokenizers = list(self.tokenizers) + [None] * (3 - len(self.tokenizers))
        return diffusers.StableDiffusion3Pipeline(
            transformer=self.denoiser,
            scheduler=self.sample_scheduler,
            vae=self.vae,
            text_encoder=encoders[0],
            tokenizer=tokenizers[0],
            text_encoder_2=encoders[1],
            tokenizer_2=tokenizers[1],
            text_encoder_3=encoders[2],
            tokenizer_3=tokenizers[2],
        )

    def encode_prompt(self, captions: list[str]) -> Conditioning:
        captions = list(captions)
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=captions,
            prompt_2=captions,
            prompt_3=captions,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}

    def denoise(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.denoiser(
            hidden_states=latents,
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]

    def save_pretrained(self, out_dir: str | Path, **kwargs) -> None:
        super().save_pretrained(out_dir, **kwargs)
        missing = {name: None for name in ("text_encoder_3", "tokenizer_3") if getattr(self.pipeline, name) is None}
        write_pipeline_metadata(out_dir, missing, self.pipeline_call_kwargs)
        if "text_encoder_3" in missing:
            write_null_t5(out_dir)   # the plain DiffusionPipeline.from_pretrained(out_dir) then loads


def load(
    path_or_hub_id: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    with_t5: bool = True,
) -> SD3Bundle:
    """Load an SD3 checkpoint; with_t5=False (or a folder without text_encoder_3) skips T5."""
    diffusers = require("diffusers", "loading an SD3 checkpoint")
    transformers = require("transformers", "loading an SD3 checkpoint")
    path = str(path_or_hub_id)
    noise_scheduler, sample_scheduler = load_schedulers(path)
    text_encoders = [
        load_component(transformers.CLIPTextModelWithProjection, path, "text_encoder", dtype),
        load_component(transformers.CLIPTextModelWithProjection, path, "text_encoder_2", dtype),
    ]
    tokenizers = [
        load_component(transformers.CLIPTokenizer, path, "tokenizer", None),
        load_component(transformers.CLIPTokenizer, path, "tokenizer_2", None),
    ]
    # a folder whose fastpref.json loads text_encoder_3 as None ships at most the null T5 (models/null_t5.py)
    if with_t5 and has_subfolder(path, "text_encoder_3") and "text_encoder_3" not in pipeline_load_kwargs(path):
        text_encoders.append(load_component(transformers.T5EncoderModel, path, "text_encoder_3", dtype))
        tokenizers.append(load_component(transformers.T5TokenizerFast, path, "tokenizer_3", None))
    bundle = SD3Bundle(
        denoiser=load_component(diffusers.SD3Transformer2DModel, path, "transformer", dtype),
        vae=load_component(diffusers.AutoencoderKL, path, "vae", dtype),
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=noise_scheduler,
        sample_scheduler=sample_scheduler,
        prediction_type=prediction_type_of(noise_scheduler),
        source=path,
    )
    call_kwargs = pipeline_call_kwargs(path)
    if "max_sequence_length" in call_kwargs:
        bundle.max_sequence_length = int(call_kwargs["max_sequence_length"])
    return bundle.to(device)


# --------------------------------------------------------------------------- toy / test builders


def tiny_config(size: str = "tiny") -> dict:
    """Architecture of a random SD3-like model: 'tiny' for tests, 'toy' for the shipped toy-sd3."""
    if size == "tiny":
        hidden_l, hidden_g, projection, layers, head_dim, heads = 16, 16, 8, 2, 8, 2
    elif size == "toy":
        hidden_l, hidden_g, projection, layers, head_dim, heads = 32, 64, 32, 6, 32, 4
    else:
        raise ValueError(f"unknown size {size!r} (expected 'toy' or 'tiny')")
    inner = head_dim * heads
    return {
        "size": size,
        "max_sequence_length": 0,
        "text_encoder": {"hidden": hidden_l, "layers": 2, "heads": 2, "projection_dim": projection},
        "text_encoder_2": {"hidden": hidden_g, "layers": 2, "heads": 2, "projection_dim": projection},
        "transformer": dict(
            sample_size=8,
            # one latent pixel per token: 8x8 latents are too coarse for 2x2 patches
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            # the pipeline zero-pads the CLIP-L|G features up to the T5 width
            joint_attention_dim=hidden_l + hidden_g,
            caption_projection_dim=inner,
            pooled_projection_dim=2 * projection,
            pos_embed_max_size=8,
        ),
        "vae": toy_vae_config(size),
        "scheduler": dict(num_train_timesteps=1000, shift=1.0),
    }


def build_random(config: dict, tokenizer, vae: torch.nn.Module | None = None, seed: int = 0) -> SD3Bundle:
    """A randomly initialised SD3-family bundle (no T5) around the toy tokenizer."""
    diffusers = require("diffusers", "building a random SD3 model")
    transformers = require("transformers", "building a random SD3 model")
    torch.manual_seed(seed)
    encoders = []
    for key in ("text_encoder", "text_encoder_2"):
        spec = config[key]
        encoders.append(
            transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(
                    **clip_text_config(tokenizer, spec["hidden"], spec["layers"], spec["heads"], spec["projection_dim"])
                )
            )
        )
    if vae is None:
        vae = diffusers.AutoencoderKL(**config["vae"])
        vae.register_to_config(shift_factor=0.0)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config["scheduler"])
    bundle = SD3Bundle(
        denoiser=diffusers.SD3Transformer2DModel(**config["transformer"]),
        vae=vae,
        text_encoders=encoders,
        tokenizers=[tokenizer, tokenizer],
        noise_scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler.config),
        sample_scheduler=scheduler,
        prediction_type="flow",
    )
    bundle.max_sequence_length = config["max_sequence_length"]
    return bundle
