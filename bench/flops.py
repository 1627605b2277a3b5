"""Analytic FLOP counts of the diffusion architectures fastpref trains, from their diffusers / transformers configs.

Convention (the one torch.utils.flop_counter.FlopCounterMode uses, so the two can be compared):
- a multiply-accumulate is 2 FLOPs; only matmul-like work counts: convolutions, linear layers, and the two
  attention matmuls (Q K^T and softmax(.) V: 4 * N_q * N_k * inner_dim per sample, whatever the head count);
- norms, activations, softmax, residual adds, biases, interpolation and the sinusoidal embeddings are left out
  (they are < 1% of a UNet / MMDiT forward and bandwidth-bound, not FLOP-bound).

Each count is split into `weights` (convs + linears: what a weight gradient doubles) and `attention` (the
activation-activation matmuls), and carries `recomputed`: the part of the forward that gradient checkpointing runs
again in the backward (diffusers checkpoints each resnet and transformer block of a UNet, each block of an MMDiT).

Training conventions (used by bench/step.py for MFU / HFU):
- full fine-tuning: backward = 2 x forward (input and weight gradients);
- LoRA: the frozen base weights get no gradient, so backward = 1 x weights + 2 x attention (+ the adapters'
  own matmuls, < 1% at rank <= 64, left out). An upper bound: autograd also skips everything upstream of the first
  adapter (for SDXL the whole first down block, which has no attention);
- layers fed by data need no input gradient (conv_in, cross-attention k/v on text states): autograd runs ~0.2% less
  than 2 x forward; the convention ignores it, as the usual 6 x params x tokens rule does;
- gradient checkpointing adds `recomputed` once more to what the hardware executes (HFU), not to MFU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flops:
    weights: float = 0.0  # convolutions + linear layers
    attention: float = 0.0  # Q K^T and A V
    recomputed: float = 0.0  # part of weights + attention inside gradient-checkpointed blocks

    @property
    def total(self) -> float:
        return self.weights + self.attention

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.weights + other.weights, self.attention + other.attention, self.recomputed + other.recomputed)

    def __mul__(self, factor: float) -> "Flops":
        return Flops(self.weights * factor, self.attention * factor, self.recomputed * factor)

    __rmul__ = __mul__

    def checkpointed(self) -> "Flops":
        """The same work, all of it inside a checkpointed block."""
        return Flops(self.weights, self.attention, self.weights + self.attention)


# ------------------------------------------------------------------------------------------------ primitives


def linear(in_features: int, out_features: int, tokens: float) -> Flops:
    return Flops(weights=2.0 * in_features * out_features * tokens)


def conv(in_channels: int, out_channels: int, kernel: int, out_h: int, out_w: int, batch: int) -> Flops:
    return Flops(weights=2.0 * in_channels * out_channels * kernel * kernel * out_h * out_w * batch)


def attention_core(query_tokens: float, key_tokens: float, inner_dim: int, batch: int) -> Flops:
    """Q K^T plus softmax(Q K^T) V for all heads together."""
    return Flops(attention=4.0 * query_tokens * key_tokens * inner_dim * batch)


def _per_block(value, count: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"config {name}: expected {count} entries (one per block), got {len(value)}")
        return list(value)
    return [value] * count


# ------------------------------------------------------------------------------------------------ UNet


def _resnet(in_ch: int, out_ch: int, h: int, w: int, batch: int, temb_dim: int | None) -> Flops:
    flops = conv(in_ch, out_ch, 3, h, w, batch) + conv(out_ch, out_ch, 3, h, w, batch)
    if temb_dim is not None:
        flops += linear(temb_dim, out_ch, batch)
    if in_ch != out_ch:
        flops += conv(in_ch, out_ch, 1, h, w, batch)
    return flops


def _unet_transformer(channels: int, layers: int, h: int, w: int, batch: int, cross_dim: int, text_len: int) -> Flops:
    """diffusers Transformer2DModel as the UNet uses it: proj_in, `layers` BasicTransformerBlocks
    (self-attention, cross-attention, GEGLU feed-forward 4x), proj_out; inner dim = channels."""
    tokens = h * w * batch
    flops = linear(channels, channels, tokens) * 2  # proj_in + proj_out (a 1x1 conv costs the same)
    block = (
        linear(channels, channels, tokens) * 4  # self-attention q, k, v, out
        + attention_core(h * w, h * w, channels, batch)
        + linear(channels, channels, tokens) * 2  # cross-attention q, out
        + linear(cross_dim, channels, text_len * batch) * 2  # cross-attention k, v on the text tokens
        + attention_core(h * w, text_len, channels, batch)
        + linear(channels, 8 * channels, tokens)  # GEGLU projection (value and gate)
        + linear(4 * channels, channels, tokens)
    )
    return flops + block * layers


def unet_forward_flops(config: dict, batch: int, latent_hw: tuple[int, int], text_len: int) -> Flops:
    """One forward of diffusers' UNet2DConditionModel(**config) on `batch` latents of latent_hw."""
    channels = list(config["block_out_channels"])
    blocks = len(channels)
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    if len(down_types) != blocks or len(up_types) != blocks:
        raise ValueError("config: down_block_types / up_block_types must have one entry per block_out_channels")
    layers = _per_block(config.get("layers_per_block", 2), blocks, "layers_per_block")
    depth = _per_block(config.get("transformer_layers_per_block", 1), blocks, "transformer_layers_per_block")
    up_depth = config.get("reverse_transformer_layers_per_block") or list(reversed(depth))
    cross_dim = config.get("cross_attention_dim", 1280)
    if isinstance(cross_dim, (list, tuple)):
        raise ValueError("config cross_attention_dim: per-block values are not supported by this counter")
    in_ch, out_ch = config.get("in_channels", 4), config.get("out_channels", 4)
    h, w = latent_hw
    temb = config.get("time_embedding_dim") or channels[0] * 4

    total = conv(in_ch, channels[0], 3, h, w, batch)
    total += linear(channels[0], temb, batch) + linear(temb, temb, batch)  # time embedding MLP
    if config.get("addition_embed_type") == "text_time":
        total += linear(config["projection_class_embeddings_input_dim"], temb, batch) + linear(temb, temb, batch)
    elif config.get("addition_embed_type") is not None:
        raise ValueError(f"config addition_embed_type={config['addition_embed_type']!r} is not supported")

    # down path: resnets (+ transformers) per block, then a stride-2 conv except after the last block
    previous = channels[0]
    for i, kind in enumerate(down_types):
        bh, bw = h >> i, w >> i
        for j in range(layers[i]):
            total += _resnet(previous if j == 0 else channels[i], channels[i], bh, bw, batch, temb).checkpointed()
            if kind.startswith("CrossAttn"):
                total += _unet_transformer(channels[i], depth[i], bh, bw, batch, cross_dim, text_len).checkpointed()
        if i < blocks - 1:
            total += conv(channels[i], channels[i], 3, bh >> 1, bw >> 1, batch)
        previous = channels[i]

    # mid block: resnet, transformer, resnet at the lowest resolution
    mh, mw = h >> (blocks - 1), w >> (blocks - 1)
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type == "UNetMidBlock2DCrossAttn":
        total += _resnet(channels[-1], channels[-1], mh, mw, batch, temb).checkpointed() * 2
        total += _unet_transformer(channels[-1], depth[-1], mh, mw, batch, cross_dim, text_len).checkpointed()
    elif mid_type is not None:
        raise ValueError(f"config mid_block_type={mid_type!r} is not supported")

    # up path: layers + 1 resnets on [x, skip] concatenations, then nearest x2 + conv except after the last
    reversed_channels = list(reversed(channels))
    reversed_layers = list(reversed(layers))
    output = reversed_channels[0]
    for i, kind in enumerate(up_types):
        prev_output, output = output, reversed_channels[i]
        skip_in = reversed_channels[min(i + 1, blocks - 1)]
        bh, bw = h >> (blocks - 1 - i), w >> (blocks - 1 - i)
        num = reversed_layers[i] + 1
        for j in range(num):
            skip = skip_in if j == num - 1 else output
            resnet_in = prev_output if j == 0 else output
            total += _resnet(resnet_in + skip, output, bh, bw, batch, temb).checkpointed()
            if kind.startswith("CrossAttn"):
                total += _unet_transformer(output, up_depth[i], bh, bw, batch, cross_dim, text_len).checkpointed()
        if i < blocks - 1:
            total += conv(output, output, 3, bh * 2, bw * 2, batch)

    total += conv(channels[0], out_ch, 3, h, w, batch)
    return total


