"""The toy world's renderer as a Syn-Pic generator (fastpref/toy/renderer.py): ground-truth images through
`fastpref synth`, seeded like a model's, in the world the name says; configs/toy-oracle.yaml builds on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastpref.config import ConfigError, from_dict
from fastpref.toy import verifier, world

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _prompt_file(path: Path, world_name: str, count: int = 5) -> str:
    specs = world.train_prompts(world_name)
    captions = [s.caption for s in specs[::len(specs) // count][:count]]  # spread over the categories
    path.write_text("".join(c + "\n" for c in captions))
    return str(path)


def _synth(tmp_path, model: str, world_name: str, out: str = "data", seed: int = 0):
    from fastpref.data.synth import SynthConfig, run_synth

    config = from_dict(SynthConfig, {
        "prompts": {"path": _prompt_file(tmp_path / f"prompts-{world_name}.txt", world_name)},
        "output": str(tmp_path / out), "image_size": 32, "groups_per_shard": 2, "progress": False, "seed": seed,
        "generators": [{"name": "renderer", "model": model, "images_per_prompt": 3, "batch_size": 4}]})
    run_synth(config)
    from fastpref.data.shards import StageDir

    stage = StageDir(tmp_path / out, "synth").open()
    images = np.concatenate([stage.load(i, "images.npy") for i in range(len(stage.shards))])
    prompts = [g["prompt"] for i in range(len(stage.shards)) for g in stage.load_json(i, "groups.json")]
    return images, prompts


@pytest.mark.parametrize("model, world_name", [("toy-renderer", "v1"), ("toy-renderer-v2", "v2")])
def test_rendered_groups_satisfy_their_captions_and_reproduce(tmp_path, model, world_name):
    images, prompts = _synth(tmp_path, model, world_name)
    assert images.shape == (5, 3, 32, 32, 3) and images.dtype == np.uint8
    specs = [world.parse_caption(p, world_name) for p in prompts for _ in range(3)]
    results = verifier.verify_batch(images.reshape(-1, 32, 32, 3), specs)
    assert all(r.passed for r in results), [r for r in results if not r.passed][:2]
    # the images of a prompt differ (each from its own seed); the same seeds give the same images
    assert not np.array_equal(images[:, 0], images[:, 1])
    again, _ = _synth(tmp_path, model, world_name, out="again")
    assert np.array_equal(images, again)
    other, _ = _synth(tmp_path, model, world_name, out="other", seed=1)
    assert not np.array_equal(images, other)


def test_the_renderer_refuses_what_it_cannot_honour():
    from fastpref.toy.renderer import WorldRendererPipeline

    pipe = WorldRendererPipeline("v2")
    g = torch.Generator().manual_seed(3)
    out = pipe(prompt=["a red circle"], generator=[g], num_inference_steps=20, guidance_scale=4.0)
    assert out.images.shape == (1, 32, 32, 3) and 0 <= out.images.min() and out.images.max() <= 1
    with pytest.raises(ValueError, match="one seeded torch.Generator per prompt"):
        pipe(prompt=["a red circle"])
    with pytest.raises(ValueError, match="renders 32x32"):
        pipe(prompt=["a red circle"], generator=[g], height=64, width=64)
    with pytest.raises(ValueError):  # a caption outside the world's grammar names itself
        WorldRendererPipeline("v1")(prompt=["a purple circle"], generator=[g])  # v2-only color


def test_a_run_recipe_refuses_a_renderer_of_another_world():
    from fastpref.pipeline import RunConfig, build_stages
    import yaml

    recipe = yaml.safe_load((CONFIGS / "toy-oracle.yaml").read_text())
    stages = build_stages(from_dict(RunConfig, recipe))
    assert stages.world == "v2"
    recipe["synth"]["generators"][0]["model"] = "toy-renderer"
    with pytest.raises(ConfigError, match=r"the recipe's world is v1 from synth\.generators\[0\]\.model "
                                          r"\('toy-renderer', world v1\)"):
        build_stages(from_dict(RunConfig, recipe))
