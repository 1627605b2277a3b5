"""The toy world's grammar, renderer and split (fastpref/toy/world.py)."""

import numpy as np
import pytest

from fastpref.toy import verifier, world


def test_every_caption_round_trips_through_parse_caption():
    for spec in world.train_prompts() + world.eval_prompts():
        assert world.parse_caption(spec.caption) == spec
        assert set(spec.caption.split()) <= set(world.vocabulary())


def test_categories_cover_geneval_and_each_split():
    for prompts in (world.train_prompts(), world.eval_prompts()):
        assert {s.category for s in prompts} == set(world.CATEGORIES)


@pytest.mark.parametrize(
    "caption, word",
    [
        ("a purple circle", "purple"),
        ("one circle", "one"),
        ("three circle", "circle"),
        ("a circle beside a square", "beside"),
        ("a red circle left a blue square", "a"),
        ("a circle and", "ends"),
        ("a red circle and a red square", "different colors"),
        ("four red circles", "counting"),
    ],
)
def test_parse_caption_names_the_bad_word(caption, word):
    with pytest.raises(ValueError, match=word):
        world.parse_caption(caption)


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="category"):
        world.PromptSpec("colours", (world.ObjectGroup("circle", "red"),))
    with pytest.raises(ValueError, match="relation"):
        world.PromptSpec("color_attr", (world.ObjectGroup("circle", "red"), world.ObjectGroup("square", "blue")), "above")
    with pytest.raises(ValueError, match="shape"):
        world.ObjectGroup("hexagon", None)


def test_splits_are_disjoint_deterministic_and_every_word_is_trained():
    train, held_out = world.train_prompts(), world.eval_prompts()
    assert train == world.train_prompts() and held_out == world.eval_prompts()
    assert not {s.caption for s in train} & {s.caption for s in held_out}
    train_words = {word for s in train for word in s.caption.split()}
    assert train_words == set(world.vocabulary())


def test_held_out_color_shape_pairs_never_appear_in_training_captions():
    train_pairs = {(g.color, g.shape) for s in world.train_prompts() for g in s.groups}
    assert not train_pairs & world.HELD_OUT_COLOR_SHAPES
    eval_colored = [s for s in world.eval_prompts() if s.category in ("colors", "position", "color_attr")]
    assert all(any((g.color, g.shape) in world.HELD_OUT_COLOR_SHAPES for g in s.groups) for s in eval_colored)
    # each held-out color and shape still appears in training with other partners
    for color, shape in world.HELD_OUT_COLOR_SHAPES:
        assert any(c == color for c, _ in train_pairs) and any(s == shape for _, s in train_pairs)


def test_sample_spec_respects_the_split_and_is_deterministic():
    rng = np.random.default_rng(3)
    train = set(world.train_prompts())
    held_out = set(world.eval_prompts())
    assert all(world.sample_spec(rng, "train") in train for _ in range(300))
    assert all(world.sample_spec(rng, "eval") in held_out for _ in range(300))
    with pytest.raises(ValueError, match="split"):
        world.sample_spec(rng, "test")
    a = world.sample_batch(np.random.default_rng(7), 16)
    b = world.sample_batch(np.random.default_rng(7), 16)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_renders_satisfy_their_spec_and_keep_objects_apart():
    rng = np.random.default_rng(0)
    for _ in range(400):
        spec = world.sample_spec(rng, "train" if rng.random() < 0.5 else "eval")
        image, objects = world.render_scene(spec, rng)
        assert image.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and image.dtype == np.uint8
        assert len(objects) == spec.num_objects
        assert all(verifier.check_objects(spec, objects).values())
        assert verifier.verify(image, spec)
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                gap_y = max(b.top - a.bottom, a.top - b.bottom)
                gap_x = max(b.left - a.right, a.left - b.right)
                assert max(gap_x, gap_y) >= world.MIN_GAP


def test_render_other_sizes():
    rng = np.random.default_rng(1)
    for size in (24, 64):
        spec = world.parse_caption("four triangles")
        image = world.render(spec, rng, size=size)
        assert image.shape == (size, size, 3)
        assert verifier.verify(image, spec)


