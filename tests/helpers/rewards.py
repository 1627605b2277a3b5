"""Tiny reward-model folders for the tests of the reward loaders, SPM and the online recipes."""

from __future__ import annotations

from pathlib import Path


def save_tiny_clip(path: str | Path, vision_layers: int = 1) -> Path:
    """A random CLIPModel (seed 0; 1 text layer, `vision_layers` vision layers, 32x32 images) with the toy tokenizer
    and a CLIP image-processor config, saved as a folder that the clipscore / pickscore / spm loaders read."""
    import torch
    import transformers

    from fastpref.toy.tokenizer import build_tokenizer

    path = Path(path)
    tokenizer = build_tokenizer()
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=vision_layers,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(path)
    return path
