"""MiniGenEval (fastpref/eval/minigeneval.py) and its PNG grids (fastpref/eval/grids.py)."""

import json

import numpy as np
import pytest

from fastpref.eval import grids, minigeneval
from fastpref.toy import world


def _wrong_spec_generate(captions, seeds):
    """Renders, for each caption, a one-attribute variant of it (or another caption): always false."""
    out = []
    for caption, seed in zip(captions, seeds):
        spec = world.parse_caption(caption)
        rng = np.random.default_rng(seed)
        variants = world.one_attribute_variants(spec)
        out.append(world.render(variants[int(rng.integers(len(variants)))], rng))
    return np.stack(out)


def _noise_generate(captions, seeds):
    return np.stack([np.random.default_rng(s).integers(0, 256, (32, 32, 3), dtype=np.uint8) for s in seeds])


def test_ground_truth_scores_about_100_percent():
    result = minigeneval.evaluate(minigeneval.world_generate, seeds_per_prompt=2, min_images_per_category=0)
    assert result.overall >= 0.99
    assert set(result.per_category) == set(world.CATEGORIES)
    assert result.num_images == 2 * result.settings["num_prompts"]


def test_small_categories_get_more_seeds():
    result = minigeneval.evaluate(minigeneval.world_generate, seeds_per_prompt=2, min_images_per_category=12)
    images_per_category = {c: sum(s.category == c for s in result.samples) for c in world.CATEGORIES}
    assert all(n >= 12 for n in images_per_category.values())
    assert images_per_category["single_object"] == 12  # one held-out prompt, 12 seeds
    assert result.settings["seeds_per_prompt_by_category"]["position"] == 2


@pytest.mark.parametrize("generate", [_wrong_spec_generate, _noise_generate])
def test_wrong_images_score_near_zero(generate):
    result = minigeneval.evaluate(generate, seeds_per_prompt=2)
    assert result.overall <= 0.05


def test_prompts_are_held_out_fixed_and_capped():
    specs = minigeneval.select_prompts(5)
    assert specs == minigeneval.select_prompts(5)
    assert set(specs) <= set(world.eval_prompts())
    assert not set(specs) & set(world.train_prompts())
    for category in world.CATEGORIES:
        available = sum(s.category == category for s in world.eval_prompts())
        assert sum(s.category == category for s in specs) == min(5, available)
    assert len(minigeneval.select_prompts(None)) == len(world.eval_prompts())


@pytest.mark.parametrize("world_name", ["v1", "v2"])
def test_the_train_split_picks_training_captions_the_same_way(world_name):
    specs = minigeneval.select_prompts(5, world_name, split="train")
    assert specs == minigeneval.select_prompts(5, world_name, split="train")
    assert set(specs) <= set(world.train_prompts(world_name))
    assert not set(specs) & set(world.eval_prompts(world_name))
    for category in world.CATEGORIES:
        available = sum(s.category == category for s in world.train_prompts(world_name))
        assert sum(s.category == category for s in specs) == min(5, available) > 0
    result = minigeneval.evaluate(minigeneval.world_generate if world_name == "v1" else
                                  lambda c, s: minigeneval.world_generate(c, s, world_name=world_name),
                                  seeds_per_prompt=1, max_prompts_per_category=2, min_images_per_category=1,
                                  world_name=world_name, split="train")
    assert result.settings["split"] == "train" and result.overall == 1.0  # the renderer draws what it is told
    assert {s.caption for s in result.samples} <= {s.caption for s in world.train_prompts(world_name)}
    with pytest.raises(ValueError, match="split: 'test' is not one of"):
        minigeneval.select_prompts(5, world_name, split="test")


def test_eval_config_refuses_an_unknown_split_naming_the_key():
    from fastpref.config import ConfigError, from_dict
    from fastpref.pipeline import EvalConfig

    with pytest.raises(ConfigError, match="split"):
        from_dict(EvalConfig, {"split": "validation"}).validate()


