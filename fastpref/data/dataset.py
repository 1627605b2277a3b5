"""The one object the trainer opens: a cached dataset that streams whole prompt groups.

    dataset = CachedDataset("runs/toy-synpic")               # validates <root>/cache (sizes; verify="checksum": sha256)
    stream = dataset.stream(batch_size=8, seed=0)            # rank / world size from torchrun's env by default
    pairs = dataset.stream(batch_size=8, select="best_worst")  # (winner, loser) per prompt, for pairwise objectives
    stream.load_state_dict(state)                            # resume mid-epoch
    for batch in stream: ...                                 # one epoch from the current position
    state = stream.state_dict()

A batch is a dict of torch tensors for B prompt groups of K images:
    group_ids (B,) int64; latents (B, K, C, h, w) (the mirrored latents where noise.draw_flips says so, when the
    cache holds them; only the latents used are read);
    flipped (B,) bool; cond {key: (B, ...)}; psi (B, K) float32 when labelled; e_ref (B, K) float32 when the
    cache holds reference errors for this epoch; image_cond {key: (B, K, ...)} when the cache holds per-image
    conditioning (SDXL time_ids of imported images); caption_dropped (B,) bool when the cache sets caption_dropout
    (those groups' cond is the cached empty caption's, drawn by noise.draw_caption_dropout as the cache's e_ref was).
Both backends ("torch": a DataLoader, "dali": NVIDIA DALI's numpy reader) read the same epoch plan and go
through the same `finish_batch`, so they yield identical batches in the same order.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fastpref.data.cache import group_file
from fastpref.data.noise import draw_caption_dropout, draw_flips
from fastpref.data.shards import Manifest, StageDir, Verify
from fastpref.rewards.ensemble import preference_pairs

Backend = Literal["torch", "dali"]
# groups: all K images of every prompt; best_worst: (winner, loser) by psi, K = 2, for pairwise objectives
# (prompts whose images all tie are left out)
Select = Literal["groups", "best_worst"]
PER_SHARD_FIELDS = ("group_ids", "psi", "e_ref")


def epoch_plan(
    num_groups: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool, drop_last: bool
) -> list[np.ndarray]:
    """This rank's batches of dataset positions for one epoch.

    One seeded permutation per epoch, shared by all ranks; rank r takes every world_size-th entry, cut to the same
    length on every rank (ranks must step together); drop_last drops the final partial batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    order = np.random.default_rng([seed, epoch]).permutation(num_groups) if shuffle else np.arange(num_groups)
    per_rank = num_groups // world_size
    mine = order[rank::world_size][:per_rank]
    stop = per_rank - per_rank % batch_size if drop_last else per_rank
    return [mine[i : i + batch_size] for i in range(0, stop, batch_size)]


class CachedDataset:
    """A validated cache stage, with its small per-group arrays in memory and big ones as per-group files."""

    def __init__(self, root: str | Path, verify: Verify = "size"):
        self.root = Path(root)
        self.manifest: Manifest = StageDir(root, "cache").open(verify)
        config = self.manifest.config
        self.family: str = config["family"]
        self.flip: bool = bool(config["flip"])
        self.noise_seed: int = int(config["reference_errors"]["seed"])
        self.reference_epochs: int = int(config["reference_errors"]["epochs"])
        small: dict[str, list[np.ndarray]] = {name: [] for name in PER_SHARD_FIELDS}
        self.file_fields = sorted(f for f, spec in self.manifest.data["fields"].items() if spec["per_group_file"])
        self.files: dict[str, list[str]] = {field: [] for field in self.file_fields}
        present = [name for name in PER_SHARD_FIELDS if name in self.manifest.data["fields"]]
        for index in range(len(self.manifest.shards)):
            for name in present:
                small[name].append(self.manifest.load(index, f"{name}.npy"))
            shard_dir = self.manifest.shard_dir(index)
            for group_id in small["group_ids"][-1]:
                for field in self.file_fields:
                    self.files[field].append(str(shard_dir / group_file(field, int(group_id))))
        self.group_ids = np.concatenate(small["group_ids"])
        self.psi = np.concatenate(small["psi"]) if small["psi"] else None
        self.e_ref = np.concatenate(small["e_ref"]) if small["e_ref"] else None
        self.group_size = int(self.manifest.data["fields"]["latents"]["shape"][0])
        self.cond_keys = [f[len("cond.") :] for f in self.file_fields if f.startswith("cond.")]
        self.image_cond_keys = [f[len("image_cond.") :] for f in self.file_fields if f.startswith("image_cond.")]
        self.caption_dropout = float(config.get("caption_dropout", 0.0))
        self.empty_cond: dict[str, torch.Tensor] = {}
        if self.caption_dropout > 0:
            for key in self.cond_keys:
                if f"empty_cond.{key}" not in self.manifest.data["fields"]:
                    raise ValueError(f"{self.manifest.path}: caption_dropout {self.caption_dropout} but no "
                                     f"empty_cond.{key}.npy in the shards; recache")
                self.empty_cond[key] = torch.from_numpy(self.manifest.load(0, f"empty_cond.{key}.npy"))

    def __len__(self) -> int:
        return len(self.group_ids)

    @property
    def stream_fields(self) -> list[str]:
        """The per-group-file fields a batch reads: 'latents' stands for the plain or the mirrored file."""
        return [field for field in self.file_fields if field != "latents_flip"]

    def flips(self, positions: np.ndarray, epoch: int) -> torch.Tensor:
        if not self.flip:
            return torch.zeros(len(positions), dtype=torch.bool)
        return draw_flips(self.noise_seed, epoch, self.group_ids[positions])

    def batch_files(self, positions: np.ndarray, epoch: int) -> dict[str, list[str]]:
        """{field: file per group} for one batch; only the latents used this epoch are read (plain or mirrored)."""
        files = {field: [self.files[field][p] for p in positions] for field in self.stream_fields}
        if self.flip:
            flips = self.flips(positions, epoch).tolist()
            files["latents"] = [self.files["latents_flip" if f else "latents"][p] for p, f in zip(positions, flips)]
        return files

    def finish_batch(self, positions: np.ndarray, fields: dict[str, torch.Tensor], epoch: int) -> dict[str, Any]:
        """Raw per-group fields (from either backend) -> the trainer's batch for this epoch."""
        device = fields["latents"].device  # the small per-group arrays follow the big ones (GPU under DALI on GPU)
        batch: dict[str, Any] = {
            "group_ids": torch.from_numpy(self.group_ids[positions]).to(device),
            "latents": fields["latents"],
            "flipped": self.flips(positions, epoch).to(device),
            "cond": {key: fields[f"cond.{key}"] for key in self.cond_keys},
        }
        if self.image_cond_keys:
            batch["image_cond"] = {key: fields[f"image_cond.{key}"] for key in self.image_cond_keys}
        if self.caption_dropout > 0:
            dropped = draw_caption_dropout(self.noise_seed, epoch, self.group_ids[positions], self.caption_dropout)
            for key, value in batch["cond"].items():
                empty = self.empty_cond[key].to(value.device, value.dtype)
                batch["cond"][key] = torch.where(dropped.to(value.device).view(-1, *[1] * empty.ndim), empty, value)
            batch["caption_dropped"] = dropped.to(device)
        if self.psi is not None:
            batch["psi"] = torch.from_numpy(self.psi[positions]).to(device)
        if self.e_ref is not None and epoch < self.reference_epochs:
            batch["e_ref"] = torch.from_numpy(self.e_ref[positions, epoch]).to(device)
        return batch

    def stream(
        self,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        backend: Backend = "torch",
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        device: str = "cpu",
        select: Select = "groups",
    ) -> "GroupStream":
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        return GroupStream(
            self, batch_size, seed, rank, world_size, backend, shuffle, drop_last, num_workers, device, select
        )


