"""HPSv2 without open_clip: open_clip state dicts converted to a transformers CLIPModel (rewards.openclip_convert).

The reference is a minimal pure-torch open_clip CLIP (below): its module tree reproduces open_clip's state-dict keys
(visual.conv1, visual.transformer.resblocks.{i}.attn.in_proj_weight, ..., text_projection, logit_scale) and its
forward open_clip's (nn.MultiheadAttention blocks, class token + ln_post + proj, causal text tower pooled at
argmax(token ids)). A tiny random one is saved as a checkpoint, loaded through HPSv2Reward.from_pretrained, and the
converted model's embeddings and scores are compared with the reference forward in float32 (atol 2e-5 on
L2-normalized embeddings and cosines).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from fastpref.rewards import openclip_convert, pretrained  # noqa: E402
from fastpref.rewards.base import build_reward  # noqa: E402
from helpers.clip import tiny_clip_tokenizer  # noqa: E402

PROMPTS = ["a red circle", "two blue squares", "a big green triangle"]
WORDS = sorted({w for p in PROMPTS for w in p.split()})
TINY = dict(vision_width=48, vision_layers=2, vision_heads=3, patch=8, image=32,
            text_width=32, text_layers=2, text_heads=4, context=16, dim=24)
ATOL = 2e-5


# ---- a minimal open_clip CLIP (reference) -------------------------------------------------------------------------

class ResBlock(nn.Module):
    def __init__(self, width, heads, mlp_ratio=4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, width * mlp_ratio), gelu=nn.GELU(), c_proj=nn.Linear(width * mlp_ratio, width)))

    def forward(self, x, attn_mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(ResBlock(width, heads) for _ in range(layers))

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTower(nn.Module):
    def __init__(self, width, layers, heads, patch, image, dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenCLIP(nn.Module):
    def __init__(self, vision_width, vision_layers, vision_heads, patch, image, text_width, text_layers, text_heads,
                 context, dim, vocab=64):
        super().__init__()
        self.visual = VisionTower(vision_width, vision_layers, vision_heads, patch, image, dim)
        self.token_embedding = nn.Embedding(vocab, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(context, text_width))
        self.transformer = Transformer(text_width, text_layers, text_heads)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.randn(text_width, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # older open_clip versions saved the causal mask as a persistent buffer; the converter skips it
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu(1))

    def encode_image(self, images):
        return self.visual(images)

    def encode_text(self, ids):  # ids: (B, context) as open_clip's tokenizer makes them: sot ... eot 0 0 ...
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.attn_mask))
        return x[torch.arange(len(x)), ids.argmax(dim=-1)] @ self.text_projection


def random_openclip(vocab, seed=0, **dims):
    torch.manual_seed(seed)
    model = OpenCLIP(**{**TINY, **dims}, vocab=vocab)
    with torch.no_grad():  # every tensor random (biases, LayerNorms too), so any misplaced weight shows
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.copy_(1 + 0.1 * torch.randn_like(p) if ".ln" in f".{name}" and name.endswith("weight")
                        else 0.1 * torch.randn_like(p))
    return model.eval()


# ---- fixtures -------------------------------------------------------------------------------------------------------

def tiny_tokenizer(pad_token="<|endoftext|>"):
    return tiny_clip_tokenizer(WORDS, pad_token, max_length=TINY["context"])


@pytest.fixture(scope="module", params=["<|endoftext|>", "a"], ids=["pad=eot", "pad=low-id"])
def setup(request, tmp_path_factory):
    """(reference open_clip model, tokenizer folder, checkpoint path): pad=eot like openai/clip-vit-large-patch14,
    pad=a low id like laion/CLIP-ViT-H-14 ('!' = 0)."""
    root = tmp_path_factory.mktemp("hps")
    tokenizer = tiny_tokenizer(request.param)
    tokenizer.save_pretrained(root / "tokenizer")
    reference = random_openclip(len(tokenizer))
    torch.save(reference.state_dict(), root / "hps.pt")
    return reference, str(root / "tokenizer"), root / "hps.pt"


def load(path, tokenizer, **kwargs):
    return pretrained.HPSv2Reward.from_pretrained(path, tokenizer=tokenizer, vision_heads=TINY["vision_heads"],
                                                  text_heads=TINY["text_heads"], **kwargs)


def openclip_tokens(tokenizer, prompts, context):
    """open_clip's tokenize(): [sot, tokens..., eot] cut to the context length with eot last, padded with 0."""
    out = torch.zeros(len(prompts), context, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt, verbose=False)["input_ids"][:context]
        ids[-1] = tokenizer.eos_token_id
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def reference_scores(reference, tokenizer, pixels, prompts):
    mean, std = pretrained.OPENAI_CLIP_MEAN, pretrained.OPENAI_CLIP_STD
    images = pretrained.letterbox_preprocess(pixels, TINY["image"], mean, std)
    tokens = openclip_tokens(tokenizer, prompts, TINY["context"])
    with torch.no_grad():
        image = nn.functional.normalize(reference.encode_image(images), dim=-1)
        text = nn.functional.normalize(reference.encode_text(tokens), dim=-1)
    return image, text


