"""The step-aware preference model (SPM) of SPO: a CLIP-like reward that also reads the denoising timestep t.

SPO ("Step-aware Preference Optimization", CVPR 2025; code RockeyCoss/SPO, step_aware_preference_model/) scores
the *predicted clean image* of an intermediate denoising step, which is blurry at large t; a plain CLIP/PickScore
ranks such images poorly, so SPO conditions every vision layer on t, DiT-style (adaLN):

    temb = MLP(sinusoid_256(t))                                    (TimestepEmbedder; weights N(0, 0.02))
    per vision layer: shift, scale, gate = Linear(SiLU(temb))       (zero-initialised; gate bias 1)
        x = x + gate_msa * attn(LN1(x) * (1 + scale_msa) + shift_msa)
        x = x + gate_mlp * mlp(LN2(x) * (1 + scale_mlp) + shift_mlp)
    pooled = post_LN(cls) * (1 + scale) + shift                     (zero-initialised)
    score  = logit_scale * cos(image_embedding, text_embedding)

At initialisation the model is exactly its base (PickScore / CLIP-H, or the toy ShapeCLIP). Two bases:

- kind "clip": a transformers CLIPModel (PickScore_v1 in SPO), the modulations placed exactly as SPO's
  TimeConditionedCLIPEncoderLayer does, by forward hooks on the unmodified transformers modules (no copy of
  transformers' code, so a transformers upgrade does not silently desynchronise a subclass);
- kind "shapeclip": the toy world's ShapeCLIP (fastpref/toy/shapeclip.py), whose image tower is convolutional with
  no residual branches: every normalisation layer gets shift/scale, the activation after it the gate, and the
  input of the tower's last Linear (its pooled features) shift/scale. The layers are found by tracing
  `encode_images` once, so only ShapeCLIP's public API is used.

Saved as a folder: spm_config.json, base/ (the base model's own save_pretrained: ShapeCLIP or CLIPModel plus
tokenizer and image processor) and time_conditioning.safetensors (t embedder + modulations). The reward is
registered as "spm"; `build_reward("spm", world=...)` loads the toy SPM shipped for that world
(fastpref/toy/weights/spm, spm-v2), and `build_reward("spm", folder)` any saved one. Scores take `timesteps=`
(the diffusion model's units, 0..999; default 0: a clean image). Trained by `fastpref spm train`
(fastpref/rewards/spm_train.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastpref.rewards.base import ImageBatch, Reward, register_reward, to_pixels
from fastpref.utils.imports import require

SHIPPED_TOY_SPM = Path(__file__).resolve().parent.parent / "toy" / "weights" / "spm"
# per toy world: each SPM reads its world's captions (ShapeCLIP's vocabulary) and ranks its toy-sd's x0 predictions
SHIPPED_TOY_SPM_BY_WORLD = {"v1": SHIPPED_TOY_SPM, "v2": SHIPPED_TOY_SPM.with_name("spm-v2")}
CONFIG_FILE = "spm_config.json"
TIME_WEIGHTS_FILE = "time_conditioning.safetensors"
KINDS = ("shapeclip", "clip")
FREQUENCY_EMBEDDING_SIZE = 256  # SPO's TimestepEmbedder default (DiT's)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t (max period 10000, cos then sin, as GLIDE / DiT / SPO) through a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        return self.mlp(self.sinusoid(t, self.frequency_embedding_size).to(weight.dtype))


def adaln(hidden: int, width: int, chunks: int, gates: Sequence[int] = ()) -> nn.Sequential:
    """SiLU -> Linear(hidden, chunks * width), zero weights; bias 0 except 1 on the `gates` chunks (identity)."""
    linear = nn.Linear(hidden, chunks * width)
    nn.init.zeros_(linear.weight)
    with torch.no_grad():
        linear.bias.zero_()
        for chunk in gates:
            linear.bias[chunk * width : (chunk + 1) * width] = 1.0
    return nn.Sequential(nn.SiLU(), linear)


def _along_channels(values: torch.Tensor, like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(B, C) -> broadcastable against `like` whose channels sit at `channel_dim`."""
    shape = [1] * like.ndim
    shape[0], shape[channel_dim] = values.shape[0], values.shape[1]
    return values.reshape(shape).to(like.dtype)


