"""A shipped model's MiniGenEval, rerun with the model card's settings, reproduces the score its card records."""

import functools
import re

import pytest

pytest.importorskip("diffusers")

from fastpref.models import toy_model_path  # noqa: E402
from fastpref.toy.pretrain import score_pipeline  # noqa: E402


@functools.lru_cache(maxsize=None)
def _chance(world_name: str) -> dict[str, float]:
    from fastpref.toy.model_card import caption_blind_chance

    return caption_blind_chance(world_name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toy-sd", "toy-sd-early", "toy-sdxl", "toy-sd3",
                                  "toy-sd-v2", "toy-sd-early-v2", "toy-sdxl-v2", "toy-sd3-v2", "toy-sd-noisycap-v2"])
def test_shipped_model_reproduces_its_recorded_minigeneval_score(name):
    """The full recorded evaluation (v1: 34 held-out prompts x 4 seeds, 144 images; v2: 72 x 4, 288 images;
    ~11-60 s each on 2 cores), on the world the model records; a v2 card's caption-blind chance too."""
    folder = toy_model_path(name)
    card = (folder / "MODEL_CARD.md").read_text()
    recorded = re.search(r"## MiniGenEval: ([0-9.]+)%\n\n(.+?)\.\n", card)
    assert recorded, "the model card records no MiniGenEval score"
    result = score_pipeline(folder)
    assert f"{100 * result.overall:.1f}" == recorded.group(1)
    categories = re.findall(r"(\w+) ([0-9.]+)%", recorded.group(2))
    assert len(categories) == 6, recorded.group(2)
    for category, accuracy in categories:
        assert f"{100 * result.per_category[category]:.1f}" == accuracy, category
    chance = re.search(r"Caption-blind chance \(.*?\): (.+?)\.\n", card)
    if name.endswith("-v2"):
        assert chance, "a v2 card states the caption-blind chance"
        stated = dict(re.findall(r"(\w+) ([0-9.]+)%", chance.group(1)))
        assert stated == {c: f"{100 * p:.3f}" for c, p in _chance(result.settings["world"]).items()}


def test_the_readme_quotes_every_shipped_models_recorded_score():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in ("toy-sd", "toy-sd-early", "toy-sdxl", "toy-sd3", "toy-sd-v2", "toy-sd-early-v2", "toy-sdxl-v2",
                 "toy-sd3-v2", "toy-sd-noisycap-v2"):
        card = (toy_model_path(name) / "MODEL_CARD.md").read_text()
        score = re.search(r"## MiniGenEval: ([0-9.]+)%", card).group(1)
        assert re.search(rf"{re.escape(name)} {re.escape(score)}%", readme), f"README does not quote {name} {score}%"
