"""Reading the shipped toy models' cards: their MiniGenEval per category and caption-blind chance."""

from __future__ import annotations

import math
import re

from fastpref import models
from fastpref.toy import world

WEIGHTS = models.TOY_WEIGHTS_DIR
# "clearly above chance": a category's hits on the card are this unlikely for a caption-blind generator (one-sided
# binomial tail at the category's caption-blind chance), fixed before the v2 models were scored
CHANCE_P_VALUE = 1e-3


def card_scores(name: str) -> tuple[dict[str, float], int, dict[str, float]]:
    """The card's per-category accuracies, its images per category (prompts per category x seeds) and the
    caption-blind chance per category it states (recomputed by tests/toy/test_shipped_scores.py)."""
    card = (WEIGHTS / name / "MODEL_CARD.md").read_text()
    recorded = re.search(r"## MiniGenEval: ([0-9.]+)%\n\n(.+?)\.\n\n(\d+) held-out prompts x (\d+) seeds", card)
    assert recorded, f"{name}: the model card records no MiniGenEval score"
    per_category = int(recorded.group(3)) // len(world.CATEGORIES) * int(recorded.group(4))
    chance = re.search(r"Caption-blind chance \(.*?\): (.+?)\.\n", card)
    assert chance, f"{name}: the model card states no caption-blind chance"

    def percentages(text: str) -> dict[str, float]:
        return {c: float(a) / 100 for c, a in re.findall(r"(\w+) ([0-9.]+)%", text)}

    return percentages(recorded.group(2)), per_category, percentages(chance.group(1))


def binomial_tail(hits: int, trials: int, p: float) -> float:
    """P(X >= hits) for X ~ Binomial(trials, p)."""
    return sum(math.comb(trials, k) * p**k * (1 - p) ** (trials - k) for k in range(hits, trials + 1))
