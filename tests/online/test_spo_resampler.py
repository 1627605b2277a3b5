"""SPO's step-wise resampler (fastpref/online/spo.py) on tiny random SD / SDXL bundles with a scripted scorer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastpref.config import ConfigError, from_dict  # noqa: E402
from fastpref.online.sampler import ddim_step, sampling_timesteps  # noqa: E402
from fastpref.online.spo import SPOSamplingConfig, check_model_family, resample  # noqa: E402

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]


@pytest.fixture(scope="module")
def bundles():
    from fastpref.models import sd, sdxl
    from fastpref.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    return {
        "sd": sd.build_random(sd.tiny_config("tiny"), tokenizer, seed=0),
        "sd-v": sd.build_random(sd.tiny_config("tiny", prediction_type="v_prediction"), tokenizer, seed=1),
        "sdxl": sdxl.build_random(sdxl.tiny_config("tiny"), tokenizer, seed=0),
    }


class Recorder:
    """A scorer that is a fixed function of the pixels (red minus blue, sharpened) and records every call."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def value(pixels):
        return 200.0 * (pixels[:, 0].mean(dim=(1, 2)) - pixels[:, 2].mean(dim=(1, 2)))

    def __call__(self, pixels, prompts, timesteps):
        scores = self.value(pixels)
        self.calls.append((pixels.clone(), list(prompts), timesteps.clone(), scores.clone()))
        return scores


def sd15_like(**overrides):
    return from_dict(SPOSamplingConfig, {"num_steps": 6, "divert_start_step": 2, "num_candidates": 3,
                                         "threshold": 0.0, **overrides})


def sdxl_like(**overrides):
    return from_dict(SPOSamplingConfig, {"num_steps": 8, "divert_start_step": 1, "num_candidates": 2,
                                         "num_inner_step": 2, "threshold": 0.0, **overrides})


def run(bundle, config, prompts=PROMPTS, ids=None, seed=0, epoch=0, scorer=None):
    scorer = scorer or Recorder()
    ids = list(range(len(prompts))) if ids is None else ids
    return resample(bundle, prompts, ids, scorer, config, seed=seed, epoch=epoch), scorer


def test_config_refuses_bad_values_naming_the_key():
    for key, value, match in (("threshold", 1.5, "threshold: must be in \\[0, 1\\]"),
                              ("threshold", -0.1, "threshold"), ("num_candidates", 1, "num_candidates: must be >= 2"),
                              ("divert_start_step", 6, "divert_start_step"), ("eta", 0.0, "eta: must be > 0"),
                              ("num_inner_step", -1, "num_inner_step")):
        with pytest.raises(ConfigError, match=match):
            sd15_like(**{key: value})


def test_flow_models_are_refused_before_loading():
    from fastpref.models import toy_model_path

    with pytest.raises(ConfigError, match="model: .*flow-matching"):
        check_model_family(str(toy_model_path("toy-sd3")), None)
    with pytest.raises(ConfigError, match="policy.model: .*flow-matching"):
        check_model_family("stabilityai/stable-diffusion-3-medium-diffusers", "sd3", key="policy.model")
    assert check_model_family(str(toy_model_path("toy-sd")), None) == "sd"


