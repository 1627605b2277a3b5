"""The toy world's renderer as a text-to-image "generator": ground-truth images that satisfy their caption exactly.

`fastpref synth` takes it like any model (`{name: renderer, model: toy-renderer-v2}`; `toy-renderer` is world v1's),
so a Syn-Pic group can hold an oracle image beside the models' own: the data of a supervised / preference ceiling
(how far fine-tuning can lift a toy model when its winners are perfect). It answers the diffusers pipeline call that
synth makes; the image of each prompt is drawn from its torch.Generator's seed, so it depends on the seed only.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

RENDERERS = {"toy-renderer": "v1", "toy-renderer-v2": "v2"}


def renderer_world(model: Any) -> str | None:
    """The world of a renderer name (toy-renderer, toy-renderer-v2); None for anything else."""
    return RENDERERS.get(str(model))


class WorldRendererPipeline:
    """pipeline(prompt=[...], generator=[...], output_type="np") -> .images (N, S, S, 3) float in [0, 1]."""

    def __init__(self, world: str):
        from fastpref.toy import world as toy_world

        self.world = toy_world.get_world(world).name
        self.size = toy_world.IMAGE_SIZE

    def __call__(self, prompt: list[str] | str, generator=None, output_type: str = "np", height: int | None = None,
                 width: int | None = None, **_sampling: Any) -> SimpleNamespace:
        from fastpref.eval.minigeneval import world_generate  # the renderer as MiniGenEval's ceiling model

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        if len(generators) != len(prompts) or any(g is None for g in generators):
            raise ValueError("toy renderer: one seeded torch.Generator per prompt is needed (its seed draws the scene)")
        if output_type != "np":
            raise ValueError(f"toy renderer: output_type {output_type!r}; only 'np' is supported")
        if (height or self.size) != self.size or (width or self.size) != self.size:
            raise ValueError(f"toy renderer: renders {self.size}x{self.size}, asked for {height}x{width}")
        images = world_generate(prompts, [int(g.initial_seed()) for g in generators], world_name=self.world)
        return SimpleNamespace(images=images.astype(np.float32) / 255.0)

    # the parts of the diffusers pipeline interface that synth touches
    def set_progress_bar_config(self, **_: Any) -> None:
        pass

    def to(self, *_: Any, **__: Any) -> "WorldRendererPipeline":
        return self

    def enable_model_cpu_offload(self) -> None:
        pass