class StepAwareModel(nn.Module):
    """A base image-text model with SPO's timestep conditioning on its vision tower (see the module docstring)."""

    def __init__(self, base: nn.Module, kind: str, tokenizer=None, image_size: int | None = None,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                 frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"spm: kind {kind!r} is not one of {KINDS}")
        self.kind, self.base = kind, base
        self.tokenizer, self.image_size = tokenizer, image_size
        self.image_mean = tuple(image_mean) if image_mean is not None else None
        self.image_std = tuple(image_std) if image_std is not None else None
        self._modulation: list[torch.Tensor] | None = None  # per-forward chunks, read by the hooks
        self._hooks: list[Any] = []
        if kind == "clip":
            hidden = base.config.vision_config.hidden_size
            layers = list(base.vision_model.encoder.layers)
            self.t_embedder = TimestepEmbedder(hidden, frequency_embedding_size)
            # chunks per layer, SPO's order: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
            self.layer_modulations = nn.ModuleList(adaln(hidden, hidden, 6, gates=(2, 5)) for _ in layers)
            self.pooled_modulation = adaln(hidden, hidden, 2)
            for i, layer in enumerate(layers):
                self._hooks += [
                    layer.layer_norm1.register_forward_hook(self._shift_scale_hook(i, 0, 1, channel_dim=-1)),
                    layer.self_attn.register_forward_hook(self._gate_hook(i, 2, channel_dim=-1)),
                    layer.layer_norm2.register_forward_hook(self._shift_scale_hook(i, 3, 4, channel_dim=-1)),
                    layer.mlp.register_forward_hook(self._gate_hook(i, 5, channel_dim=-1)),
                ]
            self._hooks.append(base.vision_model.post_layernorm.register_forward_hook(
                self._shift_scale_hook(len(layers), 0, 1, channel_dim=-1)))
        else:
            norms, gated, pooled = self._trace_image_tower(base)
            widths = [norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.normalized_shape[0]
                      for norm in norms]
            hidden = max(widths)
            self.t_embedder = TimestepEmbedder(hidden, frequency_embedding_size)
            # chunks per layer: shift, scale, gate (of the activation that follows the norm)
            self.layer_modulations = nn.ModuleList(adaln(hidden, width, 3, gates=(2,)) for width in widths)
            self.pooled_modulation = adaln(hidden, pooled.in_features, 2)
            for i, (norm, activation) in enumerate(zip(norms, gated)):
                self._hooks.append(norm.register_forward_hook(self._shift_scale_hook(i, 0, 1, channel_dim=1)))
                if activation is not None:
                    self._hooks.append(activation.register_forward_hook(self._gate_hook(i, 2, channel_dim=1)))
            self._hooks.append(pooled.register_forward_pre_hook(self._pooled_pre_hook(len(norms))))

    # -- hooks ------------------------------------------------------------------------------------

    @staticmethod
    def _trace_image_tower(base: nn.Module):
        """The normalisation layers `encode_images` runs (in call order), the module called right after each
        (its activation, gated) and the last Linear it calls (whose input is the pooled feature)."""
        calls: list[nn.Module] = []
        handles = [m.register_forward_hook(lambda module, args, out: calls.append(module)) for m in base.modules()
                   if m is not base and not list(m.children())]
        try:
            with torch.no_grad():
                size = getattr(base, "image_size", 32)
                base.encode_images(torch.zeros(1, 3, size, size, device=next(base.parameters()).device))
        finally:
            for handle in handles:
                handle.remove()
        norm_types = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
        norms = [m for m in calls if isinstance(m, norm_types)]
        gated = []
        for norm in norms:
            position = calls.index(norm)
            following = calls[position + 1] if position + 1 < len(calls) else None
            gated.append(following if following is not None and not list(following.parameters()) else None)
        linears = [m for m in calls if isinstance(m, nn.Linear)]
        if not norms or not linears:
            raise ValueError("spm: the base's image tower has no normalisation or Linear layer to condition on t")
        return norms, gated, linears[-1]

    def _chunk(self, index: int, chunk: int) -> torch.Tensor:
        if self._modulation is None:
            raise RuntimeError("spm: the vision tower ran without a timestep (call image_features(pixels, t))")
        return self._modulation[index][chunk]

    def _shift_scale_hook(self, index: int, shift: int, scale: int, channel_dim: int):
        def hook(module, args, output):
            if self._modulation is None:
                return output
            s = _along_channels(self._chunk(index, shift), output, channel_dim % output.ndim)
            c = _along_channels(self._chunk(index, scale), output, channel_dim % output.ndim)
            return output * (1 + c) + s
        return hook

    def _gate_hook(self, index: int, gate: int, channel_dim: int):
        def hook(module, args, output):
            if self._modulation is None:
                return output
            first = output[0] if isinstance(output, tuple) else output
            gated = first * _along_channels(self._chunk(index, gate), first, channel_dim % first.ndim)
            return (gated, *output[1:]) if isinstance(output, tuple) else gated
        return hook

    def _pooled_pre_hook(self, index: int):
        def hook(module, args):
            if self._modulation is None:
                return None
            x = args[0]
            return (x * (1 + self._chunk(index, 1).to(x.dtype)) + self._chunk(index, 0).to(x.dtype), *args[1:])
        return hook

    # -- features ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _set_timesteps(self, t: torch.Tensor) -> None:
        temb = self.t_embedder(t)
        per_layer = 6 if self.kind == "clip" else 3
        self._modulation = [m(temb).chunk(per_layer, dim=1) for m in self.layer_modulations]
        self._modulation.append(self.pooled_modulation(temb).chunk(2, dim=1))

    def image_features(self, pixels: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] and (B,) timesteps -> unit (B, D) image embeddings at t."""
        t = torch.as_tensor(t, device=self.device).reshape(-1)
        if t.numel() == 1 and len(pixels) > 1:
            t = t.expand(len(pixels))
        if t.shape[0] != len(pixels):
            raise ValueError(f"spm: {len(pixels)} images but {t.shape[0]} timesteps")
        self._set_timesteps(t)
        try:
            pixels = pixels.to(self.device)
            if self.kind == "clip":
                from fastpref.rewards.pretrained import _features, clip_preprocess

                images = clip_preprocess(pixels, self.image_size, self.image_mean, self.image_std)
                features = _features(self.base.get_image_features(pixel_values=images))
                return F.normalize(features, dim=-1)
            return self.base.encode_images(pixels)
        finally:
            self._modulation = None

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts -> unit (B, D) text embeddings (the text tower is not conditioned on t)."""
        if self.kind == "clip":
            from fastpref.rewards.pretrained import _features

            tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
            return F.normalize(_features(self.base.get_text_features(**tokens)), dim=-1)
        return self.base.encode_text(list(prompts))

    def logit_scale(self) -> torch.Tensor:
        scale = self.base.logit_scale.exp()
        # ShapeCLIP clamps its temperature at 100 in its own forward (CLIP's practice); SPO's CLIP does not
        return scale.clamp(max=100.0) if self.kind == "shapeclip" else scale

    def forward(self, pixels: torch.Tensor, prompts: Sequence[str], t: torch.Tensor) -> torch.Tensor:
        """(B,) scores logit_scale * cos(image at t, prompt): SPO's get_preference_score."""
        return self.logit_scale() * (self.image_features(pixels, t) * self.text_features(prompts)).sum(-1)

    def time_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the base model does not have (t embedder and modulations)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    # -- construction, save, load -----------------------------------------------------------------

    @classmethod
    def from_base(cls, kind: str, source: str | Path | None = None, processor: str | Path | None = None,
                  device: str | torch.device = "cpu") -> "StepAwareModel":
        """A fresh SPM (exactly its base at every t) around a base model: kind "shapeclip" (source None: the
        shipped ShapeCLIP) or "clip" (a transformers CLIPModel folder / hub id, e.g. yuvalkirstain/PickScore_v1,
        with `processor` the tokenizer / image-processor source, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""
        if kind == "shapeclip":
            from fastpref.toy import shapeclip

            base = shapeclip.load_shipped() if source is None else shapeclip.ShapeCLIP.from_pretrained(str(source))
            return cls(base.to(device), kind).to(device)
        if kind == "clip":
            if source is None:
                raise ValueError("spm: kind 'clip' needs a CLIP checkpoint (e.g. yuvalkirstain/PickScore_v1)")
            transformers = require("transformers", "the step-aware preference model's CLIP base")
            processor = str(processor or source)
            try:
                base = transformers.CLIPModel.from_pretrained(str(source))
                tokenizer = transformers.AutoTokenizer.from_pretrained(processor)
                image_processor = transformers.AutoImageProcessor.from_pretrained(processor)
            except OSError as err:
                raise OSError(f"spm: cannot load the CLIP base / processor from {str(source)!r} / {processor!r} "
                              f"({err})") from err
            crop = image_processor.crop_size
            size = crop["height"] if isinstance(crop, dict) else crop.height
            model = cls(base, kind, tokenizer, size, image_processor.image_mean, image_processor.image_std)
            model._image_processor = image_processor
            return model.to(device)
        raise ValueError(f"spm: kind {kind!r} is not one of {KINDS}")

    def save_pretrained(self, out: str | Path, extra: dict | None = None) -> None:
        safetensors = require("safetensors.torch", "saving the step-aware preference model")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.base.save_pretrained(out / "base")
        if self.kind == "clip":
            self.tokenizer.save_pretrained(out / "base")
            processor = getattr(self, "_image_processor", None)
            if processor is not None:
                processor.save_pretrained(out / "base")
        state = {k: v.detach().cpu().contiguous() for k, v in self.time_state_dict().items()}
        safetensors.save_file(state, str(out / TIME_WEIGHTS_FILE))
        config = {"kind": self.kind, "frequency_embedding_size": self.t_embedder.frequency_embedding_size,
                  **(extra or {})}
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "StepAwareModel":
        path = Path(path)
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"spm: {path} has no {CONFIG_FILE} (not a saved step-aware preference model)")
        config = json.loads(config_file.read_text())
        kind = config.get("kind")
        if kind not in KINDS:
            raise ValueError(f"spm: {config_file}: kind {kind!r} is not one of {KINDS}")
        model = cls.from_base(kind, path / "base", path / "base" if kind == "clip" else None)
        weights = path / TIME_WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"spm: {weights} is missing")
        state = require("safetensors.torch", "loading the step-aware preference model").load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("base.")]
        if missing or unexpected:
            raise ValueError(f"spm: {weights}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        return model.to(device).eval()


def spo_checkpoint_key(key: str) -> str | None:
    """A key of SPO's released SPM state dict (StepAwarePreferenceModel around HFTimeConditionedCLIPModel,
    RockeyCoss/SPO spo_training_and_inference/spo/preference_models/models/) -> this module's key (None: skip)."""
    if not key.startswith("model."):
        return None
    key = key[len("model."):]
    if key.startswith("t_embedder."):
        return key
    prefix = "vision_model.encoder.layers."
    if key.startswith(prefix) and ".adaLN_modulation." in key:
        layer, rest = key[len(prefix):].split(".adaLN_modulation.", 1)
        return f"layer_modulations.{layer}.{rest}"
    if key.startswith("vision_model.adaLN_modulation."):
        return "pooled_modulation." + key[len("vision_model.adaLN_modulation."):]
    return "base." + key