def test_relation_rule_matches_geneval_on_simple_offsets():
    unit = (2, 2)
    assert world.relation_holds((0, 0), unit, (10, 0), unit, "left of")
    assert world.relation_holds((0, 0), unit, (0, 10), unit, "above")
    assert not world.relation_holds((0, 0), unit, (10, 0), unit, "right of")
    # 45 degrees: both "left of" and "above" (GenEval's 60-degree cone), offset 10 >> threshold
    assert world.relation_holds((0, 0), unit, (10, 10), unit, "left of")
    assert world.relation_holds((0, 0), unit, (10, 10), unit, "above")
    # offsets inside 10% of the summed sizes do not count
    assert not world.relation_holds((0, 0), (20, 20), (3, 0), (20, 20), "left of")


def test_one_attribute_variants_change_exactly_one_thing():
    spec = world.parse_caption("a red circle left of a blue square")
    variants = world.one_attribute_variants(spec)
    captions = {v.caption for v in variants}
    assert "a red circle right of a blue square" in captions
    assert "a blue square left of a red circle" in captions
    assert "a red triangle left of a blue square" in captions
    assert spec not in variants and len(captions) == len(variants)
    for v in variants:
        assert v.category == spec.category
        changed = sum(a != b for a, b in zip(v.groups, spec.groups)) + (v.relation != spec.relation)
        assert changed == 1 or v.groups == spec.groups[::-1]


# ---------------------------------------------------------------------------------------------
# Worlds: v1 kept bit-identical, v2 large enough for a held-out split per category


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]


def test_v1_is_unchanged_bit_for_bit():
    """Digests taken before the v2 world was added: v1's prompt lists, variants, renders, degrade and reprs."""
    assert world.get_world("v1") is world.V1 and world.V1.shapes == world.SHAPES and world.V1.colors is world.COLORS
    assert _digest("\n".join(s.caption for s in world.train_prompts()).encode()) == "56d2300fc22d2e6a"
    assert _digest("\n".join(s.caption for s in world.eval_prompts()).encode()) == "8ffbb3e35341d0de"
    assert _digest(" ".join(world.vocabulary()).encode()) == "393aa8f61062b46d"
    images, captions = world.sample_batch(np.random.default_rng(123), 64)
    assert _digest(images.tobytes() + "\n".join(captions).encode()) == "9fff434b5fc7600c"
    spec = world.parse_caption("a red circle left of a blue square")
    assert _digest(world.render(spec, np.random.default_rng(5)).tobytes()) == "0b36bacdc0c95f93"
    variants = [v.caption for s in world.eval_prompts() for v in world.one_attribute_variants(s)]
    assert _digest("\n".join(variants).encode()) == "4d1cfa3037e906db"
    assert _digest(world.degrade(images, np.random.default_rng(1)).tobytes()) == "816c52c58ea637cc"
    four = world.render(world.parse_caption("four triangles"), np.random.default_rng(2), size=64)
    assert _digest(four.tobytes()) == "788547c5717d9285"
    assert _digest(repr(world.eval_prompts()[:50]).encode()) == "7a76a8b026629378"


def test_v2_split_has_at_least_24_held_out_prompts_per_category():
    train, held_out = world.train_prompts("v2"), world.eval_prompts("v2")
    counts = {c: (sum(s.category == c for s in train), sum(s.category == c for s in held_out)) for c in world.CATEGORIES}
    assert counts == {"single_object": (8, 24), "colors": (224, 32), "counting": (192, 96), "two_objects": (28, 28),
                      "position": (12320, 3808), "color_attr": (2408, 728)}
    assert all(s.world == "v2" for s in train + held_out)
    train_captions = {s.caption for s in train}
    assert not train_captions & {s.caption for s in held_out}
    # "no training caption contains it": not even as the phrase of an object inside a longer caption
    phrases = {g.phrase for s in train for g in s.groups}
    assert not phrases & {s.caption for s in held_out if len(s.groups) == 1}
    # every word is trained, in v2's vocabulary; v1 words keep their v1 meaning
    assert {word for s in train for word in s.caption.split()} == set(world.vocabulary("v2"))
    assert set(world.vocabulary("v1")) < set(world.vocabulary("v2"))
    assert len(world.V2.shapes) == len(world.V2.colors) == 8 and world.V2.max_objects == 5