# ---- tests ----------------------------------------------------------------------------------------------------------

def test_converted_model_matches_the_open_clip_forward(setup):
    reference, tokenizer_dir, path = setup
    reward = load(path, tokenizer_dir)
    tokenizer = reward.tokenizer
    assert tokenizer.eos_token_id == len(tokenizer) - 1 == reward.model.config.text_config.eos_token_id
    prompts = [*PROMPTS, " ".join(WORDS * 4)]  # the last one is cut to the context length
    assert len(tokenizer(prompts[-1], verbose=False)["input_ids"]) > TINY["context"]
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    image, text = reference_scores(reference, tokenizer, pixels, prompts)
    got_image, got_text = reward.features(pixels, prompts)
    torch.testing.assert_close(got_image, image, rtol=0, atol=ATOL)
    torch.testing.assert_close(got_text, text, rtol=0, atol=ATOL)
    # HPSv2's score: diag(normalized image @ normalized text.T), no logit_scale
    expected = (image @ text.T).diagonal()
    torch.testing.assert_close(reward(pixels, prompts), expected, rtol=0, atol=ATOL)
    assert expected.abs().min() > 1e-3  # not trivially zero
    torch.testing.assert_close(reward.model.logit_scale.detach(), reference.logit_scale.detach())
    # the un-normalized projections too (projection transposes, scale of the towers)
    with torch.no_grad():
        tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        raw_text = pretrained._features(reward.model.get_text_features(**tokens))
        expected_raw = reference.encode_text(openclip_tokens(tokenizer, PROMPTS, TINY["context"]))
        torch.testing.assert_close(raw_text, expected_raw, rtol=1e-4, atol=1e-5)


def test_non_square_images_are_letterboxed_like_hpsv2(setup):
    reference, tokenizer_dir, path = setup
    reward = load(path, tokenizer_dir)
    pixels = torch.rand(2, 3, 40, 80, generator=torch.Generator().manual_seed(2))
    image, text = reference_scores(reference, reward.tokenizer, pixels, PROMPTS[:2])
    torch.testing.assert_close(reward(pixels, PROMPTS[:2]), (image * text).sum(-1), rtol=0, atol=ATOL)
    cropped = pretrained.HPSv2Reward(reward.model, reward.tokenizer, resize="crop")
    assert (cropped(pixels, PROMPTS[:2]) - reward(pixels, PROMPTS[:2])).abs().max() > 1e-4  # the modes differ
    square = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(cropped(square, PROMPTS[:2]), reward(square, PROMPTS[:2]))  # and agree on squares


def test_letterbox_preprocess_pads_black_around_the_resized_image():
    pixels = torch.rand(1, 3, 20, 40)
    out = pretrained.letterbox_preprocess(pixels, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out[:, :, :8], torch.full((1, 3, 8, 32), -2.0))  # (0 - 0.5) / 0.25: black padding
    torch.testing.assert_close(out[:, :, 24:], torch.full((1, 3, 8, 32), -2.0))
    resized = pretrained.pil_bicubic_resize(pixels, (16, 32))
    torch.testing.assert_close(out[:, :, 8:24], (resized - 0.5) / 0.25)


def test_wrong_head_counts_change_the_embeddings(setup):
    """The equivalence test can fail: head counts are invisible in the shapes, and a wrong one gives other numbers."""
    reference, tokenizer_dir, path = setup
    wrong = pretrained.HPSv2Reward.from_pretrained(path, tokenizer=tokenizer_dir, vision_heads=1, text_heads=2)
    pixels = torch.rand(2, 3, 32, 32)
    image, text = reference_scores(reference, wrong.tokenizer, pixels, PROMPTS[:2])
    got_image, got_text = wrong.features(pixels, PROMPTS[:2])
    assert (got_image - image).abs().max() > 1e-3 and (got_text - text).abs().max() > 1e-3


def test_wrapped_and_safetensors_checkpoints_load(setup, tmp_path):
    from safetensors.torch import save_file

    reference, tokenizer_dir, path = setup
    state = reference.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "wrapped.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "hps.safetensors")
    pixels = torch.rand(2, 3, 32, 32)
    expected = load(path, tokenizer_dir)(pixels, PROMPTS[:2])
    for name in ("wrapped.pt", "hps.safetensors"):
        torch.testing.assert_close(load(tmp_path / name, tokenizer_dir)(pixels, PROMPTS[:2]), expected)
    # through the registry / ensemble path, with a CLIPTokenizer object
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    reward = build_reward("hpsv2", str(tmp_path / "hps.safetensors"), tokenizer=tokenizer,
                          vision_heads=TINY["vision_heads"], text_heads=TINY["text_heads"])
    torch.testing.assert_close(reward(pixels, PROMPTS[:2]), expected)