def convert_spo_checkpoint(checkpoint: str | Path, base: str | Path, processor: str | Path | None,
                           out: str | Path) -> StepAwareModel:
    """SPO's released step-aware preference model (e.g. sd-v1-5_step-aware_preference_model.bin, a torch state dict
    of the whole model) -> a saved fastpref SPM folder; `base` / `processor`: the CLIP it was built on
    (yuvalkirstain/PickScore_v1, laion/CLIP-ViT-H-14-laion2B-s32B-b79K). Every weight of the model must be in the
    checkpoint (position-id buffers excepted)."""
    model = StepAwareModel.from_base("clip", base, processor)
    try:
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"spm convert: cannot read {checkpoint} as a torch state dict ({err})") from None
    mapped = {}
    for key, value in state.items():
        target = spo_checkpoint_key(key)
        if target is not None:
            mapped[target] = value
    own = model.state_dict()
    unknown = sorted(k for k in mapped if k not in own and not k.endswith("position_ids"))
    missing = sorted(k for k in own if k not in mapped and not k.endswith("position_ids"))
    if unknown or missing:
        raise ValueError(f"spm convert: {checkpoint} does not match the SPM around {base}: missing {missing[:5]}, "
                         f"unexpected {unknown[:5]}")
    model.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=False)
    model.save_pretrained(out, extra={"converted_from": str(checkpoint)})
    return model