def _luck_of_the_seed(captions, seeds):
    """Each image right or wrong by its seed alone (a fair coin of the seed): under shared noise, every prompt of
    an evaluation seed draws the same coin."""
    right = minigeneval.world_generate(captions, seeds)
    wrong = _wrong_spec_generate(captions, seeds)
    return np.stack([r if np.random.default_rng(s).random() < 0.5 else w for r, w, s in zip(right, wrong, seeds)])


def test_per_prompt_noise_gives_each_prompt_its_own_seeds_in_the_same_folds():
    captions = [s.caption for s in minigeneval.select_prompts(12)]
    for spp in (1, 2, 4):
        shared = {c: [minigeneval.image_seed(c, i, 2000, spp) for i in range(spp)] for c in captions}
        assert all(seeds == list(range(2000, 2000 + spp)) for seeds in shared.values())
        own = {c: [minigeneval.image_seed(c, i, 2000, spp, "per_prompt") for i in range(3 * spp)] for c in captions}
        assert len({x for seeds in own.values() for x in seeds}) == 3 * spp * len(captions)  # no noise shared
        for seeds in own.values():  # seed_scores / the studies fold by (seed - offset) % seeds_per_prompt
            assert [(x - 2000) % spp for x in seeds] == [i % spp for i in range(3 * spp)]
        other_offset = {minigeneval.image_seed(c, i, 5000, spp, "per_prompt") for c in captions for i in range(spp)}
        assert not other_offset & {x for seeds in own.values() for x in seeds}  # sweep seeds never the eval's
    with pytest.raises(ValueError, match="noise: 'fresh' is not one of"):
        minigeneval.image_seed(captions[0], 0, 0, 1, "fresh")


def test_per_prompt_noise_shrinks_the_evaluation_seed_spread_of_a_seed_driven_model():
    """A model whose images succeed by the luck of their seed: with shared noise an evaluation seed is all luck or
    none (its per-seed score swings), with per-prompt noise each seed's score averages the prompts' own luck."""
    kwargs = dict(seeds_per_prompt=4, max_prompts_per_category=12, min_images_per_category=0, seed_offset=2000)
    shared = minigeneval.evaluate(_luck_of_the_seed, **kwargs)
    own = minigeneval.evaluate(_luck_of_the_seed, noise="per_prompt", **kwargs)
    assert own.settings["noise"] == "per_prompt" and shared.settings["noise"] == "shared"
    assert len(own.seed_scores()) == len(shared.seed_scores()) == 4
    assert set(np.round(shared.seed_scores(), 6)) <= {0.0, 1.0}  # the verifier is exact on these images
    assert own.seed_spread() < 0.25 < shared.seed_spread()
    assert 0.3 < own.overall < 0.7  # the coin is fair over the prompts' own seeds
    again = minigeneval.evaluate(_luck_of_the_seed, noise="per_prompt", batch_size=5, **kwargs)
    assert again.to_json()["samples"] == own.to_json()["samples"]  # deterministic, whatever the batching


def test_the_grid_of_a_per_prompt_evaluation_shows_each_prompt_at_its_first_seed(tmp_path):
    kwargs = dict(seeds_per_prompt=2, max_prompts_per_category=2, min_images_per_category=0, noise="per_prompt")
    results = {"noisy": minigeneval.evaluate(_seeded_noisy_world, **kwargs),
               "world": minigeneval.evaluate(minigeneval.world_generate, **kwargs)}
    path = minigeneval.save_comparison_grid(results, tmp_path / "grid.png", per_category=1)
    assert path.is_file() and path.stat().st_size > 0
    specs = minigeneval.select_prompts(2)
    for caption, seed in minigeneval.grid_columns(specs, 1, 0, 2, "per_prompt"):
        assert seed == minigeneval.image_seed(caption, 0, 0, 2, "per_prompt") != 0
        assert np.array_equal(results["world"].image_of(caption, seed), minigeneval.world_generate([caption], [seed])[0])


def test_eval_config_noise_is_checked_and_part_of_the_evaluation_identity():
    from fastpref.config import ConfigError, from_dict
    from fastpref.pipeline import EvalConfig, eval_identity

    with pytest.raises(ConfigError, match="noise: 'fresh'"):
        from_dict(EvalConfig, {"noise": "fresh"}).validate()
    assert "noise" not in eval_identity(EvalConfig())  # evaluations stored before the choice existed stay valid
    assert eval_identity(EvalConfig(noise="per_prompt"))["noise"] == "per_prompt"