class GroupStream:
    """Epochs of prompt-group batches with a resumable position (epoch, batches already yielded)."""

    def __init__(
        self, dataset, batch_size, seed, rank, world_size, backend, shuffle, drop_last, num_workers, device, select
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if backend not in ("torch", "dali"):
            raise ValueError(f"backend must be 'torch' or 'dali', got {backend!r}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.shuffle, self.drop_last, self.num_workers, self.device = shuffle, drop_last, num_workers, device
        self.epoch, self.position = 0, 0
        self._warned_e_ref = False
        self.pair_slots = None  # position -> (winner, loser) image slots under select="best_worst"
        if select == "best_worst":
            if dataset.psi is None:
                raise ValueError("select='best_worst' needs a labelled dataset (no psi in this cache)")
            pairs = preference_pairs(dataset.psi, "best_worst")
            self.positions = pairs[:, 0]
            self.pair_slots = np.zeros((len(dataset), 2), dtype=np.int64)
            self.pair_slots[pairs[:, 0]] = pairs[:, 1:]
        elif select == "groups":
            self.positions = np.arange(len(dataset))
        else:
            raise ValueError(f"select must be 'groups' or 'best_worst', got {select!r}")

    def plan(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of dataset positions for `epoch`."""
        batches = epoch_plan(
            len(self.positions), self.batch_size, self.seed, epoch, self.rank, self.world_size, self.shuffle,
            self.drop_last,
        )
        return [self.positions[batch] for batch in batches]

    def take_pairs(self, batch: dict[str, Any], positions: np.ndarray) -> dict[str, Any]:
        """Keep each group's (winner, loser) images, winner first."""
        slots = torch.from_numpy(self.pair_slots[positions]).to(batch["latents"].device)
        rows = torch.arange(len(positions), device=slots.device)[:, None]
        for key in ("latents", "psi", "e_ref"):
            if key in batch:
                batch[key] = batch[key][rows, slots]
        for key, value in batch.get("image_cond", {}).items():
            batch["image_cond"][key] = value[rows, slots]
        return batch

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
            "rank": self.rank, "world_size": self.world_size, "num_groups": len(self.positions),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "world_size", "num_groups"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(f"stream state: {key}={state[key]} was saved, this stream has {key}={mine}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self):
        """The rest of the current epoch; when it is exhausted, the position moves to the next epoch's start."""
        epoch, batches = self.epoch, self.plan(self.epoch)[self.position :]
        if self.dataset.e_ref is not None and epoch >= self.dataset.reference_epochs and not self._warned_e_ref:
            warnings.warn(f"epoch {epoch}: the cache holds e_ref for {self.dataset.reference_epochs} epochs only; "
                          "batches come without e_ref (the trainer must run the reference model)", stacklevel=2)
            self._warned_e_ref = True
        if self.backend == "dali":
            from fastpref.data.stream_dali import iterate_fields
        else:
            from fastpref.data.stream_torch import iterate_fields
        files = [self.dataset.batch_files(positions, epoch) for positions in batches]
        for positions, fields in zip(batches, iterate_fields(files, self.num_workers, self.device)):
            batch = self.dataset.finish_batch(positions, fields, epoch)
            if self.pair_slots is not None:
                batch = self.take_pairs(batch, positions)
            self.position += 1
            yield batch
        self.epoch, self.position = epoch + 1, 0
