"""A tiny cached Syn-Pic dataset (random-weight SD, 8 prompts x K=3, labelled, e_ref for 2 epochs) for trainer tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))

from helpers.threads import single_thread_torch  # noqa: E402,F401 (autouse)


@pytest.fixture(scope="session")
def cached_dataset(tmp_path_factory) -> dict[str, str]:
    import data_helpers as helpers

    from fastpref.data.cache import run_cache
    from fastpref.data.label import run_label
    from fastpref.data.synth import run_synth
    from fastpref.models import sd
    from fastpref.toy.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("train-ds")
    model = root / "tiny-sd"
    torch.set_num_threads(1)
    sd.build_random(sd.tiny_config("tiny"), build_tokenizer(), seed=0).save_pretrained(model)
    prompts = helpers.write_prompts(root / "prompts.jsonl", 8)
    run_synth(helpers.synth_config(prompts, str(model), str(root)))
    run_label(helpers.label_config(str(root)), rewards=helpers.make_rewards())
    run_cache(helpers.cache_config(str(root), str(model)))
    return {"root": str(root), "model": str(model)}