def _seeded_noisy_world(captions, seeds):
    """Imperfect images that depend only on (caption, seed): some fail, deterministically."""
    images = minigeneval.world_generate(captions, seeds)
    return np.stack([world.degrade(img, np.random.default_rng(s + 99), 1.1, 25, 10) for img, s in zip(images, seeds)])


def test_results_are_deterministic_and_independent_of_batching():
    a = minigeneval.evaluate(_seeded_noisy_world, seeds_per_prompt=3, batch_size=64)
    b = minigeneval.evaluate(_seeded_noisy_world, seeds_per_prompt=3, batch_size=7)
    assert 0.3 < a.overall < 1.0  # some images fail: the comparison is not trivially all-pass
    assert a.to_json()["samples"] == b.to_json()["samples"]
    assert a.per_category == b.per_category and np.array_equal(a.images, b.images)
    c = minigeneval.evaluate(_seeded_noisy_world, seeds_per_prompt=3, seed_offset=100)
    assert [s.passed for s in c.samples] != [s.passed for s in a.samples]


def test_overall_is_the_mean_of_categories():
    result = minigeneval.evaluate(_seeded_noisy_world, seeds_per_prompt=2)
    for category, accuracy in result.per_category.items():
        outcomes = [s.passed for s in result.samples if s.category == category]
        assert accuracy == pytest.approx(np.mean(outcomes))
    assert result.overall == pytest.approx(np.mean(list(result.per_category.values())))


