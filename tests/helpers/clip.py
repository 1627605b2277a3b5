"""Tiny random CLIP parts for reward tests: a CLIPTokenizer laid out like the OpenAI BPE over a few words, and a
random transformers CLIPModel small enough for finite differences in float64."""

from __future__ import annotations

import torch

from fastpref.toy.tokenizer import END_OF_WORD, build_merges


def tiny_clip_tokenizer(words, pad_token: str = "<|endoftext|>", max_length: int = 16):
    """Word pieces first, <|startoftext|>, <|endoftext|> last (so eot has the highest id, which open_clip's argmax
    pooling relies on)."""
    import transformers

    words = sorted(set(words))
    merges = build_merges(words)
    letters = sorted({c for w in words for c in w})
    vocab: dict[str, int] = {}
    for symbol in [*letters, *(c + END_OF_WORD for c in letters), *(a + b for a, b in merges)]:
        vocab.setdefault(symbol, len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=max_length)


def tiny_clip_model(tokenizer, image_size: int = 32, patch: int = 8, width: int = 16, projection_dim: int = 8,
                    seed: int = 0):
    """A random one-layer CLIPModel (both towers `width` wide) for `tokenizer`, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=patch),
        projection_dim=projection_dim,
    )
    return transformers.CLIPModel(config).eval()
