"""bench/step.py's architectures: the toy models, and SD1.5 / SDXL / SD3-Medium with random weights from
configs/models/*.json, optionally narrowed (--width-scale keeps depths, block types and head counts) and at
another resolution; each knows its latent shape and its analytic FLOPs (bench/flops.py)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

import flops as flop_count

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "models"
REAL_ARCHS = {"sd15": "sd15.json", "sdxl": "sdxl.json", "sd3": "sd3-medium.json"}
TOY_ARCHS = {"toy-sd": "sd", "toy-sdxl": "sdxl", "toy-sd3": "sd3"}


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
