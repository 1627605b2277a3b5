"""The plain-PyTorch backend of GroupStream: a DataLoader whose items are whole batches of prompt groups.

Each DataLoader item is one planned batch ({field: one file per group}), read with np.load; workers fetch
batches in parallel and the DataLoader keeps their order, so the batches match the plan.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class _PlannedBatches(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict[str, list[str]]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            field: torch.from_numpy(np.stack([np.load(path, allow_pickle=False) for path in paths]))
            for field, paths in self.batches[index].items()
        }


def iterate_fields(batches: list[dict[str, list[str]]], num_workers: int = 0, device: str = "cpu") -> Iterator[dict]:
    """{field: (B, ...) tensor} for each planned batch ({field: one .npy file per group}), in order."""
    if not batches:
        return
    loader = torch.utils.data.DataLoader(
        _PlannedBatches(batches),
        batch_size=None,  # items are already batches
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.startswith("cuda"),
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
        # its own generator: a DataLoader iterator otherwise draws its base seed from the global RNG, and a resumed
        # run (one extra iterator, mid-epoch) would shift every later dropout mask off the uninterrupted run's
        generator=torch.Generator().manual_seed(0),
    )
    for fields in loader:
        if device != "cpu":
            fields = {name: tensor.to(device, non_blocking=True) for name, tensor in fields.items()}
        yield fields