@register_reward
class StepAwarePreferenceReward(Reward):
    """SPO's step-aware preference score, logit_scale * cos, of images (predicted x0) at diffusion timesteps."""

    name = "spm"
    differentiable = True

    def __init__(self, model: StepAwareModel):
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path | None = None, world: str = "v1",
                        **kwargs: Any) -> "StepAwarePreferenceReward":
        """None: the toy SPM shipped for `world` (fastpref/toy/weights/spm, spm-v2); else a folder saved by
        StepAwareModel (`world` then plays no part: the folder is the model)."""
        if path_or_hub_id is None:
            from fastpref.toy.world import get_world

            path = SHIPPED_TOY_SPM_BY_WORLD[get_world(world).name]
        else:
            path = Path(path_or_hub_id)
        return cls(StepAwareModel.from_pretrained(path), **kwargs)

    def to(self, device: str | torch.device) -> "StepAwarePreferenceReward":
        self.model.to(device)
        return self

    def score(self, pixels: torch.Tensor, prompts: list[str], timesteps: torch.Tensor | int = 0) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=self.model.device).reshape(-1)
        return self.model(pixels, prompts, t.expand(len(pixels)) if t.numel() == 1 else t).to(pixels.device)

    def __call__(self, images: ImageBatch, prompts: Sequence[str], batch_size: int | None = None,
                 timesteps: torch.Tensor | int = 0) -> torch.Tensor:
        """Reward.__call__ plus `timesteps`: an int or (B,) in the diffusion model's units (0: a clean image)."""
        pixels = to_pixels(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(pixels):
            raise ValueError(f"spm reward: {len(pixels)} images but {len(prompts)} prompts")
        t = torch.as_tensor(timesteps).reshape(-1)
        t = t.expand(len(pixels)) if t.numel() == 1 else t
        if t.shape[0] != len(pixels):
            raise ValueError(f"spm reward: {len(pixels)} images but {t.shape[0]} timesteps")
        step = batch_size or len(pixels) or 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            scores = [self.score(pixels[i : i + step], prompts[i : i + step], t[i : i + step])
                      for i in range(0, len(pixels), step)]
        return (torch.cat(scores) if scores else torch.zeros(0)).float()