@pytest.mark.parametrize("name", ["sd", "sd-v"])
def test_sd15_schedule_counts_scoring_timesteps_and_winners(bundles, name):
    bundle = bundles[name]
    config = sd15_like()
    pairs, scorer = run(bundle, config)
    timesteps = sampling_timesteps(bundle, config.num_steps).timesteps
    # candidates branched at steps 2..5, compared at the next step's t (predicted x0) and the last at t = 0
    assert [int(c[2][0]) for c in scorer.calls] == [int(t) for t in timesteps[3:]] + [0]
    assert all(len(c[1]) == len(PROMPTS) * 3 for c in scorer.calls)
    assert pairs.stats["candidates_scored"] == 4 * len(PROMPTS) * 3
    assert pairs.decisions_per_step.tolist() == [0, 0, 4, 4, 4, 4]
    assert len(pairs) == 4 * len(PROMPTS)  # threshold 0: every decision is kept (no exact ties here)
    assert sorted(pairs.step_index.tolist()) == sorted([2, 3, 4, 5] * len(PROMPTS))
    assert torch.equal(pairs.timesteps, timesteps[pairs.step_index])
    # every transition branches from one x_t; winner and loser differ
    assert torch.equal(pairs.latents[:, 0], pairs.latents[:, 1])
    assert (pairs.next_latents[:, 0] - pairs.next_latents[:, 1]).abs().amax(dim=(1, 2, 3)).min() > 0
    # the last step's winner / loser are the best / worst clean images of their prompt
    final = scorer.calls[-1][3].reshape(len(PROMPTS), 3)
    last = pairs.step_index == 5
    decoded = (bundle.decode_latents(pairs.next_latents[last].flatten(0, 1)).float() / 2 + 0.5).clamp(0, 1)
    rescored = Recorder.value(decoded).reshape(-1, 2)
    expected = torch.stack([final.max(1).values, final.min(1).values], 1)[pairs.prompt_index[last]]
    torch.testing.assert_close(rescored, expected, rtol=1e-4, atol=1e-3)


def test_kept_pairs_are_ddim_eta1_samples_of_their_x_t(bundles):
    """x_{t-1} = DDIM(eta=1) mean of x_t + std * noise: its standardized residual under the policy is N(0, 1)."""
    from fastpref.online.sampler import guided_prediction

    bundle = bundles["sd"]
    config = sd15_like()
    pairs, _ = run(bundle, config)
    schedule = sampling_timesteps(bundle, config.num_steps)
    cond = bundle.encode_prompt([pairs.prompts[i] for i in pairs.prompt_index.tolist()])
    from fastpref.online.rollout import expand_rows, unconditional_conditioning

    uncond = expand_rows(unconditional_conditioning(bundle), len(pairs))
    with torch.no_grad():
        x_t = pairs.latents[:, 0]
        pred = guided_prediction(bundle, x_t, pairs.timesteps, cond, uncond, config.guidance_scale)
        for j in range(2):
            step = ddim_step(schedule.scheduler, pred, pairs.timesteps, x_t, eta=1.0, prev_sample=pairs.next_latents[:, j])
            z = (step.prev_sample - step.mean) / step.std
            assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1


def test_thresholds_are_respected(bundles):
    bundle = bundles["sd"]
    everything, scorer = run(bundle, sd15_like(threshold=0.0))
    # the softmax gap of best vs worst at each comparison, from the recorded scores
    gaps = []
    for call in scorer.calls:
        scores = call[3].reshape(len(PROMPTS), 3)
        p = torch.stack([scores.max(1).values, scores.min(1).values], 1).softmax(1)
        gaps.append(p[:, 0] - p[:, 1])
    gaps = torch.stack(gaps)  # (comparisons, prompts)
    threshold = float(gaps.median())
    some, _ = run(bundle, sd15_like(threshold=threshold))
    assert 0 < len(some) < len(everything)
    assert len(some) == int((gaps > threshold).sum())
    assert some.stats["decisions_kept"] == int((gaps > threshold).sum())
    none, _ = run(bundle, sd15_like(threshold=1.0))
    assert len(none) == 0 and none.latents.shape[1] == 2 and none.stats["decisions"] == gaps.numel()


