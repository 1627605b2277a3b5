"""A null T5 for SD3 folders saved without one, so that the plain `DiffusionPipeline.from_pretrained(folder)` loads.

StableDiffusion3Pipeline lists text_encoder_3 / tokenizer_3 as required (not in `_optional_components`), so
diffusers 0.42 refuses a folder whose model_index.json records them as null unless the caller passes
`text_encoder_3=None`. Without T5 the pipeline appends `max_sequence_length` all-zero tokens of width
`joint_attention_dim`; the null T5 reproduces exactly that:

- its tokenizer erases the text (a normalizer that deletes every character, no end-of-sequence token), so a
  call pads to `max_sequence_length` with <pad> and `max_sequence_length=0` gives no token at all (a real T5
  tokenizer would append </s> and refuse a length of 0);
- its encoder has no layer and only zero weights: the output is +0.0 for any input (embedding 0 -> RMS norm
  of 0 is 0), in the width the transformer expects.

fastpref itself never runs it: the folder's fastpref.json keeps `text_encoder_3: null` in its load kwargs.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastpref.utils.imports import require

ENCODER = "text_encoder_3"
TOKENIZER = "tokenizer_3"
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def null_t5_tokenizer():
    transformers = require("transformers", "the null T5 tokenizer")
    tokenizers = require("tokenizers", "the null T5 tokenizer")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({PAD: 0, EOS: 1, UNK: 2}, unk_token=UNK))
    backend.normalizer = tokenizers.normalizers.Replace(tokenizers.Regex(r"[\s\S]"), "")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def null_t5_encoder(width: int):
    torch = require("torch", "the null T5 encoder")
    transformers = require("transformers", "the null T5 encoder")
    config = transformers.T5Config(
        vocab_size=3, d_model=width, d_kv=1, d_ff=1, num_layers=0, num_heads=1,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    encoder = transformers.T5EncoderModel(config)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.zero_()
    return encoder


def write_null_t5(folder: str | Path) -> None:
    """Add the null T5 to a saved T5-less SD3 pipeline folder and record it in model_index.json."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    if index.get(ENCODER, [None])[0] is not None:
        raise ValueError(f"{str(index_path)!r} already records a {ENCODER}: {index[ENCODER]}")
    width = json.loads((folder / "transformer" / "config.json").read_text())["joint_attention_dim"]
    null_t5_encoder(width).save_pretrained(folder / ENCODER)
    null_t5_tokenizer().save_pretrained(folder / TOKENIZER)
    index[ENCODER] = ["transformers", "T5EncoderModel"]
    index[TOKENIZER] = ["transformers", "PreTrainedTokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
