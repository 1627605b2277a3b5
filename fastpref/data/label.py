"""Stage 2, label: score every image with a reward ensemble, then rank each prompt's images by psi.

Reads <input>/synth, writes <output>/label with the same shards:

    scores.npy  (G, K, M) float32  raw score of every image by every reward model (order: config.rewards)
    psi.npy     (G, K)    float32  ensemble win rate (fastpref.rewards.ensemble.psi_from_scores)
    ranks.npy   (G, K)    int64    0 = best, following psi
    pairs.npy   (P, 3)    int64    (group id, winner image, loser image) for pairwise objectives
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from fastpref.config import ConfigError
from fastpref.data.shards import Manifest, StageDir, run_worker_stage, stage_config
from fastpref.data.synth import resolve_device
from fastpref.rewards.ensemble import preference_pairs, psi_from_scores, ranks_from_psi


@dataclasses.dataclass
class RewardSpec:
    name: str  # a name registered with fastpref.rewards.base.build_reward
    path_or_hub_id: str | None = None  # the reward's weights (None: its default)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LabelConfig:
    input: str  # dataset root holding synth/
    rewards: list[RewardSpec]
    output: str | None = None  # default: input
    pairs: Literal["best_worst", "all"] = "best_worst"
    tie_tolerance: float = 0.0  # score differences up to this count as ties
    batch_size: int = 32
    device: str = "auto"
    shard_index: int | None = None
    num_workers: int | None = None
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.rewards:
            raise ConfigError("rewards: at least one reward model is required")
        if self.batch_size < 1 or self.tie_tolerance < 0:
            raise ConfigError("batch_size must be >= 1 and tie_tolerance >= 0")


RUNTIME_FIELDS = ("input", "output", "device", "shard_index", "num_workers", "overwrite", "progress", "batch_size")


def build_rewards(specs: list[RewardSpec], device: str) -> list:
    """The ensemble's reward models (fastpref.rewards.base.build_reward), on `device`."""
    from fastpref.rewards.base import build_reward

    return [build_reward(spec.name, spec.path_or_hub_id, **spec.kwargs).to(device) for spec in specs]


def score_images(rewards: list, images: np.ndarray, prompts: list[str], batch_size: int) -> np.ndarray:
    """(N, S, S, 3) uint8 images with their prompts -> (N, M) float32 raw scores, no gradients."""
    import torch

    with torch.no_grad():
        columns = [reward(images, prompts, batch_size=batch_size).cpu().numpy() for reward in rewards]
    return np.stack(columns, axis=1).astype(np.float32)


def label_groups(
    scores: np.ndarray, group_ids: list[int], pair_mode: str, tie_tolerance: float
) -> dict[str, np.ndarray]:
    """The label arrays of one shard from its (G, K, M) scores."""
    psi = psi_from_scores(scores, tie_tolerance)
    pairs = preference_pairs(psi, pair_mode)
    pairs[:, 0] = np.asarray(group_ids, dtype=np.int64)[pairs[:, 0]]  # shard row -> global group id
    return {
        "scores.npy": scores.astype(np.float32),
        "psi.npy": psi.astype(np.float32),
        "ranks.npy": ranks_from_psi(psi),
        "pairs.npy": pairs,
    }


def run_label(config: LabelConfig, rewards: list | None = None) -> Manifest | None:
    """Label this worker's shards into <output>/label; `rewards` overrides building config.rewards."""
    synth = StageDir(config.input, "synth").open()

    def load() -> list:
        device = resolve_device(config.device)
        return rewards if rewards is not None else build_rewards(config.rewards, device)

    def write(index: int, writer, models: list) -> None:
        images = synth.load(index, "images.npy")
        groups = synth.load_json(index, "groups.json")
        k = images.shape[1]
        prompts = [g["prompt"] for g in groups for _ in range(k)]
        flat = images.reshape(-1, *images.shape[2:])
        scores = score_images(models, flat, prompts, config.batch_size).reshape(len(groups), k, -1)
        arrays = label_groups(scores, [g["index"] for g in groups], config.pairs, config.tie_tolerance)
        for name, array in arrays.items():
            writer.save_array(name, array)

    stage = StageDir(config.output or config.input, "label")
    plan = stage_config(config, RUNTIME_FIELDS)
    shard_groups = [shard["num_groups"] for shard in synth.shards]
    return run_worker_stage(stage, config, plan, synth.fingerprint, shard_groups, load, write)


def cli(argv: list[str]) -> int:
    from fastpref.data import stage_cli

    return stage_cli(argv, LabelConfig, run_label, "label", "score images with a reward ensemble and rank them by psi")


if __name__ == "__main__":
    import sys

    sys.exit(cli(sys.argv[1:]))
