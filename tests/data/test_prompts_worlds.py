"""Toy prompt sources of world v2 (`toy-v2:train`, `toy-v2:eval`, `toy-v2:train-balanced`) beside v1's `toy:*`."""

import pytest

from fastpref.data.prompts import PromptSource, read_prompts, toy_prompt_world
from fastpref.toy import world


def test_v2_splits_are_the_v2_worlds_captions_with_their_own_ids():
    train = read_prompts(PromptSource("toy-v2:train"))
    held_out = read_prompts(PromptSource("toy-v2:eval"))
    assert [p.text for p in train] == [s.caption for s in world.train_prompts("v2")]
    assert [p.text for p in held_out] == [s.caption for s in world.eval_prompts("v2")]
    assert train[0].id == "v2-train-00000" and held_out[0].id == "v2-eval-00000"
    assert not {p.text for p in train} & {p.text for p in held_out}
    # v1's ids seed images in existing datasets: they stay as they were
    assert read_prompts(PromptSource("toy:train"))[0].id == "train-00000"


def test_v2_balanced_split_takes_the_categories_in_turn():
    prompts = read_prompts(PromptSource("toy-v2:train-balanced", limit=60))
    categories = [world.parse_caption(p.text, "v2").category for p in prompts]
    assert categories[:6] == list(world.CATEGORIES)
    assert all(categories.count(c) == 10 for c in world.CATEGORIES)
    assert len({p.id for p in prompts}) == 60


def test_toy_prompt_world_names_the_world_and_refuses_unknown_ones():
    assert toy_prompt_world("toy:train") == "v1"
    assert toy_prompt_world("toy-v2:eval") == "v2"
    assert toy_prompt_world("prompts.txt") is None
    with pytest.raises(ValueError, match=r"'toy-v3:train'.*toy-v2:train-balanced"):
        read_prompts(PromptSource("toy-v3:train"))
    with pytest.raises(ValueError, match=r"'toy-v2:test'"):
        read_prompts(PromptSource("toy-v2:test"))


@pytest.mark.parametrize("world_name, prefix", [("v1", "toy"), ("v2", "toy-v2")])
@pytest.mark.parametrize("per_category", [12, 48])
def test_unscored_split_is_the_held_out_captions_minigeneval_does_not_score(world_name, prefix, per_category):
    from fastpref.eval.minigeneval import select_prompts

    unscored = [p.text for p in read_prompts(PromptSource(f"{prefix}:eval-unscored-{per_category}"))]
    scored = [s.caption for s in select_prompts(per_category, world_name)]
    held_out = [s.caption for s in world.eval_prompts(world_name)]
    assert unscored and not set(unscored) & set(scored)
    assert sorted(unscored + scored) == sorted(held_out)  # a partition of the held-out captions, nothing dropped
    assert unscored == [c for c in held_out if c not in set(scored)]  # in the held-out order


@pytest.mark.parametrize("split", ["eval-unscored-0", "eval-unscored-", "eval-unscored-x", "eval-unscored-12a"])
def test_unscored_split_needs_a_positive_count(split):
    with pytest.raises(ValueError, match=rf"'toy:{split}'.*toy:eval-unscored-N"):
        read_prompts(PromptSource(f"toy:{split}"))
