"""Stable Diffusion 1.x / 2.x family (and toy-sd): CLIP text encoder + UNet2DConditionModel, eps or v.

    bundle = fastpref.models.sd.load("runwayml/stable-diffusion-v1-5", dtype=torch.float16, device="cuda")
    bundle = fastpref.models.sd.load("fastpref/toy/weights/toy-sd")

Components are loaded one by one from their subfolders (no safety checker); the prediction type
comes from the scheduler config (epsilon for SD1.5, v_prediction for SD2.x-768).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastpref.models.bundle import (
    Conditioning,
    ModelBundle,
    clip_text_config,
    ddpm_scheduler_config,
    load_component,
    load_schedulers,
    prediction_type_of,
    toy_vae_config,
    unet_encoder_features,
)
from fastpref.utils.imports import require

FAMILY = "sd"


class SDBundle(ModelBundle):
    family = FAMILY

    def build_pipeline(self):
        diffusers = require("diffusers", "the SD pipeline")
        return diffusers.StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            tokenizer=self.tokenizers[0],
            unet=self.denoiser,
            scheduler=self.sample_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def encode_prompt(self, captions: list[str]) -> Conditioning:
        prompt_embeds, _ = self.pipeline.encode_prompt(
            list(captions), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": prompt_embeds}

    def denoise(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.denoiser(latents, t, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]

    def encoder_features(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
        return unet_encoder_features(self.denoiser, latents, t, cond["encoder_hidden_states"])


def load(path_or_hub_id: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> SDBundle:
    diffusers = require("diffusers", "loading an SD checkpoint")
    transformers = require("transformers", "loading an SD checkpoint")
    path = str(path_or_hub_id)
    noise_scheduler, sample_scheduler = load_schedulers(path)
    bundle = SDBundle(
        denoiser=load_component(diffusers.UNet2DConditionModel, path, "unet", dtype),
        vae=load_component(diffusers.AutoencoderKL, path, "vae", dtype),
        text_encoders=[load_component(transformers.CLIPTextModel, path, "text_encoder", dtype)],
        tokenizers=[load_component(transformers.CLIPTokenizer, path, "tokenizer", None)],
        noise_scheduler=noise_scheduler,
        sample_scheduler=sample_scheduler,
        prediction_type=prediction_type_of(noise_scheduler),
        source=path,
    )
    return bundle.to(device)


# --------------------------------------------------------------------------- toy / test builders


def tiny_config(size: str = "tiny", prediction_type: str = "epsilon") -> dict:
    """Architecture of a random SD-like model: 'tiny' for tests, 'toy' for the shipped toy-sd."""
    if size == "tiny":
        unet_channels, text_hidden, text_layers, heads = (16, 32), 16, 2, 2
    elif size == "toy":
        # the prototype's UNet (4.2M params), which reached 45% compliance in 20 CPU-minutes
        unet_channels, text_hidden, text_layers, heads = (64, 128), 64, 2, 4
    else:
        raise ValueError(f"unknown size {size!r} (expected 'toy' or 'tiny')")
    return {
        "size": size,
        "text_encoder": {"hidden": text_hidden, "layers": text_layers, "heads": 2},
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=unet_channels,
            layers_per_block=1,
            cross_attention_dim=text_hidden,
            attention_head_dim=heads,
            norm_num_groups=min(32, unet_channels[0]),
        ),
        "vae": toy_vae_config(size),
        "scheduler": ddpm_scheduler_config(prediction_type),
    }


def build_random(config: dict, tokenizer, vae: torch.nn.Module | None = None, seed: int = 0) -> SDBundle:
    """A randomly initialised SD-family bundle (DDIM sampling, DDPM training) around `tokenizer`."""
    diffusers = require("diffusers", "building a random SD model")
    transformers = require("transformers", "building a random SD model")
    torch.manual_seed(seed)
    text = config["text_encoder"]
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(**clip_text_config(tokenizer, text["hidden"], text["layers"], text["heads"]))
    )
    sample_scheduler = diffusers.DDIMScheduler(**config["scheduler"])
    return SDBundle(
        denoiser=diffusers.UNet2DConditionModel(**config["unet"]),
        vae=vae if vae is not None else diffusers.AutoencoderKL(**config["vae"]),
        text_encoders=[text_encoder],
        tokenizers=[tokenizer],
        noise_scheduler=diffusers.DDPMScheduler.from_config(sample_scheduler.config),
        sample_scheduler=sample_scheduler,
        prediction_type=config["scheduler"]["prediction_type"],
    )