def test_sdxl_inner_steps_chunk_pairs_and_chains_continue(bundles):
    bundle = bundles["sdxl"]
    config = sdxl_like()
    pairs, scorer = run(bundle, config)
    timesteps = sampling_timesteps(bundle, config.num_steps).timesteps
    # branch at 1, inner 2-3, compare at 4 (x0 at t_4); branch at 4, inner 5-7 (the last step never branches), t = 0
    assert [int(c[2][0]) for c in scorer.calls] == [int(timesteps[4]), 0]
    assert pairs.decisions_per_step.tolist() == [0, 4, 0, 0, 4, 0, 0, 0]
    # the tiny SDXL scheduler has set_alpha_to_one: its last DDIM step is deterministic (std 0), nothing to train
    assert float(sampling_timesteps(bundle, config.num_steps).scheduler.final_alpha_cumprod) == 1.0
    assert sorted(set(pairs.step_index.tolist())) == [1, 2, 3, 4, 5, 6]
    assert len(pairs) == len(PROMPTS) * 6
    for p in range(len(PROMPTS)):
        rows = torch.nonzero(pairs.prompt_index == p)[:, 0]
        by_step = {int(pairs.step_index[r]): r for r in rows}
        assert torch.equal(pairs.latents[by_step[1], 0], pairs.latents[by_step[1], 1])  # branched from one x_t
        for a, b in ((1, 2), (2, 3), (4, 5), (5, 6)):  # each chain continues its own x_{t-1}
            torch.testing.assert_close(pairs.latents[by_step[b]], pairs.next_latents[by_step[a]], rtol=0, atol=0)
        # the second chunk branches from one of the first chunk's k = 2 chains (both kept at threshold 0)
        x4 = pairs.latents[by_step[4], 0]
        assert torch.equal(x4, pairs.latents[by_step[4], 1])
        assert any(torch.equal(x4, pairs.next_latents[by_step[3], j]) for j in range(2))


def test_reproducible_and_independent_of_batch_and_epoch_changes_it(bundles):
    bundle = bundles["sd"]
    config = sd15_like()
    first, _ = run(bundle, config, seed=3, epoch=1)
    again, _ = run(bundle, config, seed=3, epoch=1)
    for name in ("latents", "next_latents", "timesteps", "step_index", "prompt_index"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    other_epoch, _ = run(bundle, config, seed=3, epoch=2)
    assert not torch.equal(first.latents[:1], other_epoch.latents[:1])
    # prompt 2 alone (same global id) gets the rollout it had inside the batch
    alone, _ = run(bundle, config, prompts=[PROMPTS[2]], ids=[2], seed=3, epoch=1)
    inside = first.prompt_index == 2
    assert torch.equal(alone.step_index, first.step_index[inside])
    torch.testing.assert_close(alone.next_latents, first.next_latents[inside], rtol=1e-4, atol=1e-4)


def test_the_continuing_candidate_is_the_seeded_uniform_choice_not_the_best(bundles):
    """With k = 2 and threshold 0 both candidates are kept, so the next x_t shows which one each chain took; the
    recorded scores say whether that was candidate 0 or 1, which must be the (seed, epoch, prompt, step) draw."""
    from fastpref.online.spo import _choices

    bundle = bundles["sd"]
    config = sd15_like(num_candidates=2, num_steps=8, divert_start_step=1)
    prompts = ["a red circle"] * 12
    pairs, scorer = run(bundle, config, prompts=prompts, seed=5, epoch=2)
    taken, drawn = [], []
    for c, call in enumerate(scorer.calls[:-2]):  # candidates branched at step 1 + c, compared and chosen at 2 + c
        scores = call[3].reshape(len(prompts), 2)
        for p in range(len(prompts)):
            rows = torch.nonzero(pairs.prompt_index == p)[:, 0]
            by_step = {int(pairs.step_index[r]): r for r in rows}
            took_winner = torch.equal(pairs.latents[by_step[2 + c], 0], pairs.next_latents[by_step[1 + c], 0])
            winner = int(scores[p].argmax())
            taken.append(winner if took_winner else 1 - winner)
            drawn.append(int(_choices(5, 2, [p], 2, 2 + c)[0]))
    assert len(taken) == 12 * 5 and taken == drawn
    assert 0.3 < sum(taken) / len(taken) < 0.7
