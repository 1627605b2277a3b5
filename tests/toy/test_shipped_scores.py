"""A shipped model's MiniGenEval, rerun with the model card's settings, reproduces the score its card records."""

import re

import pytest

pytest.importorskip("diffusers")

from fastpref.models import toy_model_path  # noqa: E402
from fastpref.toy.pretrain import score_pipeline  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toy-sd", "toy-sd-early", "toy-sdxl", "toy-sd3"])
def test_shipped_model_reproduces_its_recorded_minigeneval_score(name):
    """The full recorded evaluation (34 held-out prompts x 4 seeds, 144 images; ~11-40 s each on 2 cores)."""
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


def test_the_readme_quotes_every_shipped_models_recorded_score():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in ("toy-sd", "toy-sd-early", "toy-sdxl", "toy-sd3"):
        card = (toy_model_path(name) / "MODEL_CARD.md").read_text()
        score = re.search(r"## MiniGenEval: ([0-9.]+)%", card).group(1)
        assert re.search(rf"{re.escape(name)} {re.escape(score)}%", readme), f"README does not quote {name} {score}%"