def test_v2_held_out_bindings_never_appear_in_training_captions():
    w = world.V2
    train = world.train_prompts("v2")
    color_shapes = {(g.color, g.shape) for s in train for g in s.groups}
    assert not color_shapes & w.held_out_color_shapes
    count_shapes = {(s.groups[0].count, s.groups[0].shape) for s in train if s.category == "counting"}
    assert not count_shapes & w.held_out_count_shapes
    assert not any(g.size for s in train if s.category == "single_object" for g in s.groups)
    ordered = {(s.groups[0].shape, s.groups[1].shape) for s in train if s.category == "two_objects"}
    assert len(ordered) == 28 and not {(b, a) for a, b in ordered} & ordered
    # each held-out color, shape, count and size still appears in training with other partners
    for color, shape in w.held_out_color_shapes:
        assert any(c == color for c, _ in color_shapes) and any(s == shape for _, s in color_shapes)
    for count, shape in w.held_out_count_shapes:
        assert any(n == count for n, _ in count_shapes) and any(s == shape for _, s in count_shapes)
    sized = {(g.size, g.shape) for s in train for g in s.groups if g.size}
    assert sized == {(z, s) for z in w.sizes for s in w.shapes}  # "a small red circle" is trained
    for spec in world.eval_prompts("v2"):
        assert world.is_held_out(spec)


def test_v2_captions_round_trip_and_parse_errors_name_the_word():
    for spec in world.train_prompts("v2")[::7] + world.eval_prompts("v2")[::3]:
        assert world.parse_caption(spec.caption, "v2") == spec
    assert world.parse_caption("five red crosses", "v2").groups[0] == world.ObjectGroup("cross", "red", 5)
    assert world.parse_caption("a large white bar", "v2").groups[0] == world.ObjectGroup("bar", "white", 1, "large")
    assert world.parse_caption("an orange ring", "v2").caption == "an orange ring"
    for caption, word in [("a orange ring", "orange"), ("an ring", "an"), ("five circles", "five"),
                          ("a small circle left of a red square", "size"), ("three small circles", "size"),
                          ("a hexagon", "hexagon"), ("a small red circle and a blue square", "size")]:
        with pytest.raises(ValueError, match=word):
            world.parse_caption(caption, "v2" if caption != "five circles" else "v1")
    with pytest.raises(ValueError, match="world"):
        world.train_prompts("v3")
    with pytest.raises(ValueError, match="world v1"):
        world.PromptSpec("colors", (world.ObjectGroup("diamond", "red"),))


def test_v2_renders_satisfy_their_spec_with_definite_sizes():
    rng = np.random.default_rng(0)
    w = world.V2
    seen_sizes = set()
    for _ in range(600):
        spec = world.sample_spec(rng, "train" if rng.random() < 0.5 else "eval", "v2")
        image, objects = world.render_scene(spec, rng)
        assert image.shape == (32, 32, 3) and len(objects) == spec.num_objects
        assert all(verifier.check_objects(spec, objects).values())
        palette = {tuple(c) for c in w.colors.values()} | {world.BACKGROUND}
        assert {tuple(p) for p in image.reshape(-1, 3)} <= palette
        for o in objects:
            lo, hi = w.sizes[o.size]
            assert lo <= o.right - o.left <= hi and w.size_of_width(o.right - o.left) == o.size
            seen_sizes.add(o.size)
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                assert max(b.top - a.bottom, a.top - b.bottom, b.left - a.right, a.left - b.right) >= world.MIN_GAP
    assert seen_sizes == set(w.sizes)
    for count in (2, 3, 4, 5):  # the most crowded scenes always find a layout
        for shape in w.shapes:
            world.render(world.PromptSpec("counting", (world.ObjectGroup(shape, None, count),), None, "v2"), rng)


def test_v2_one_attribute_variants_include_sizes_and_colored_counts():
    spec = world.parse_caption("a small red circle", "v2")
    captions = {v.caption for v in world.one_attribute_variants(spec)}
    assert {"a large red circle", "a small blue circle", "a small red heart"} <= captions
    counted = {v.caption for v in world.one_attribute_variants(world.parse_caption("three red crosses", "v2"))}
    assert {"five red crosses", "three white crosses", "three red rings"} <= counted
    assert all(v.world == "v2" for v in world.one_attribute_variants(spec))


def test_v2_words_are_single_tokens_and_every_caption_fits_the_tokenizer():
    pytest.importorskip("transformers")
    from fastpref.toy.tokenizer import DEFAULT_MAX_LENGTH, build_tokenizer, check_word_level

    tokenizer = build_tokenizer(world_name="v2")
    check_word_level(tokenizer, world.vocabulary("v2"))
    longest = max((s.caption for s in world.train_prompts("v2") + world.eval_prompts("v2")), key=lambda c: len(c.split()))
    assert len(longest.split()) + 2 <= DEFAULT_MAX_LENGTH  # bos + words + eos, never truncated
    assert tokenizer(longest)["input_ids"][1:-1] == tokenizer.convert_tokens_to_ids([w + "</w>" for w in longest.split()])