# ------------------------------------------------------------------------------------------------ SD3 MMDiT


def sd3_transformer_forward_flops(config: dict, batch: int, latent_hw: tuple[int, int], text_len: int) -> Flops:
    """One forward of diffusers' SD3Transformer2DModel(**config) (MMDiT, no dual attention layers)."""
    if config.get("dual_attention_layers"):
        raise ValueError("config dual_attention_layers (SD3.5) is not supported by this counter")
    patch = config.get("patch_size", 2)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    in_ch = config.get("in_channels", 16)
    out_ch = config.get("out_channels") or in_ch
    h, w = latent_hw
    image = (h // patch) * (w // patch)
    img_tokens, txt_tokens = image * batch, text_len * batch

    total = conv(in_ch, inner, patch, h // patch, w // patch, batch)  # patch embedding
    total += linear(256, inner, batch) + linear(inner, inner, batch)  # timestep embedder
    total += linear(config["pooled_projection_dim"], inner, batch) + linear(inner, inner, batch)  # pooled text
    total += linear(config["joint_attention_dim"], config["caption_projection_dim"], txt_tokens)  # context embedder
    for index in range(config["num_layers"]):
        last = index == config["num_layers"] - 1  # context_pre_only: the text stream ends here
        block = linear(inner, 6 * inner, batch)  # AdaLayerNormZero of the image stream
        block += linear(inner, (2 if last else 6) * inner, batch)  # of the text stream
        block += linear(inner, inner, img_tokens) * 3 + linear(inner, inner, txt_tokens) * 3  # q k v, both streams
        block += attention_core(image + text_len, image + text_len, inner, batch)  # joint attention
        block += linear(inner, inner, img_tokens)  # to_out
        block += linear(inner, 4 * inner, img_tokens) + linear(4 * inner, inner, img_tokens)  # feed-forward
        if not last:
            block += linear(inner, inner, txt_tokens)  # to_add_out
            block += linear(inner, 4 * inner, txt_tokens) + linear(4 * inner, inner, txt_tokens)
        total += block.checkpointed()
    total += linear(inner, 2 * inner, batch)  # norm_out (AdaLayerNormContinuous)
    total += linear(inner, patch * patch * out_ch, img_tokens)
    return total


# ------------------------------------------------------------------------------------------------ text encoders, VAE


def clip_text_forward_flops(config: dict, batch: int, seq_len: int, with_projection: bool = False) -> Flops:
    """transformers CLIPTextModel, or CLIPTextModelWithProjection (with_projection: the pooled token's projection)."""
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    tokens = batch * seq_len
    layer = linear(d, d, tokens) * 4 + attention_core(seq_len, seq_len, d, batch)
    layer += linear(d, ff, tokens) + linear(ff, d, tokens)
    total = layer * layers
    if with_projection:
        total += linear(d, config["projection_dim"], batch)  # text_projection of the pooled (eos) token
    return total


def t5_encoder_forward_flops(config: dict, batch: int, seq_len: int) -> Flops:
    """transformers T5EncoderModel (gated-gelu feed-forward as T5 v1.1 / T5-XXL)."""
    d, ff, layers = config["d_model"], config["d_ff"], config["num_layers"]
    inner = config["num_heads"] * config["d_kv"]
    tokens = batch * seq_len
    gated = str(config.get("feed_forward_proj", "relu")).startswith("gated")
    layer = linear(d, inner, tokens) * 3 + linear(inner, d, tokens) + attention_core(seq_len, seq_len, inner, batch)
    layer += linear(d, ff, tokens) * (2 if gated else 1) + linear(ff, d, tokens)
    return layer * layers


def vae_encoder_forward_flops(config: dict, batch: int, image_hw: tuple[int, int]) -> Flops:
    """diffusers AutoencoderKL.encode: encoder (DownEncoderBlock2D x n, mid block with one attention) + quant_conv."""
    channels = list(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    latent = config.get("latent_channels", 4)
    h, w = image_hw
    total = conv(config.get("in_channels", 3), channels[0], 3, h, w, batch)
    previous = channels[0]
    for i, ch in enumerate(channels):
        for j in range(layers):
            total += _resnet(previous if j == 0 else ch, ch, h, w, batch, None)
        previous = ch
        if i < len(channels) - 1:
            h, w = h // 2, w // 2  # stride-2 conv with (0, 1, 0, 1) padding: exact halving for even sizes
            total += conv(ch, ch, 3, h, w, batch)
    c = channels[-1]
    total += _resnet(c, c, h, w, batch, None) * 2
    if config.get("mid_block_add_attention", True):
        total += linear(c, c, h * w * batch) * 4 + attention_core(h * w, h * w, c, batch)
    total += conv(c, 2 * latent, 3, h, w, batch)
    if config.get("use_quant_conv", True):
        total += conv(2 * latent, 2 * latent, 1, h, w, batch)
    return total


def vae_decoder_forward_flops(config: dict, batch: int, latent_hw: tuple[int, int]) -> Flops:
    """diffusers AutoencoderKL.decode: post_quant_conv + decoder (conv_in, mid block with one attention, UpDecoderBlock2D
    x n of layers_per_block + 1 resnets, nearest x2 + conv between them, conv_out). What an online rollout runs on
    every image it scores (SPO: every candidate's predicted x0; GRPO: the final images)."""
    channels = list(config["block_out_channels"])
    layers = config.get("layers_per_block", 2) + 1
    latent = config.get("latent_channels", 4)
    h, w = latent_hw
    total = Flops()
    if config.get("use_post_quant_conv", True):
        total += conv(latent, latent, 1, h, w, batch)
    c = channels[-1]
    total += conv(latent, c, 3, h, w, batch)
    total += _resnet(c, c, h, w, batch, None) * 2
    if config.get("mid_block_add_attention", True):
        total += linear(c, c, h * w * batch) * 4 + attention_core(h * w, h * w, c, batch)
    previous = c
    for i, ch in enumerate(reversed(channels)):
        for j in range(layers):
            total += _resnet(previous if j == 0 else ch, ch, h, w, batch, None)
        previous = ch
        if i < len(channels) - 1:
            h, w = h * 2, w * 2
            total += conv(ch, ch, 3, h, w, batch)
    total += conv(channels[0], config.get("out_channels", 3), 3, h, w, batch)
    return total


# ------------------------------------------------------------------------------------------------ conventions


def backward_flops(forward: Flops, trainable: str) -> Flops:
    """Backward of a forward whose parameters are all trained ('full') or frozen behind adapters ('lora')."""
    if trainable == "full":
        return Flops(2 * forward.weights, 2 * forward.attention)
    if trainable == "lora":
        return Flops(forward.weights, 2 * forward.attention)
    raise ValueError(f"trainable must be 'full' or 'lora', got {trainable!r}")


def denoiser_forward_flops(family: str, config: dict, batch: int, latent_hw: tuple[int, int], text_len: int) -> Flops:
    if family in ("sd", "sdxl"):
        return unet_forward_flops(config, batch, latent_hw, text_len)
    if family == "sd3":
        return sd3_transformer_forward_flops(config, batch, latent_hw, text_len)
    raise ValueError(f"unknown family {family!r} (expected sd, sdxl or sd3)")