def test_half_precision_checkpoints_are_cast_to_the_requested_dtype(setup, tmp_path):
    reference, tokenizer_dir, path = setup
    torch.save({k: v.half() for k, v in reference.state_dict().items()}, tmp_path / "fp16.pt")
    reward = load(tmp_path / "fp16.pt", tokenizer_dir)
    assert {p.dtype for p in reward.model.parameters()} == {torch.float32}
    pixels = torch.rand(2, 3, 32, 32)
    assert (reward(pixels, PROMPTS[:2]) - load(path, tokenizer_dir)(pixels, PROMPTS[:2])).abs().max() < 5e-3


def test_missing_and_unexpected_keys_name_the_key_and_the_file(setup, tmp_path):
    reference, tokenizer_dir, _ = setup
    state = reference.state_dict()
    missing = {k: v for k, v in state.items() if k != "transformer.resblocks.1.attn.in_proj_bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(KeyError, match=r"missing\.pt: open_clip checkpoint is missing key "
                                        r"'transformer\.resblocks\.1\.attn\.in_proj_bias'"):
        load(tmp_path / "missing.pt", tokenizer_dir)
    torch.save({**state, "visual.attn_pool.query": torch.zeros(3)}, tmp_path / "extra.pt")
    with pytest.raises(KeyError, match=r"extra\.pt: unexpected key 'visual\.attn_pool\.query'"):
        load(tmp_path / "extra.pt", tokenizer_dir)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt"):
        load(tmp_path / "nowhere.pt", tokenizer_dir)


def test_gradients_flow_to_the_pixels(setup):
    _, tokenizer_dir, path = setup
    reward = load(path, tokenizer_dir)
    assert reward.differentiable
    pixels = torch.rand(2, 3, 48, 40, requires_grad=True)  # resized and letterboxed inside
    reward(pixels, PROMPTS[:2]).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())  # the reward model stays frozen


def openclip_shapes(**dims):
    """An open_clip state dict with the given architecture's shapes, on the meta device (no memory)."""
    with torch.device("meta"):
        return OpenCLIP(**dims).state_dict()


@pytest.mark.parametrize(
    "name, dims, expected",
    [
        ("ViT-H-14", dict(vision_width=1280, vision_layers=32, vision_heads=16, patch=14, image=224, text_width=1024,
                          text_layers=24, text_heads=16, context=77, dim=1024, vocab=49408), (16, 16, 5120, 4096)),
        ("ViT-L-14", dict(vision_width=1024, vision_layers=24, vision_heads=16, patch=14, image=224, text_width=768,
                          text_layers=12, text_heads=12, context=77, dim=768, vocab=49408), (16, 12, 4096, 3072)),
        ("ViT-B-32", dict(vision_width=768, vision_layers=12, vision_heads=12, patch=32, image=224, text_width=512,
                          text_layers=12, text_heads=8, context=77, dim=512, vocab=49408), (12, 8, 3072, 2048)),
    ],
)
def test_config_inference_from_shapes(name, dims, expected):
    state = openclip_shapes(**dims)
    config = openclip_convert.clip_config_from_openclip(state, source=name)
    vision, text = config.vision_config, config.text_config
    heads = (vision.num_attention_heads, text.num_attention_heads)
    assert (*heads, vision.intermediate_size, text.intermediate_size) == expected
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (
        dims["vision_width"], dims["vision_layers"], dims["patch"], dims["image"])
    assert (text.hidden_size, text.num_hidden_layers, text.max_position_embeddings, text.vocab_size) == (
        dims["text_width"], dims["text_layers"], dims["context"], dims["vocab"])
    assert config.projection_dim == dims["dim"]
    assert vision.hidden_act == text.hidden_act == "gelu" and vision.layer_norm_eps == 1e-5
    # OpenAI BPE ids without a tokenizer: pooling at <|endoftext|> = 49407, the highest id (open_clip's argmax)
    assert (text.bos_token_id, text.eos_token_id) == (49406, 49407)
    converted = openclip_convert.convert_openclip_state_dict(state, source=name)
    with torch.device("meta"):
        target = transformers.CLIPModel(config).state_dict()
    assert set(converted) == set(target)
    assert all(converted[k].shape == target[k].shape for k in target)


def test_head_counts_that_cannot_be_inferred_ask_for_an_override(setup):
    _, tokenizer_dir, path = setup
    with pytest.raises(ValueError, match="vision width 48 is not divisible into 0 heads; pass vision_heads="):
        pretrained.HPSv2Reward.from_pretrained(path, tokenizer=tokenizer_dir)
    config = openclip_convert.clip_config_from_openclip(torch.load(path), vision_heads=3, text_heads=4,
                                                        hidden_act="quick_gelu")
    assert config.vision_config.hidden_act == "quick_gelu"


def test_a_tokenizer_that_does_not_fit_the_checkpoint_is_refused(setup, tmp_path):
    _, tokenizer_dir, path = setup
    (tmp_path / "empty").mkdir()  # transformers 5 loads an empty CLIPTokenizer from a folder without vocab files
    with pytest.raises(OSError, match="no CLIP tokenizer vocabulary found"):
        load(path, str(tmp_path / "empty"))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(["extra"])
    with pytest.raises(ValueError, match=r"hps\.pt: the tokenizer has \d+ tokens .*not the tokenizer of this"):
        load(path, tokenizer)
