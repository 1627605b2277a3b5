"""Loader throughput: prompt groups/s and MB/s of the DALI and PyTorch streams over synthetic cache shards.

    python bench/loader.py                      # SDXL shapes: K=4 latents 4x128x128 + CLIP-L/G embeddings, fp16
    python bench/loader.py --smoke              # a few groups, for CI (tests/bench/test_bench_loader.py)

Shards are written in the cache stage's layout (random values; throughput does not depend on them), read once to
warm the page cache, then timed over --epochs epochs. Results append to bench/results/loader.csv with the device
name and package versions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, stamp, write_csv  # noqa: E402

from fastpref.data.cache import group_file
from fastpref.data.dataset import CachedDataset
from fastpref.data.shards import StageDir, run_stage

# per-group arrays of an SDXL cache: K latents, prompt embeddings (CLIP-L + CLIP-G), pooled embedding, time ids
SDXL_FIELDS = {
    "latents": (4, 4, 128, 128),
    "cond.encoder_hidden_states": (77, 2048),
    "cond.text_embeds": (1280,),
    "cond.time_ids": (6,),
}
EREF_EPOCHS = 64  # more than any timed run, so every batch carries e_ref as in training


def write_synthetic_cache(root: Path, num_groups: int, groups_per_shard: int, group_size: int, seed: int = 0) -> None:
    fields = dict(SDXL_FIELDS, latents=(group_size, *SDXL_FIELDS["latents"][1:]))
    config = {"family": "sdxl", "flip": False, "reference_errors": {"epochs": EREF_EPOCHS, "seed": 0}, "synthetic": True}
    ranges = [(s, min(s + groups_per_shard, num_groups)) for s in range(0, num_groups, groups_per_shard)]
    stage = StageDir(root, "cache")
    stage.prepare(config, len(ranges), input_fingerprint=None)
    rng = np.random.default_rng(seed)

    def write(index, writer):
        ids = np.arange(*ranges[index], dtype=np.int64)
        for group_id in ids:
            for field, shape in fields.items():
                writer.save_array(group_file(field, int(group_id)), rng.standard_normal(shape).astype(np.float16))
        writer.save_array("group_ids.npy", ids)
        writer.save_array("psi.npy", rng.random((len(ids), group_size)).astype(np.float32))
        writer.save_array("e_ref.npy", rng.random((len(ids), EREF_EPOCHS, group_size)).astype(np.float32))

    run_stage(stage, list(range(len(ranges))), lambda i: ranges[i][1] - ranges[i][0], write, progress=False)


def group_bytes(dataset: CachedDataset) -> int:
    return sum(Path(dataset.files[field][0]).stat().st_size for field in dataset.file_fields)


def measure(dataset: CachedDataset, backend: str, batch_size: int, workers: int, epochs: int, device: str) -> dict:
    stream = dataset.stream(batch_size, seed=0, backend=backend, num_workers=workers, device=device)
    for _ in stream:  # warm-up epoch: page cache, DALI / worker start-up
        pass
    groups = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in stream:
            groups += len(batch["group_ids"])
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "backend": backend, "device_target": device, "groups": groups, "batch_size": batch_size, "workers": workers,
        "seconds": round(seconds, 4), "groups_per_s": round(groups / seconds, 2),
        "mb_per_s": round(groups * group_bytes(dataset) / seconds / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4],
                        help="DataLoader worker processes / DALI threads (0: in-process; DALI uses 1 thread)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["torch", "dali"], choices=["torch", "dali"])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to deliver batches on the GPU")
    parser.add_argument("--data", help="reuse/create the synthetic shards here (default: a temp dir)")
    parser.add_argument("--out", help="CSV to write, or to append to when it exists with the same columns "
                                          "(default: bench/results/loader-<device>-<date>.csv)")
    parser.add_argument("--smoke", action="store_true", help="8 groups, batch 2, 1 worker, 1 epoch (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.groups, args.batch_size, args.workers, args.epochs = 8, 2, [1], 1
    from fastpref.utils.imports import available

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp)
        if not (root / "cache" / "manifest.json").exists():
            write_synthetic_cache(root, args.groups, 64, args.group_size)
        dataset = CachedDataset(root)
        for backend in args.backends:
            if backend == "dali" and not available("nvidia.dali"):
                print("dali: nvidia-dali is not installed, skipped")
                continue
            for workers in args.workers:
                row = measure(dataset, backend, args.batch_size, workers, args.epochs, args.device)
                print(f"{backend:>5} workers={workers}: {row['groups_per_s']:8.1f} groups/s {row['mb_per_s']:8.1f} MB/s")
                # on a shared machine the load says how much the numbers can be trusted
                rows.append({**row, "smoke": args.smoke, "load_avg_1m": round(os.getloadavg()[0], 2)})
    out = Path(args.out or RESULTS_DIR / f"loader-{args.device.split(':')[0]}-{stamp()}.csv")
    # unprefixed environment columns (device, torch, ...), as bench/results/loader.csv has them
    write_csv(out, rows, append=True, prefix="")
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
