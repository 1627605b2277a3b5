"""Model families: one loader per family, each returning a ModelBundle (see bundle.py).

    from fastpref.models import load
    bundle = load("fastpref/toy/weights/toy-sd")                 # family read from model_index.json
    bundle = load("stabilityai/stable-diffusion-xl-base-1.0", family="sdxl", dtype=torch.bfloat16)
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from fastpref.models.bundle import PREDICTION_TYPES, Conditioning, ModelBundle

FAMILIES = ("sd", "sdxl", "sd3")
# diffusers pipeline class (model_index.json "_class_name") -> family module
FAMILY_OF_PIPELINE = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
}
# the shipped toy models (fastpref/toy/weights/<name>) and their families; "-v2": the same trained on world v2
TOY_MODELS = {"toy-sd": "sd", "toy-sd-early": "sd", "toy-sdxl": "sdxl", "toy-sd3": "sd3",
              "toy-sd-v2": "sd", "toy-sd-early-v2": "sd", "toy-sdxl-v2": "sdxl", "toy-sd3-v2": "sd3",
              # toy-sd-v2 continued on captions with confusable colors swapped: a base whose flaw is in its data
              "toy-sd-noisycap-v2": "sd"}
TOY_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "toy" / "weights"
# what toy pretraining (fastpref.toy.pretrain) writes as "family" in a model's metrics.json
TOY_PRETRAIN_FAMILIES = ("vae", "toy-sd", "toy-sdxl", "toy-sd3")


def family_module(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r} (expected one of {FAMILIES})")
    return importlib.import_module(f"fastpref.models.{family}")


def detect_family(path: str | Path) -> str:
    """The family of a local diffusers pipeline folder, from its model_index.json."""
    index = Path(path) / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{str(path)!r} has no model_index.json: pass family= explicitly ({FAMILIES})")
    pipeline_class = json.loads(index.read_text()).get("_class_name")
    if pipeline_class not in FAMILY_OF_PIPELINE:
        raise ValueError(
            f"{str(index)!r}: pipeline class {pipeline_class!r} is not a supported family "
            f"(supported: {sorted(FAMILY_OF_PIPELINE)})"
        )
    return FAMILY_OF_PIPELINE[pipeline_class]


def toy_model_path(name: str) -> Path:
    if name not in TOY_MODELS:
        raise ValueError(f"unknown toy model {name!r} (shipped: {sorted(TOY_MODELS)})")
    return TOY_WEIGHTS_DIR / name


def resolve_path(path_or_name: str | Path) -> str:
    """A local folder as is; the name of a shipped toy model (fastpref/toy/weights/<name>) to its folder;
    anything else is taken for a hub id."""
    if Path(path_or_name).exists():
        return str(path_or_name)
    if (TOY_WEIGHTS_DIR / str(path_or_name)).is_dir():
        return str(TOY_WEIGHTS_DIR / str(path_or_name))
    return str(path_or_name)


def model_world(path_or_name: str | Path) -> str | None:
    """The toy world (fastpref.toy.world.WORLDS) a model speaks, from its folder's metrics.json, which toy
    pretraining writes: its "world", or "v1" for a toy model trained before worlds existed (no "world" key).
    None for anything that is not a toy pretraining output (a hub id, a real checkpoint). The toy renderer's
    names (fastpref.toy.renderer) speak their own world."""
    from fastpref.toy.renderer import renderer_world

    if (world := renderer_world(path_or_name)) is not None:
        return world
    metrics_file = Path(resolve_path(path_or_name)) / "metrics.json"
    if not metrics_file.is_file():
        return None
    try:
        metrics = json.loads(metrics_file.read_text())
    except ValueError as err:
        raise ValueError(f"{str(metrics_file)!r} is not valid JSON: {err}") from None
    if not isinstance(metrics, dict) or metrics.get("family") not in TOY_PRETRAIN_FAMILIES:
        return None
    world = metrics.get("world", "v1")
    from fastpref.toy.world import WORLDS

    if world not in WORLDS:
        raise ValueError(f"{str(metrics_file)!r}: world {world!r} is not one of {tuple(WORLDS)}")
    return world


def load(
    path_or_hub_id: str | Path,
    family: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ModelBundle:
    """Load a checkpoint of any supported family; a shipped toy model may be named ("toy-sd")."""
    path_or_hub_id = resolve_path(path_or_hub_id)
    if family is None:
        family = detect_family(path_or_hub_id)
    return family_module(family).load(path_or_hub_id, dtype=dtype, device=device)


__all__ = [
    "FAMILIES",
    "PREDICTION_TYPES",
    "Conditioning",
    "ModelBundle",
    "detect_family",
    "family_module",
    "load",
    "model_world",
    "resolve_path",
    "toy_model_path",
]
