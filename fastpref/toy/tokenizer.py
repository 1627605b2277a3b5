"""A word-level CLIP tokenizer for the toy world: every vocabulary word is exactly one token.

It is a genuine `transformers.CLIPTokenizer` (BPE over characters, `</w>` end-of-word suffix), so the
diffusers Stable Diffusion pipelines load it by class name from `tokenizer/` and save_pretrained /
from_pretrained round-trip it through the usual vocab.json + merges.txt. The merges are built so
that each world word fuses into a single token; the ids of the special tokens come first.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastpref.utils.imports import require

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# bos + the longest caption (~9 words) + eos, with room to spare
DEFAULT_MAX_LENGTH = 16


def _word_symbols(word: str) -> list[str]:
    """A word as CLIP's BPE sees it before any merge: characters, the last one suffixed with </w>."""
    return [*word[:-1], word[-1] + END_OF_WORD]


def _bpe_segment(symbols: list[str], merge_rank: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE: repeatedly fuse the adjacent pair with the lowest merge rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        ranked = [(merge_rank.get(pair, None), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        ranked = [(rank, i) for rank, i in ranked if rank is not None]
        if not ranked:
            break
        _, i = min(ranked)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges under which BPE turns every word into one token.

    Each new merge is appended with the lowest priority, so it never fires while an older merge can:
    words already reduced to one token stay one token, and each appended merge shrinks the current
    word's final segmentation by at least one symbol, so the loop ends.
    """
    merges: list[tuple[str, str]] = []
    merge_rank: dict[tuple[str, str], int] = {}
    for word in words:
        while len(segmentation := _bpe_segment(_word_symbols(word), merge_rank)) > 1:
            pair = (segmentation[0], segmentation[1])
            merge_rank[pair] = len(merges)
            merges.append(pair)
    return merges


def build_tokenizer(words: Iterable[str] | None = None, max_length: int = DEFAULT_MAX_LENGTH, world_name: str = "v1"):
    """A CLIPTokenizer whose vocabulary is the toy world's words (world.vocabulary(world_name) by default)."""
    transformers = require("transformers", "the toy tokenizer")
    if words is None:
        from fastpref.toy import world

        words = world.vocabulary(world_name)
    words = sorted({w.lower() for w in words})
    for word in words:
        if not word.isalpha() or not word.isascii():
            raise ValueError(f"toy tokenizer: vocabulary word {word!r} must be ASCII letters only")
    merges = build_merges(words)
    vocab: dict[str, int] = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    letters = sorted({c for w in words for c in w})
    for symbol in [*letters, *(c + END_OF_WORD for c in letters), *(a + b for a, b in merges)]:
        vocab.setdefault(symbol, len(vocab))
    tokenizer = transformers.CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=max_length,
    )
    return tokenizer


def check_word_level(tokenizer, words: Iterable[str]) -> None:
    """Raise if some word does not encode to exactly one token (bos/eos excluded)."""
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(f"toy tokenizer: word {word!r} encodes to {len(ids)} tokens {pieces}, expected 1")