def test_generate_output_is_checked():
    with pytest.raises(ValueError, match="uint8"):
        minigeneval.evaluate(lambda c, s: np.zeros((len(c), 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="generate"):
        minigeneval.evaluate(lambda c, s: np.zeros((1, 32, 32, 3), dtype=np.uint8), batch_size=4)


class _FakePipeline:
    """Stands in for a diffusers pipeline: renders each prompt's ground truth from its generator's seed."""

    def __init__(self):
        self.calls = []

    def set_progress_bar_config(self, **kwargs):
        self.progress = kwargs

    def __call__(self, prompt, generator, num_inference_steps, guidance_scale, output_type):
        from types import SimpleNamespace

        self.calls.append(dict(prompt=prompt, steps=num_inference_steps, guidance=guidance_scale, output_type=output_type))
        assert isinstance(generator, list) and len(generator) == len(prompt)
        seeds = [g.initial_seed() for g in generator]
        images = minigeneval.world_generate(prompt, seeds).astype(np.float32) / 255.0
        return SimpleNamespace(images=images)


def test_diffusers_adapter_passes_per_image_generators_and_converts():
    pipeline = _FakePipeline()
    generate = minigeneval.DiffusersGenerate(pipeline, num_inference_steps=7, guidance_scale=3.5)
    result = minigeneval.evaluate(generate, seeds_per_prompt=2, batch_size=16)
    assert result.overall >= 0.99
    assert pipeline.progress == {"disable": True}
    assert all(c["steps"] == 7 and c["guidance"] == 3.5 and c["output_type"] == "np" for c in pipeline.calls)
    assert max(len(c["prompt"]) for c in pipeline.calls) == 16
    reference = minigeneval.evaluate(minigeneval.world_generate, seeds_per_prompt=2)
    assert np.array_equal(result.images, reference.images)


def test_diffusers_from_pretrained_names_the_missing_folder(tmp_path):
    pytest.importorskip("diffusers")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        minigeneval.DiffusersGenerate.from_pretrained(tmp_path)


def test_cli_writes_json_and_grid(tmp_path):
    out = tmp_path / "mge"
    assert minigeneval.cli(["--model", "world", "--out", str(out), "--seeds", "2", "--max-prompts-per-category", "3"]) == 0
    data = json.loads((out / "world.json").read_text())
    assert data["overall"] == pytest.approx(1.0) and data["num_images"] == len(data["samples"])
    assert data["settings"]["prompts_per_category"]["position"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"]["overall"] == pytest.approx(1.0)
    assert summary["world"]["prompt_mean"] == pytest.approx(1.0)
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.width > 12 * 32 * 4  # 12 upscaled columns
    assert grid.height > 32 * 4


def test_grid_layout_and_errors():
    images = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    grid = grids.make_grid([("a", images), ("b", images)], ["x", "y", "z"], passed=[[1, 0, 1], [0, 0, 1]], scale=3)
    assert grid.width >= 3 * 32 * 3 and grid.height >= 2 * 32 * 3
    pixels = np.asarray(grid)
    assert (pixels == grids.PASS_COLOR).all(-1).any() and (pixels == grids.FAIL_COLOR).all(-1).any()
    with pytest.raises(ValueError, match="row 'b'"):
        grids.make_grid([("a", images), ("b", images[:2])], ["x", "y", "z"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_diffusers_adapter_on_real_tiny_pipelines_is_batch_invariant(family):
    """The adapter's call matches the real SD / SDXL / SD3 pipelines, and per-image generators make
    each image independent of how the prompts were batched."""
    diffusers = pytest.importorskip("diffusers")
    import importlib

    from fastpref.models.bundle import toy_vae_config
    from fastpref.toy.tokenizer import build_tokenizer

    module = importlib.import_module(f"fastpref.models.{family}")
    # SD3's pipeline un-shifts latents with the VAE's shift_factor, which must be a number
    vae = diffusers.AutoencoderKL(**toy_vae_config("tiny"), shift_factor=0.0)
    bundle = module.build_random(module.tiny_config("tiny"), build_tokenizer(), vae=vae, seed=0)
    generate = minigeneval.DiffusersGenerate(bundle.pipeline, num_inference_steps=2, guidance_scale=3.0)
    kwargs = dict(seeds_per_prompt=1, max_prompts_per_category=1, min_images_per_category=0)
    together = minigeneval.evaluate(generate, batch_size=6, **kwargs)
    apart = minigeneval.evaluate(generate, batch_size=2, **kwargs)
    assert together.images.shape == (6, 32, 32, 3) and together.images.dtype == np.uint8
    assert together.images.std() > 0  # a real (random-weight) image, not a constant
    # equal up to rounding: batched float kernels may sum in another order (seen in SD3: 1 level)
    np.testing.assert_allclose(together.images.astype(int), apart.images.astype(int), rtol=0, atol=1)


def _right_on_even_seeds_generate(captions, seeds):
    """Ground truth on even seeds, a wrong variant on odd ones: seed folds score 100% and 0%."""
    right = minigeneval.world_generate(captions, seeds)
    wrong = _wrong_spec_generate(captions, seeds)
    even = (np.asarray(seeds) % 2 == 0)[:, None, None, None]
    return np.where(even, right, wrong)


def test_seed_scores_split_by_seed_and_give_the_spread():
    result = minigeneval.evaluate(_right_on_even_seeds_generate, seeds_per_prompt=2, seed_offset=10,
                                  min_images_per_category=0)
    scores = result.seed_scores()
    assert len(scores) == 2
    assert scores[0] > 0.95 and scores[1] < 0.05
    assert np.mean(scores) == pytest.approx(result.overall)
    assert result.seed_spread() == pytest.approx(np.std(scores, ddof=1))
    saved = result.to_json()
    assert saved["seed_scores"] == scores and saved["seed_spread"] == result.seed_spread()
    single = minigeneval.evaluate(minigeneval.world_generate, seeds_per_prompt=1, min_images_per_category=0)
    assert single.seed_spread() == 0.0


# ---------------------------------------------------------------------------------------------
# Statistics: prompt-weighted mean and the paired bootstrap


def _result_of(outcomes, categories=None, seed_offset=0):
    """A MiniGenEvalResult from hand-made outcomes: outcomes[p][s] for prompt p at seed s."""
    samples = [minigeneval.Sample(f"prompt {p}", categories[p] if categories else "colors", seed_offset + s, bool(x), {})
               for p, row in enumerate(outcomes) for s, x in enumerate(row)]
    per_category = {}
    for sample in samples:
        per_category.setdefault(sample.category, []).append(sample.passed)
    per_category = {c: float(np.mean(v)) for c, v in per_category.items()}
    return minigeneval.MiniGenEvalResult(float(np.mean(list(per_category.values()))), per_category, len(samples),
                                         {"seeds_per_prompt": 1, "seed_offset": seed_offset}, samples)


def test_prompt_mean_weighs_every_prompt_equally():
    # one prompt in "single_object" (all pass), three in "position" (all fail), two seeds each
    result = _result_of([[1, 1], [0, 0], [0, 0], [0, 0]], ["single_object"] + ["position"] * 3)
    assert result.overall == pytest.approx(0.5)  # category mean: (1 + 0) / 2
    assert result.prompt_mean() == pytest.approx(0.25)  # 1 of 4 prompts
    assert result.to_json()["prompt_mean"] == pytest.approx(0.25)


def test_identical_models_give_an_interval_of_exactly_zero():
    rng = np.random.default_rng(0)
    outcomes = rng.integers(0, 2, (40, 3))
    interval = minigeneval.bootstrap_difference(outcomes, outcomes)
    assert (interval.difference, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert minigeneval.verdict(interval) == "not shown: interval contains zero"


def test_a_model_right_where_the_other_is_wrong_everywhere_gives_exactly_one():
    interval = minigeneval.bootstrap_difference(np.ones((12, 2)), np.zeros((12, 2)))
    assert (interval.difference, interval.low, interval.high) == (1.0, 1.0, 1.0)
    assert minigeneval.verdict(interval, "dpo") == "better than dpo: interval above zero"
    worse = minigeneval.bootstrap_difference(np.zeros((12, 2)), np.ones((12, 2)))
    assert minigeneval.verdict(worse) == "worse than the base: interval below zero"


def test_better_on_every_prompt_but_noisy_is_above_zero_and_a_coin_flip_is_not():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, (30, 4))
    base[:, 0] = 0  # every prompt fails at least once ...
    better = base.copy()
    for p in range(30):  # ... and the better model turns exactly one failure of each prompt into a pass
        better[p, rng.choice(np.flatnonzero(base[p] == 0))] = 1
    assert (better.mean(1) > base.mean(1)).all()
    assert minigeneval.bootstrap_difference(better, base).low > 0.0
    coin = rng.integers(0, 2, (30, 4))
    interval = minigeneval.bootstrap_difference(coin, rng.integers(0, 2, (30, 4)))
    assert interval.low < 0.0 < interval.high


def test_prompt_resampling_matches_the_normal_standard_error():
    """One seed per prompt: the bootstrap of a mean is close to +-1.96 standard errors (known answer)."""
    rng = np.random.default_rng(2)
    d = rng.normal(0.1, 1.0, 900)
    interval = minigeneval.bootstrap_difference(d[:, None], np.zeros((900, 1)))
    se = d.std() / np.sqrt(len(d))
    assert interval.difference == pytest.approx(d.mean())
    assert interval.low == pytest.approx(d.mean() - 1.96 * se, abs=0.1 * se)
    assert interval.high == pytest.approx(d.mean() + 1.96 * se, abs=0.1 * se)


def test_seeds_are_redrawn_within_each_prompt():
    # every prompt's mean difference is 0.5 (one of two seeds flips): resampling prompts alone would
    # give [0.5, 0.5]; redrawing the seeds within each prompt spreads it (binomial: sd 0.5 / sqrt(2 P))
    a, b = np.tile([1, 0], (50, 1)), np.zeros((50, 2))
    interval = minigeneval.bootstrap_difference(a, b)
    sd = 0.5 / np.sqrt(2 * 50)
    assert interval.difference == 0.5
    assert interval.low == pytest.approx(0.5 - 1.96 * sd, abs=0.15 * sd)
    assert interval.high == pytest.approx(0.5 + 1.96 * sd, abs=0.15 * sd)


def test_bootstrap_reproduces_with_its_seed_and_handles_ragged_seed_counts():
    rng = np.random.default_rng(3)
    a = [rng.integers(0, 2, n) for n in (12, 2, 2, 3, 2, 2)]
    b = [rng.integers(0, 2, n) for n in (12, 2, 2, 3, 2, 2)]
    first, again = minigeneval.bootstrap_difference(a, b, seed=5), minigeneval.bootstrap_difference(a, b, seed=5)
    assert first == again
    assert minigeneval.bootstrap_difference(a, b, seed=6) != first
    assert first.difference == pytest.approx(np.mean([x.mean() - y.mean() for x, y in zip(a, b)]))
    with pytest.raises(ValueError, match="prompt 1"):
        minigeneval.bootstrap_difference(a, [b[0], b[1][:1], *b[2:]])


def test_paired_bootstrap_of_results_matches_their_means_and_checks_pairing():
    rng = np.random.default_rng(4)
    categories = ["single_object"] + ["colors"] * 4 + ["position"] * 10
    a = _result_of(rng.integers(0, 2, (15, 3)), categories)
    b = _result_of(rng.integers(0, 2, (15, 3)), categories)
    by_prompt = minigeneval.paired_bootstrap(a, b, "prompt_mean")
    by_category = minigeneval.paired_bootstrap(a, b, "category_mean")
    assert by_prompt.difference == pytest.approx(a.prompt_mean() - b.prompt_mean())
    assert by_category.difference == pytest.approx(a.overall - b.overall)
    assert by_category.low <= by_category.difference <= by_category.high
    with pytest.raises(ValueError, match="statistic"):
        minigeneval.paired_bootstrap(a, b, "overall")
    shifted = _result_of(rng.integers(0, 2, (15, 3)), categories, seed_offset=1)
    with pytest.raises(ValueError, match=r"same prompts and seeds .*prompt 0"):
        minigeneval.paired_bootstrap(a, shifted)


def test_cli_pairs_every_model_with_the_first(tmp_path, monkeypatch):
    out = tmp_path / "mge"
    wrong = minigeneval.DiffusersGenerate  # "--model x" is loaded with from_pretrained: make it the wrong renderer
    monkeypatch.setattr(wrong, "from_pretrained", classmethod(lambda cls, *a, **k: _wrong_spec_generate))
    args = ["--model", "world", "--model", "wrong", "--out", str(out), "--seeds", "1", "--max-prompts-per-category", "2"]
    assert minigeneval.cli(args) == 0
    paired = json.loads((out / "summary.json").read_text())["wrong"]["paired"]["world"]
    assert paired["prompt_mean"]["difference"] == pytest.approx(-1.0) and paired["prompt_mean"]["high"] < 0
    assert paired["category_mean"]["difference"] == pytest.approx(-1.0)


def test_cli_noise_per_prompt_reaches_the_evaluation(tmp_path):
    out = tmp_path / "mge"
    args = ["--model", "world", "--out", str(out), "--seeds", "2", "--max-prompts-per-category", "1",
            "--min-images-per-category", "0", "--noise", "per_prompt", "--seed-offset", "7"]
    assert minigeneval.cli(args) == 0
    saved = json.loads((out / "world.json").read_text())
    assert saved["settings"]["noise"] == "per_prompt"
    assert [x["seed"] for x in saved["samples"]] == [
        minigeneval.image_seed(x["caption"], i % 2, 7, 2, "per_prompt") for i, x in enumerate(saved["samples"])]


def test_world_v2_has_a_held_out_split_in_every_category_and_a_perfect_ceiling():
    import functools

    specs = minigeneval.select_prompts(None, "v2")
    assert all(s.world == "v2" for s in specs)
    assert min(sum(s.category == c for s in specs) for c in world.CATEGORIES) >= 24
    chosen = minigeneval.select_prompts(24, "v2")
    assert {c: sum(s.category == c for s in chosen) for c in world.CATEGORIES} == {c: 24 for c in world.CATEGORIES}
    ceiling = minigeneval.evaluate(functools.partial(minigeneval.world_generate, world_name="v2"), seeds_per_prompt=1,
                                   max_prompts_per_category=24, min_images_per_category=0, world_name="v2")
    assert ceiling.overall == 1.0 and ceiling.prompt_mean() == 1.0 and ceiling.settings["world"] == "v2"
    with pytest.raises(ValueError, match="world"):
        minigeneval.evaluate(minigeneval.world_generate, world_name="v3")
