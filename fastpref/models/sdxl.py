"""Stable Diffusion XL family (and toy-sdxl): two CLIP text encoders, pooled text + `text_time` ids.

    bundle = fastpref.models.sdxl.load("stabilityai/stable-diffusion-xl-base-1.0", dtype=torch.bfloat16)
    bundle = fastpref.models.sdxl.load("fastpref/toy/weights/toy-sdxl")

The conditioning holds what UNet2DConditionModel's `added_cond_kwargs` needs: `text_embeds` (the
pooled projection of text_encoder_2) and `time_ids` (original size, crop top-left, target size; encode_prompt
gives the uncropped full-resolution ids, as SDXL sampling does by default; a cache of imported images replaces them
by per-image ids from each image's recorded source size and crop, `image_time_ids`).
"""

from __future__ import annotations

import json
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

FAMILY = "sdxl"


class SDXLBundle(ModelBundle):
    family = FAMILY
    # SDXL's unconditional branch is all-zero embeddings (force_zeros_for_empty_prompt) in the
    # released model; the toy trains its caption dropout on the encoded empty caption instead
    force_zeros_for_empty_prompt: bool = True

    def build_pipeline(self):
        diffusers = require("diffusers", "the SDXL pipeline")
        return diffusers.StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            text_encoder_2=self.text_encoders[1],
            tokenizer=self.tokenizers[0],
            tokenizer_2=self.tokenizers[1],
            unet=self.denoiser,
            scheduler=self.sample_scheduler,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
        )

    @property
    def image_size(self) -> tuple[int, int]:
        side = self.denoiser.config.sample_size * self.pipeline.vae_scale_factor
        return side, side

    def time_ids(self, batch_size: int) -> torch.Tensor:
        size = self.image_size
        ids = self.pipeline._get_add_time_ids(
            size, (0, 0), size, dtype=self.dtype, text_encoder_projection_dim=self.text_encoders[1].config.projection_dim
        )
        return ids.to(self.device).repeat(batch_size, 1)

    def image_time_ids(self, original_sizes, crops_top_left, target_size: tuple[int, int]) -> torch.Tensor:
        """(N, 6) float32 time_ids of N images: (original height, width, crop top, left, target height, width), as
        diffusers' SDXL DPO script builds them per image from the source size and the crop (compute_time_ids)."""
        projection_dim = self.text_encoders[1].config.projection_dim
        rows = [self.pipeline._get_add_time_ids(tuple(int(v) for v in size), tuple(int(v) for v in crop),
                                                tuple(int(v) for v in target_size), dtype=torch.float32,
                                                text_encoder_projection_dim=projection_dim)
                for size, crop in zip(original_sizes, crops_top_left)]
        return torch.cat(rows) if rows else torch.zeros(0, TIME_ID_COUNT)

    def encode_prompt(self, captions: list[str]) -> Conditioning:
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            list(captions), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": prompt_embeds, "text_embeds": pooled, "time_ids": self.time_ids(len(captions))}

    def denoise(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.denoiser(
            latents,
            t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
            return_dict=False,
        )[0]

    def encoder_features(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
        return unet_encoder_features(self.denoiser, latents, t, cond["encoder_hidden_states"],
                                     {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]})


def load(path_or_hub_id: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> SDXLBundle:
    diffusers = require("diffusers", "loading an SDXL checkpoint")
    transformers = require("transformers", "loading an SDXL checkpoint")
    path = str(path_or_hub_id)
    noise_scheduler, sample_scheduler = load_schedulers(path)
    bundle = SDXLBundle(
        denoiser=load_component(diffusers.UNet2DConditionModel, path, "unet", dtype),
        vae=load_component(diffusers.AutoencoderKL, path, "vae", dtype),
        text_encoders=[
            load_component(transformers.CLIPTextModel, path, "text_encoder", dtype),
            load_component(transformers.CLIPTextModelWithProjection, path, "text_encoder_2", dtype),
        ],
        tokenizers=[
            load_component(transformers.CLIPTokenizer, path, "tokenizer", None),
            load_component(transformers.CLIPTokenizer, path, "tokenizer_2", None),
        ],
        noise_scheduler=noise_scheduler,
        sample_scheduler=sample_scheduler,
        prediction_type=prediction_type_of(noise_scheduler),
        source=path,
    )
    index = Path(path) / "model_index.json"
    if index.exists():
        bundle.force_zeros_for_empty_prompt = json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)
    return bundle.to(device)


# --------------------------------------------------------------------------- toy / test builders

# SDXL's six micro-conditioning ids, each embedded in this many sinusoidal features
TIME_ID_COUNT = 6


def tiny_config(size: str = "tiny", prediction_type: str = "epsilon") -> dict:
    """Architecture of a random SDXL-like model: 'tiny' for tests, 'toy' for the shipped toy-sdxl."""
    if size == "tiny":
        unet_channels, hidden_1, hidden_2, projection, time_dim, heads = (16, 32), 16, 16, 16, 4, 2
    elif size == "toy":
        unet_channels, hidden_1, hidden_2, projection, time_dim, heads = (64, 128), 32, 64, 64, 8, 4
    else:
        raise ValueError(f"unknown size {size!r} (expected 'toy' or 'tiny')")
    return {
        "size": size,
        "text_encoder": {"hidden": hidden_1, "layers": 2, "heads": 2},
        "text_encoder_2": {"hidden": hidden_2, "layers": 2, "heads": 2, "projection_dim": projection},
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=unet_channels,
            layers_per_block=1,
            transformer_layers_per_block=1,
            # SDXL concatenates both encoders' penultimate hidden states along features
            cross_attention_dim=hidden_1 + hidden_2,
            attention_head_dim=heads,
            norm_num_groups=min(32, unet_channels[0]),
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=TIME_ID_COUNT * time_dim + projection,
        ),
        "vae": toy_vae_config(size),
        "scheduler": ddpm_scheduler_config(prediction_type, timestep_spacing="trailing"),
    }


def build_random(config: dict, tokenizer, vae: torch.nn.Module | None = None, seed: int = 0) -> SDXLBundle:
    """A randomly initialised SDXL-family bundle; both encoders share the toy tokenizer."""
    diffusers = require("diffusers", "building a random SDXL model")
    transformers = require("transformers", "building a random SDXL model")
    torch.manual_seed(seed)
    first, second = config["text_encoder"], config["text_encoder_2"]
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(**clip_text_config(tokenizer, first["hidden"], first["layers"], first["heads"]))
    )
    text_encoder_2 = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(
            **clip_text_config(tokenizer, second["hidden"], second["layers"], second["heads"], second["projection_dim"])
        )
    )
    sample_scheduler = diffusers.EulerDiscreteScheduler(
        **{k: v for k, v in config["scheduler"].items() if k not in ("clip_sample", "set_alpha_to_one")}
    )
    bundle = SDXLBundle(
        denoiser=diffusers.UNet2DConditionModel(**config["unet"]),
        vae=vae if vae is not None else diffusers.AutoencoderKL(**config["vae"]),
        text_encoders=[text_encoder, text_encoder_2],
        tokenizers=[tokenizer, tokenizer],
        noise_scheduler=diffusers.DDPMScheduler.from_config(sample_scheduler.config),
        sample_scheduler=sample_scheduler,
        prediction_type=config["scheduler"]["prediction_type"],
    )
    bundle.force_zeros_for_empty_prompt = False
    return bundle
