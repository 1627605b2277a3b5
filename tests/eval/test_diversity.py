"""Diversity over the seeds of a prompt (fastpref/eval/diversity.py): the pairwise machinery against a brute-force
float64 loop, the toy distances on the renderer's images, LPIPS through the lpips package, and `fastpref eval`."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os

import numpy as np
import pytest
import torch

from fastpref.eval import diversity
from fastpref.eval.minigeneval import cli, evaluate, select_prompts, world_generate


def brute_force(values, groups, distance):
    per_group = []
    for key in dict.fromkeys(groups):
        rows = [i for i, g in enumerate(groups) if g == key]
        if len(rows) >= 2:
            pairs = [float(distance(values[i][None].double(), values[j][None].double()))
                     for i, j in itertools.combinations(rows, 2)]
            per_group.append(sum(pairs) / len(pairs))
    return sum(per_group) / len(per_group)


def test_mean_pairwise_distance_matches_a_brute_force_loop():
    gen = torch.Generator().manual_seed(0)
    groups = ["a", "b", "a", "c", "b", "a", "d", "b", "b"]  # ragged: 3, 4, 1 (left out), 1 (left out)
    images = torch.rand(len(groups), 3, 5, 4, generator=gen)
    got = diversity.group_diversity(images, groups, diversity.pixel_distance, batch_size=2)  # several batches
    assert got["groups"] == 2 and got["pairs"] == 3 + 6
    assert got["mean"] == pytest.approx(brute_force(images, groups, diversity.pixel_distance), rel=1e-6)
    features = torch.randn(len(groups), 7, generator=gen)
    got = diversity.group_diversity(features, groups, diversity.cosine_distance)
    assert got["mean"] == pytest.approx(brute_force(features, groups, diversity.cosine_distance), rel=1e-6)
    # each prompt counts once: a group with many pairs does not outweigh one with few
    order = torch.randperm(len(groups), generator=gen)
    permuted = diversity.group_diversity(images[order], [groups[i] for i in order], diversity.pixel_distance)
    assert permuted["mean"] == pytest.approx(diversity.group_diversity(images, groups)["mean"], rel=1e-6)


def test_distances_have_their_stated_scale_and_edge_cases():
    black, white = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    assert float(diversity.pixel_distance(black, white)) == 1.0
    assert float(diversity.pixel_distance(white, white)) == 0.0
    assert diversity.group_diversity(torch.rand(3, 3, 2, 2), ["a", "b", "c"])["groups"] == 0
    with pytest.raises(ValueError, match="3 images but 2 group keys"):
        diversity.group_diversity(torch.rand(3, 3, 2, 2), ["a", "b"])


def test_toy_diversity_of_the_renderer_is_zero_for_one_seed_and_positive_across_seeds():
    captions = [spec.caption for spec in select_prompts(1)][:3]
    many = [(c, s) for c in captions for s in range(4)]
    varied = world_generate([c for c, _ in many], [s for _, s in many])
    repeated = world_generate([c for c, _ in many], [0] * len(many))
    groups = [c for c, _ in many]
    same = diversity.toy_diversity(repeated, groups)
    assert same["pixel"] == 0.0 and same["shapeclip"] == pytest.approx(0.0, abs=1e-6)
    spread = diversity.toy_diversity(varied, groups)
    assert spread["groups"] == 3 and spread["pairs"] == 18
    assert spread["pixel"] > 0.05 and spread["shapeclip"] > 1e-3


def test_eval_extras_report_diversity_and_rewards():
    result = evaluate(world_generate, seeds_per_prompt=2, max_prompts_per_category=1, min_images_per_category=2)
    extras = diversity.eval_extras(result)
    assert extras["diversity"]["groups"] == len({s.caption for s in result.samples})
    assert extras["reward"]["shapeclip"] > 0.3 and extras["reward"]["quality"] > 0.9  # clean true renders
    assert extras["reward"]["shapeclip_contrastive"] > 0.5  # the true caption outscores its one-attribute variants
    assert "pixel RMS" in diversity.describe(extras) and "ShapeCLIP contrastive" in diversity.describe(extras)
    assert "reward_per_image" not in extras  # run reports and `fastpref eval` keep the means only
    per_image = diversity.eval_extras(result, per_image=True)["reward_per_image"]
    assert set(per_image) == set(extras["reward"])
    for name, values in per_image.items():
        assert len(values) == len(result.samples) and np.mean(values) == pytest.approx(extras["reward"][name])
    from fastpref.rewards.toy import ShapeCLIPReward
    from fastpref.toy import shapeclip

    last = len(result.samples) - 1  # in the samples' order: the last image scored alone with its own caption
    alone = ShapeCLIPReward(shapeclip.load_shipped(world_name="v1"), world="v1")(
        diversity._pixels(result.images)[last:], [result.samples[last].caption])
    assert per_image["shapeclip"][last] == pytest.approx(float(alone[0]), abs=1e-5)


def test_fastpref_eval_writes_diversity_and_rewards_beside_minigeneval(tmp_path, capsys):
    cli(["--model", "world", "--out", str(tmp_path), "--seeds", "2", "--max-prompts-per-category", "1",
         "--min-images-per-category", "2", "--grid-per-category", "1"])
    summary = json.loads((tmp_path / "summary.json").read_text())["world"]
    assert summary["diversity"]["pixel"] > 0 and summary["diversity"]["shapeclip"] > 0
    assert set(summary["reward"]) == {"shapeclip", "shapeclip_contrastive", "quality"}
    assert "diversity over seeds" in capsys.readouterr().out


LPIPS_SKIP = (
    "the lpips package (and the torchvision it imports) is not installed: PyPI's torchvision wheel is CUDA-linked "
    "and does not load against this machine's CPU torch, so LPIPS runs where a matching torchvision exists (GPU)"
)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_diversity_on_a_random_weight_backbone(net):
    """Pretrained backbone weights cannot be downloaded here: random ones (and the package's own linear heads) check
    the wiring, not the numbers. Run by scripts/test_lpips.sh (CI), in a venv where torchvision loads."""
    if importlib.util.find_spec("lpips") is None:
        if os.environ.get("FASTPREF_REQUIRE_LPIPS") == "1":
            pytest.fail("FASTPREF_REQUIRE_LPIPS=1 but lpips does not import here")
        pytest.skip(LPIPS_SKIP + "; scripts/test_lpips.sh runs it in a venv of its own")
    import lpips

    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    groups = ["a", "a", "a", "b", "b", "b"]
    torch.manual_seed(0)  # the random backbone's weights
    distance = diversity.LPIPSDistance(net, random_backbone=True)
    assert isinstance(distance.model, lpips.LPIPS)
    got = diversity.group_diversity(images, groups, distance, batch_size=2)
    want = brute_force(images, groups, lambda x, y: distance(x.float(), y.float()))
    assert got["mean"] == pytest.approx(want, rel=1e-5) and got["mean"] > 0 and got["pairs"] == 6
    assert float(distance(images[:1], images[:1])) == pytest.approx(0.0, abs=1e-6)
    # [0, 1] images go in as the package's [-1, 1]; the distance is symmetric
    direct = distance.model(images[:3] * 2 - 1, images[3:] * 2 - 1).reshape(-1)
    assert torch.allclose(distance(images[:3], images[3:]), direct, rtol=1e-5, atol=1e-7)
    assert torch.allclose(distance(images[:3], images[3:]), distance(images[3:], images[:3]), rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)  # the same backbone again
    result = diversity.lpips_diversity(images, groups, net=net, random_backbone=True)
    assert result["lpips"] == pytest.approx(got["mean"], rel=1e-5) and result["groups"] == 2


@pytest.mark.skipif(importlib.util.find_spec("lpips") is not None, reason="lpips is installed here")
def test_lpips_without_the_package_says_what_to_install():
    with pytest.raises(ImportError, match="pip install lpips"):
        diversity.lpips_diversity(torch.rand(2, 3, 8, 8), ["a", "a"])


def _extras(shapeclip_reward, quality, div_shapeclip, div_pixel):
    return {"reward": {"shapeclip": shapeclip_reward, "shapeclip_contrastive": shapeclip_reward / 2,
                       "quality": quality},
            "diversity": {"shapeclip": div_shapeclip, "pixel": div_pixel, "groups": 3, "pairs": 9}}


def test_summarize_extras_means_over_seeds_shares_of_the_base_and_the_collapse_bar():
    per_model = {"base": [_extras(0.80, 1.0, 0.10, 0.20)],
                 "kept": [_extras(0.82, 1.1, 0.09, 0.21), _extras(0.84, 1.3, 0.085, 0.19)],
                 "collapsed": [_extras(0.90, 1.0, 0.10, 0.15)]}  # pixel diversity 75% of the base's
    summary = diversity.summarize_extras(per_model)
    kept = summary["kept"]
    assert kept["seeds"] == 2 and kept["reward_shapeclip"] == pytest.approx(0.83)
    assert kept["reward_quality_std"] == pytest.approx(np.std([1.1, 1.3], ddof=1))
    assert kept["diversity_vs_base"]["shapeclip"] == pytest.approx(0.0875 / 0.10)
    assert kept["diversity_vs_base"]["pixel"] == pytest.approx(1.0)
    assert not kept["collapse"] and summary["collapsed"]["collapse"] and not summary["base"]["collapse"]
    assert summary["base"]["reward_shapeclip_std"] == 0.0
    # the bar is the tolerance: 0.875 of the base's shapeclip diversity collapses at 10%, not at 20%
    assert diversity.summarize_extras(per_model, tolerance=0.1)["kept"]["collapse"]

    lines = diversity.extras_lines(summary)
    assert lines[0] == "## Rewards and diversity of the evaluated images"
    row = next(line for line in lines if line.startswith("| collapsed |"))
    assert "0.1500 ± 0.0000 (75%)" in row and row.endswith("| yes |")
    assert next(line for line in lines if line.startswith("| kept |")).endswith("| no |")
    with pytest.raises(KeyError, match="'base'"):
        diversity.summarize_extras({"kept": per_model["kept"]})


def test_a_summary_needs_the_extras_of_the_base_and_of_every_model():
    per_model = {"base": [_extras(0.80, 1.0, 0.10, 0.20)],
                 "kept": [_extras(0.82, 1.1, 0.09, 0.21), _extras(0.84, 1.3, 0.085, 0.19)]}
    assert diversity.summarize_complete_extras(per_model) == diversity.summarize_extras(per_model)
    # one training seed's evaluation stored before extras were measured, one without diversity, no base: no table
    assert diversity.summarize_complete_extras({**per_model, "kept": [per_model["kept"][0], None]}) is None
    assert diversity.summarize_complete_extras(
        {**per_model, "kept": [{"reward": per_model["kept"][0]["reward"]}]}) is None
    assert diversity.summarize_complete_extras({"kept": per_model["kept"]}) is None
    assert diversity.summarize_complete_extras({**per_model, "kept": []}) is None


def test_the_run_report_shows_the_rewards_and_diversity_of_every_model(tmp_path):
    from fastpref.pipeline import write_report

    row = {"overall": 0.5, "per_category": {"colors": 0.5}, "seed_scores": [0.5], "seed_spread": 0.0}
    report = {"eval": {"base": {**row, **_extras(0.8, 1.0, 0.1, 0.2)}, "main": {**row, **_extras(0.8, 1.0, 0.05, 0.2)}},
              "seconds": {"train": 1.0}}
    write_report(tmp_path, report)
    text = (tmp_path / "report.md").read_text()
    assert "## Rewards and diversity of the evaluated images" in text
    assert next(line for line in text.splitlines() if line.startswith("| main | 0.8000")).endswith("| yes |")
    # a report whose evaluations carry no rewards (made before they were measured) has no table, and no error
    del report["eval"]["main"]["reward"]
    write_report(tmp_path, report)
    assert "## Rewards and diversity" not in (tmp_path / "report.md").read_text()
