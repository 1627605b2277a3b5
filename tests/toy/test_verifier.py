"""The hand-written verifier (fastpref/toy/verifier.py)."""

import numpy as np
import pytest

from fastpref.toy import verifier, world


def _ground_truth(n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        spec = world.sample_spec(rng, "eval" if i % 2 else "train")
        image, objects = world.render_scene(spec, rng)
        yield rng, spec, image, objects


def test_accepts_ground_truth_renders():
    results = [verifier.verify(image, spec) for _, spec, image, _ in _ground_truth(2000, 0)]
    assert np.mean(results) >= 0.99


def test_detects_the_drawn_objects_exactly():
    for _, _, image, objects in _ground_truth(200, 1):
        detected = verifier.detect_objects(image)
        assert sorted((o.shape, o.color) for o in detected) == sorted((o.shape, o.color) for o in objects)
        want = sorted(o.centroid for o in objects)
        got = sorted(o.centroid for o in detected)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_rejects_captions_that_are_false_for_the_image():
    false_accepts = trials = 0
    for rng, spec, image, objects in _ground_truth(600, 2):
        wrong = world.one_attribute_variants(spec)
        wrong += [world.sample_spec(rng, "train") for _ in range(2)]
        for other in wrong:
            if all(verifier.check_objects(other, objects).values()):
                continue  # true of this image after all (e.g. "a circle" for a red circle alone)
            trials += 1
            false_accepts += verifier.verify(image, other)
    assert trials > 2000
    assert false_accepts / trials <= 0.005


def test_robust_to_blur_color_shift_and_noise():
    rng = np.random.default_rng(4)
    images, captions = world.sample_batch(rng, 400)
    degraded = world.degrade(images, rng, blur_sigma=0.8, color_shift=20, noise=8)
    passed = [r.passed for r in verifier.verify_batch(degraded, captions)]
    assert np.mean(passed) >= 0.95


def test_shape_features_are_blur_invariant():
    rng = np.random.default_rng(5)
    for shape in world.SHAPES:
        h, w = world._box_size(shape, 9)
        canvas = np.zeros((24, 24, 3), dtype=np.uint8)
        canvas[:] = world.BACKGROUND
        canvas[6 : 6 + h, 7 : 7 + w][world.shape_mask(shape, h, w)] = world.COLORS["red"]
        sharp = verifier.detect_objects(canvas)
        blurred = verifier.detect_objects(world.degrade(canvas, rng, blur_sigma=0.7, color_shift=0, noise=0))
        assert [o.shape for o in sharp] == [o.shape for o in blurred] == [shape]
        for key in ("skew_y", "k22"):
            assert blurred[0].features[key] == pytest.approx(sharp[0].features[key], abs=0.35)


def test_partial_credit_and_breakdown():
    rng = np.random.default_rng(6)
    spec = world.parse_caption("a red circle left of a blue square")
    image = world.render(spec, rng)
    result = verifier.verify_detailed(image, "a red circle right of a blue square")
    assert result.checks == {
        "count: a red circle": True,
        "count: a blue square": True,
        "relation: right of": False,
        "no extra objects": True,
    }
    assert result.score == pytest.approx(0.75) and not result.passed


def test_empty_and_noise_images_fail():
    rng = np.random.default_rng(7)
    blank = np.zeros((32, 32, 3), dtype=np.uint8)
    blank[:] = world.BACKGROUND
    noise = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    for spec in world.eval_prompts()[::10]:
        assert not verifier.verify(blank, spec)
        assert not verifier.verify(noise, spec)


def test_connected_components_match_a_flood_fill():
    rng = np.random.default_rng(8)
    for _ in range(20):
        mask = rng.random((17, 13)) < 0.45
        labels, count = verifier.connected_components(mask)
        # reference: breadth-first flood fill with 8-neighbourhood
        ref = -np.ones(mask.shape, dtype=int)
        n = 0
        for start in zip(*np.nonzero(mask)):
            if ref[start] >= 0:
                continue
            stack = [start]
            ref[start] = n
            while stack:
                y, x = stack.pop()
                for yy in range(y - 1, y + 2):
                    for xx in range(x - 1, x + 2):
                        if 0 <= yy < 17 and 0 <= xx < 13 and mask[yy, xx] and ref[yy, xx] < 0:
                            ref[yy, xx] = n
                            stack.append((yy, xx))
            n += 1
        assert count == n
        # same partition (labels may be numbered differently)
        pairs = set(zip(labels[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == n


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="uint8"):
        verifier.verify(np.zeros((32, 32, 3), dtype=np.float32), "a circle")
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        verifier.verify(np.zeros((3, 32, 32), dtype=np.uint8), "a circle")
    with pytest.raises(ValueError, match="hexagon"):
        verifier.verify(np.zeros((32, 32, 3), dtype=np.uint8), "a hexagon")


# ---------------------------------------------------------------------------------------------
# World v2: the same validation, with 8 shapes, 8 colors, sizes and up to 5 objects


def _v2_ground_truth(n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        spec = world.sample_spec(rng, "eval" if i % 2 else "train", "v2")
        image, objects = world.render_scene(spec, rng)
        yield rng, spec, image, objects


def test_v2_accepts_every_ground_truth_render_and_detects_it_exactly():
    for _, spec, image, objects in _v2_ground_truth(600, 10):
        result = verifier.verify_detailed(image, spec)
        detected = result.objects
        assert sorted((o.shape, o.color, o.size) for o in detected) == sorted((o.shape, o.color, o.size) for o in objects)
        np.testing.assert_allclose(sorted(o.centroid for o in detected), sorted(o.centroid for o in objects), atol=1e-6)
        assert result.passed, spec.caption  # 100%: every render, not 99%


def test_v2_never_accepts_a_one_attribute_off_caption():
    false_accepts = trials = 0
    for rng, spec, image, objects in _v2_ground_truth(300, 11):
        detected = verifier.detect_objects(image, world_name="v2")  # verify() = these checks on them
        wrong = world.one_attribute_variants(spec) + [world.sample_spec(rng, "train", "v2") for _ in range(2)]
        for other in wrong:
            if all(verifier.check_objects(other, objects).values()):
                continue  # true of this image after all
            trials += 1
            false_accepts += all(verifier.check_objects(other, detected).values())
    assert trials > 3000
    assert false_accepts == 0


@pytest.mark.parametrize("blur, shift, noise, at_least", [(0.8, 20, 8, 0.995), (1.0, 25, 10, 0.95)])
def test_v2_robust_to_blur_color_shift_and_noise(blur, shift, noise, at_least):
    """v1's degradation (measured: 100% of 1500 v2 images) and a harsher one (97.3%); reading colors by
    distance to the palette color instead of to its background-to-color segment gave 98.3% and 89.6%."""
    rng = np.random.default_rng(4)
    images, captions = world.sample_batch(rng, 400, world="v2")
    degraded = world.degrade(images, rng, blur_sigma=blur, color_shift=shift, noise=noise)
    specs = [world.parse_caption(c, "v2") for c in captions]
    passed = [r.passed for r in verifier.verify_batch(degraded, specs)]
    assert np.mean(passed) >= at_least


def test_v2_sizes_are_checked():
    """Independent of check_objects' own reading: the renderer draws a named size exactly, so another
    size word is false of the image."""
    rng = np.random.default_rng(16)
    sized = [s for s in world.eval_prompts("v2") + world.train_prompts("v2")[:300] if s.groups[0].size]
    assert len(sized) > 50
    for spec in sized:
        image = world.render(spec, rng)
        group = spec.groups[0]
        assert verifier.verify(image, spec)
        for size in set(world.V2.sizes) - {group.size}:
            other = world.PromptSpec(spec.category, (world.ObjectGroup(group.shape, group.color, 1, size),), None, "v2")
            assert not verifier.verify(image, other), (spec.caption, size)


def test_v2_one_attribute_off_is_rejected_on_degraded_images_too():
    rng = np.random.default_rng(12)
    false_accepts = trials = 0
    for _, spec, image, objects in _v2_ground_truth(300, 13):
        degraded = world.degrade(image, rng, blur_sigma=0.8, color_shift=20, noise=8)
        detected = verifier.detect_objects(degraded, world_name="v2")
        assert verifier.verify(degraded, spec) == all(verifier.check_objects(spec, detected).values())
        for other in world.one_attribute_variants(spec):
            if not all(verifier.check_objects(other, objects).values()):
                trials += 1
                false_accepts += all(verifier.check_objects(other, detected).values())
    assert trials > 1500 and false_accepts / trials <= 0.002


def test_v2_shapes_and_sizes_survive_blur_at_every_size():
    rng = np.random.default_rng(14)
    w = world.V2
    for shape in w.shapes:
        for size, (lo, hi) in w.sizes.items():
            for width in (lo, hi):
                h, bw = w.box_size(shape, width)
                canvas = np.zeros((32, 32, 3), dtype=np.uint8)
                canvas[:] = world.BACKGROUND
                canvas[8 : 8 + h, 9 : 9 + bw][world.shape_mask(shape, h, bw)] = w.colors["orange"]
                blurred = world.degrade(canvas, rng, blur_sigma=0.7, color_shift=0, noise=0)
                found = verifier.detect_objects(blurred, world_name="v2")
                assert [(o.shape, o.color, o.size) for o in found] == [(shape, "orange", size)], (shape, width)


def test_v2_blank_noise_and_v1_palette_mismatch():
    rng = np.random.default_rng(15)
    blank = np.zeros((32, 32, 3), dtype=np.uint8)
    blank[:] = world.BACKGROUND
    noise = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    for spec in world.eval_prompts("v2")[::97]:
        assert not verifier.verify(blank, spec) and not verifier.verify(noise, spec)
    # a v2 scene is judged with v2's words: a v1 caption parser does not know them
    with pytest.raises(ValueError, match="diamond"):
        verifier.verify(blank, "a diamond")
