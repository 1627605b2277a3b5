"""The README's main command (`fastpref demo` = `fastpref run configs/toy-rankdpo.yaml`), shortened for CI.

The real recipe is read from configs/ and only shrunk by command-line overrides (fewer prompts, sampling steps,
training steps and eval seeds), so a broken recipe, shipped toy model, reward or report path fails here. The full
run's numbers (RankDPO vs DPO vs base) are recorded in the README; at this size they are not meaningful.
"""

import json

import pytest

pytest.importorskip("diffusers")

from fastpref import demo  # noqa: E402

GENERATORS = ("[{name: toy-sd, model: toy-sd-v2, images_per_prompt: 2, steps: 4, batch_size: 24},"
              " {name: toy-sd-early, model: toy-sd-early-v2, images_per_prompt: 1, steps: 4, batch_size: 24},"
              " {name: toy-sdxl, model: toy-sdxl-v2, images_per_prompt: 1, steps: 4, batch_size: 24}]")


@pytest.mark.slow
def test_shortened_demo_runs_the_real_recipe_and_reports_base_rankdpo_and_dpo(tmp_path, capsys):
    out = tmp_path / "demo"
    code = demo.main([
        f"output_dir={out}",
        "progress=false",
        "synth.prompts.limit=12",  # 2 prompts per GenEval category (toy:train-balanced)
        "synth.groups_per_shard=6",
        f"synth.generators={GENERATORS}",
        "cache.reference_errors.epochs=2",
        "train.max_steps=2",
        "train.data.batch_groups=4",
        "train.checkpoint_every=2",
        "train.validation.every=2",
        "train.validation.num_inference_steps=2",
        "eval.seeds_per_prompt=1",
        "eval.max_prompts_per_category=1",
        "eval.min_images_per_category=1",
        "eval.steps=2",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report["eval"]) == {"base", "rankdpo", "dpo"}
    assert report["train"]["rankdpo"]["reference"] == "cached"  # no reference forward in the loop
    assert all(report["train"][name]["steps"] == 2 for name in ("rankdpo", "dpo"))
    for name in ("base", "rankdpo", "dpo"):
        assert 0.0 <= report["eval"][name]["overall"] <= 1.0 and report["eval"][name]["num_images"] > 0
        assert f"| {name} | **" in printed  # the report table is printed at the end
    assert "Seed-to-seed spread of the base" in printed and "![before/after](grid.png)" in printed
    assert (out / "grid.png").stat().st_size > 0 and (out / "training.png").stat().st_size > 0
    grids = sorted(p.name for p in (out / "train/rankdpo/validation").glob("step-*.png"))
    assert grids == ["step-000000.png", "step-000002.png"]
