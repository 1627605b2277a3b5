"""OpenCLIP checkpoints (state dicts in open_clip's key format) -> transformers CLIPModel, with no open_clip import.

Covers the standard open_clip `CLIP` (ViT image tower, causal text transformer, `visual.proj` / `text_projection`
parameters, nn.MultiheadAttention blocks), i.e. ViT-B/L/H/g/bigG and fine-tunes of them such as HPSv2.1
(HPS_v2.1_compressed.pt, an OpenCLIP ViT-H-14). Key mapping, open_clip -> transformers:

    visual.conv1.weight                        vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                     vision_model.embeddings.class_embedding
    visual.positional_embedding                vision_model.embeddings.position_embedding.weight
    visual.ln_pre / visual.ln_post             vision_model.pre_layrnorm / vision_model.post_layernorm
    visual.proj (width, dim)                   visual_projection.weight (dim, width) = proj.T
    token_embedding.weight                     text_model.embeddings.token_embedding.weight
    positional_embedding                       text_model.embeddings.position_embedding.weight
    ln_final                                   text_model.final_layer_norm
    text_projection (width, dim)               text_projection.weight = text_projection.T
    logit_scale                                logit_scale
    {visual.}transformer.resblocks.{i}.        {vision,text}_model.encoder.layers.{i}.
        ln_1 / ln_2                                layer_norm1 / layer_norm2
        attn.in_proj_weight / in_proj_bias         self_attn.{q,k,v}_proj.weight / .bias (rows split in thirds, q k v)
        attn.out_proj                              self_attn.out_proj
        mlp.c_fc / mlp.c_proj                      mlp.fc1 / mlp.fc2

The CLIPConfig comes from the tensor shapes: widths, layer counts, MLP widths, patch size, image size
(sqrt(positions - 1) * patch), context length, vocabulary size, projection dim. Attention head counts do not show
in any shape: the vision tower gets width // head_width with open_clip's head widths (64, except 80 for width
1280 = ViT-H, 88 for 1408 = ViT-g, 104 for 1664 = ViT-bigG), the text tower width // 64 (open_clip's model
configs); pass vision_heads= / text_heads= for anything else. The activation is "gelu" (open_clip's nn.GELU);
pass hidden_act="quick_gelu" for OpenAI-trained towers. LayerNorm eps 1e-5 as in open_clip.

Text pooling: open_clip takes the features at argmax(token ids), i.e. at the end-of-text token because it has the
highest id in the OpenAI CLIP vocabulary. The converted config sets text eos_token_id to the tokenizer's eos id
(49407 for the OpenAI BPE), so transformers pools at the first eos token -- the same position, whatever the pad
token is (padding sits after eos and the text mask is causal, so padding never changes the pooled features).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from fastpref.utils.imports import require

# open_clip's vision head width by tower width, where it is not 64 (ViT-H-14, ViT-g-14, ViT-bigG-14 model configs)
VISION_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}
TEXT_HEAD_WIDTH = 64
# OpenAI CLIP BPE special tokens (open_clip's SimpleTokenizer): <|startoftext|>, <|endoftext|>; it pads with 0
OPENAI_BOS_ID, OPENAI_EOS_ID, OPENAI_PAD_ID = 49406, 49407, 0
# keys that may be in an open_clip state dict and carry no weights (the text tower's causal mask buffer)
IGNORED_KEYS = ("attn_mask",)

_BLOCK_PARTS = {  # open_clip resblock suffix -> transformers encoder-layer suffix (attn.in_proj_* handled apart)
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_VISION_PLAIN = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TEXT_PLAIN = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


class CheckpointKeyError(KeyError):
    """An open_clip checkpoint lacks a key the architecture needs, or holds one the converter does not know."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def unwrap_state_dict(state: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A plain {key: tensor} dict from what torch.load returned: unwraps {"state_dict": ...} / {"model": ...} and
    strips a "module." prefix (DDP) shared by all keys."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{source}: expected an open_clip state dict, got {type(state).__name__}")
    non_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if non_tensors:
        raise ValueError(f"{source}: entries that are not tensors: {', '.join(map(str, non_tensors[:5]))}")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def load_openclip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an open_clip checkpoint (.pt / .pth / .bin through torch.load(weights_only=True), or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip checkpoint {path}: not found")
    if path.suffix == ".safetensors":
        state = require("safetensors.torch", "loading an open_clip checkpoint").load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return unwrap_state_dict(state, source=str(path))


def _num_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def _need(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointKeyError(f"{source}: open_clip checkpoint is missing key {key!r}")
    return state[key]


def infer_openclip_config(
    state: dict[str, torch.Tensor],
    source: str = "checkpoint",
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "gelu",
    layer_norm_eps: float = 1e-5,
) -> dict[str, Any]:
    """CLIPConfig arguments (text_config, vision_config, projection_dim) from an open_clip state dict's shapes."""
    conv = _need(state, "visual.conv1.weight", source)
    if conv.ndim != 4 or conv.shape[-1] != conv.shape[-2]:
        raise ValueError(f"{source}: visual.conv1.weight has shape {tuple(conv.shape)}, expected a square patch conv")
    vision_width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    positions = _need(state, "visual.positional_embedding", source).shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ValueError(f"{source}: visual.positional_embedding has {positions} rows, not 1 + a square grid")
    vision_layers = _num_blocks(state, "visual.transformer.resblocks.")
    text_layers = _num_blocks(state, "transformer.resblocks.")
    if not vision_layers or not text_layers:
        tower = "visual.transformer.resblocks.0.*" if not vision_layers else "transformer.resblocks.0.*"
        raise CheckpointKeyError(f"{source}: open_clip checkpoint has no {tower} keys (not a ViT CLIP state dict?)")
    vocab_size, text_width = _need(state, "token_embedding.weight", source).shape
    context_length = _need(state, "positional_embedding", source).shape[0]
    vision_proj = _need(state, "visual.proj", source)
    text_proj = _need(state, "text_projection", source)
    if vision_proj.shape[1] != text_proj.shape[1]:
        raise ValueError(
            f"{source}: visual.proj {tuple(vision_proj.shape)} and text_projection {tuple(text_proj.shape)} "
            "project to different dimensions"
        )
    vision_heads = vision_heads or vision_width // VISION_HEAD_WIDTH.get(vision_width, 64)
    text_heads = text_heads or text_width // TEXT_HEAD_WIDTH
    for tower, width, heads in (("vision", vision_width, vision_heads), ("text", text_width, text_heads)):
        if heads < 1 or width % heads:
            raise ValueError(
                f"{source}: {tower} width {width} is not divisible into {heads} heads; pass {tower}_heads="
            )
    common = dict(hidden_act=hidden_act, layer_norm_eps=layer_norm_eps)
    return dict(
        vision_config=dict(
            hidden_size=vision_width, num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
            intermediate_size=_need(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", source).shape[0],
            patch_size=patch, image_size=grid * patch, num_channels=channels, **common,
        ),
        text_config=dict(
            hidden_size=text_width, num_hidden_layers=text_layers, num_attention_heads=text_heads,
            intermediate_size=_need(state, "transformer.resblocks.0.mlp.c_fc.weight", source).shape[0],
            vocab_size=vocab_size, max_position_embeddings=context_length, **common,
        ),
        projection_dim=vision_proj.shape[1],
    )


def convert_openclip_state_dict(
    state: dict[str, torch.Tensor], source: str = "checkpoint", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """open_clip keys -> transformers CLIPModel keys. Every key must be used exactly once: a missing or an
    unknown key raises CheckpointKeyError naming the key and `source`."""
    vision_layers = _num_blocks(state, "visual.transformer.resblocks.")
    text_layers = _num_blocks(state, "transformer.resblocks.")
    wanted: dict[str, str] = {**_VISION_PLAIN, **_TEXT_PLAIN, "logit_scale": "logit_scale"}
    in_proj: dict[str, str] = {}  # open_clip in_proj key -> transformers prefix "...self_attn." + {q,k,v}_proj.<kind>
    for src, dst, count in (
        ("visual.transformer.resblocks.", "vision_model.encoder.layers.", vision_layers),
        ("transformer.resblocks.", "text_model.encoder.layers.", text_layers),
    ):
        for i in range(count):
            wanted.update({f"{src}{i}.{a}": f"{dst}{i}.{b}" for a, b in _BLOCK_PARTS.items()})
            for kind in ("weight", "bias"):
                in_proj[f"{src}{i}.attn.in_proj_{kind}"] = f"{dst}{i}.self_attn.:{kind}"
    expected = [*wanted, *in_proj, *_TRANSPOSED]
    missing = [key for key in expected if key not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointKeyError(f"{source}: open_clip checkpoint is missing key {missing[0]!r}{more}")
    unexpected = sorted(set(state) - set(expected) - set(IGNORED_KEYS))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more: {', '.join(unexpected[1:4])}...)" if len(unexpected) > 1 else ""
        raise CheckpointKeyError(
            f"{source}: unexpected key {unexpected[0]!r}{more} -- not part of a standard open_clip ViT CLIP"
        )

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor if dtype is None else tensor.to(dtype)).contiguous()

    out = {dst: cast(state[src]) for src, dst in wanted.items()}
    out.update({dst: cast(state[src].t()) for src, dst in _TRANSPOSED.items()})
    for src, dst in in_proj.items():
        prefix, kind = dst.split(":")
        tensor = state[src]
        if tensor.shape[0] % 3:
            raise ValueError(f"{source}: {src} has shape {tuple(tensor.shape)}, expected 3 * width rows")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
            out[f"{prefix}{name}.{kind}"] = cast(part)
    out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def clip_config_from_openclip(state: dict[str, torch.Tensor], tokenizer=None, source: str = "checkpoint", **overrides):
    """The transformers CLIPConfig of an open_clip state dict; bos/eos/pad ids from `tokenizer` (else OpenAI's)."""
    transformers = require("transformers", "converting an open_clip checkpoint")
    kwargs = infer_openclip_config(state, source=source, **overrides)
    text = kwargs["text_config"]
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        if len(tokenizer) != text["vocab_size"]:
            raise ValueError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the checkpoint's "
                             f"token_embedding {text['vocab_size']}: not the tokenizer of this checkpoint")
        if tokenizer.eos_token_id != len(tokenizer) - 1:
            # open_clip pools at argmax(ids): that is the end-of-text token only when it has the highest id
            raise ValueError(f"{source}: the tokenizer's eos id {tokenizer.eos_token_id} is not its highest id "
                             f"({len(tokenizer) - 1}), unlike the OpenAI CLIP BPE that open_clip checkpoints use")
    else:
        ids = dict(bos_token_id=OPENAI_BOS_ID, eos_token_id=OPENAI_EOS_ID, pad_token_id=OPENAI_PAD_ID)
    text.update(ids)
    return transformers.CLIPConfig(**kwargs)


def openclip_to_transformers(
    state: dict[str, torch.Tensor],
    tokenizer=None,
    source: str = "checkpoint",
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
):
    """A transformers CLIPModel (eval mode) holding the weights of an open_clip state dict."""
    transformers = require("transformers", "converting an open_clip checkpoint")
    config = clip_config_from_openclip(state, tokenizer, source=source, **overrides)
    converted = convert_openclip_state_dict(state, source=source, dtype=dtype)
    model, info = transformers.CLIPModel.from_pretrained(
        None, config=config, state_dict=converted, dtype=dtype, output_loading_info=True
    )
    problems = {kind: sorted(keys) for kind, keys in info.items() if kind != "error_msgs" and keys}
    if problems or info.get("error_msgs"):
        raise RuntimeError(f"{source}: converted weights do not fit CLIPModel: {problems or info['error_msgs']}")
    return model.eval()
