"""Import existing preference data as synth + label stages, ready for the cache stage.

pickapic: Pick-a-Pic v2 parquet files (a file or a folder of them): caption, jpg_0, jpg_1 (encoded image bytes),
          label_0 (1: image 0 preferred, 0: image 1, 0.5: tie). Ties are dropped unless keep_ties.
jsonl:    a .jsonl file (or a folder holding metadata.jsonl), one group per line:
          {"prompt": "...", "images": ["a.png", "b.png", ...], "scores": [0.1, 0.7, ...]}
          paths relative to the file's folder; scores optional, either a list (one scorer) or {scorer: list};
          every line must have the same number of images.
Images are center-cropped and resized to image_size; each image's source (height, width) and the top-left of its
crop (in the frame resized to image_size, as diffusers' SDXL DPO script computes it) are recorded as original_size /
crop_top_left in its provenance, for SDXL's micro-conditioning (fastpref/data/cache.py). Human labels / given scores are kept in each image's
provenance; the label stage (scores, psi, ranks, pairs) is derived from them once all synth shards exist.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fastpref.config import ConfigError
from fastpref.data.label import label_groups
from fastpref.data.shards import Manifest, StageDir, run_stage, run_worker_stage, stage_config
from fastpref.data.synth import shard_ranges, to_uint8_square
from fastpref.utils.imports import require

PICKAPIC_COLUMNS = ("caption", "label_0")


@dataclasses.dataclass
class ImportConfig:
    source: str
    format: Literal["pickapic", "jsonl"]
    output: str  # dataset root: writes <output>/synth and <output>/label
    image_size: int = 512
    keep_ties: bool = False  # pickapic: keep pairs labelled 0.5
    limit: int | None = None  # keep the first N groups (after dropping ties)
    groups_per_shard: int = 256
    pairs: Literal["best_worst", "all"] = "best_worst"
    shard_index: int | None = None
    num_workers: int | None = None
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.groups_per_shard < 1 or self.image_size < 8:
            raise ConfigError("groups_per_shard must be >= 1 and image_size >= 8")


RUNTIME_FIELDS = ("output", "shard_index", "num_workers", "overwrite", "progress")


@dataclasses.dataclass
class _Group:
    prompt: str
    images: list[Any]  # encoded bytes (pickapic) or file paths (jsonl)
    scores: dict[str, list[float]]  # scorer -> one score per image
    origin: dict[str, Any]  # where the group came from (file, row / line)


def decode_image(data: bytes | str | Path, size: int, where: str) -> tuple[np.ndarray, tuple[int, int]]:
    """(the (size, size, 3) uint8 image, its source (height, width))."""
    pil = require("PIL.Image", "importing images")
    try:
        with pil.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            rgb = np.asarray(image.convert("RGB"))
            return to_uint8_square(rgb, size), (int(rgb.shape[0]), int(rgb.shape[1]))
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: cannot decode image ({err})") from None


def center_crop_top_left(height: int, width: int, resolution: int) -> tuple[int, int]:
    """SDXL's crop conditioning of an image center-cropped to a square of `resolution`, as diffusers' SDXL DPO script
    (examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py) computes it: the shorter side resized to
    `resolution` (torchvision Resize: the longer side becomes int(resolution * long / short)), then
    y1 = max(0, round((h' - resolution) / 2)), x1 likewise. to_uint8_square crops the same central square."""
    short = min(height, width)
    scaled_h = resolution if height == short else int(resolution * height / short)
    scaled_w = resolution if width == short else int(resolution * width / short)
    return max(0, int(round((scaled_h - resolution) / 2.0))), max(0, int(round((scaled_w - resolution) / 2.0)))


def _pickapic_index(config: ImportConfig) -> list[tuple[str, int, _Group]]:
    """(file, row, group without image bytes) for each kept row; only caption and label columns are read here."""
    parquet = require("pyarrow.parquet", "importing Pick-a-Pic parquet files")
    source = Path(config.source)
    files = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"{config.source}: no Pick-a-Pic parquet files found")
    index = []
    for file in files:
        table = parquet.read_table(file, columns=list(PICKAPIC_COLUMNS))
        for row, (caption, label_0) in enumerate(zip(*(table.column(c).to_pylist() for c in PICKAPIC_COLUMNS))):
            if label_0 not in (0, 0.5, 1, 0.0, 1.0):
                raise ValueError(f"{file}: row {row}: label_0 must be 0, 0.5 or 1, got {label_0!r}")
            if label_0 == 0.5 and not config.keep_ties:
                continue
            scores = {"human": [float(label_0), 1.0 - float(label_0)]}
            index.append((str(file), row, _Group(caption, [], scores, {"file": file.name, "row": row})))
    return index


def _pickapic_images(entries: list[tuple[str, int, _Group]]) -> None:
    """Fill in the image bytes of these rows, reading only the row groups that hold them."""
    parquet = require("pyarrow.parquet", "importing Pick-a-Pic parquet files")
    by_file: dict[str, list[tuple[int, _Group]]] = {}
    for file, row, group in entries:
        by_file.setdefault(file, []).append((row, group))
    for file, rows in by_file.items():
        handle = parquet.ParquetFile(file)
        starts = np.cumsum([0] + [handle.metadata.row_group(i).num_rows for i in range(handle.num_row_groups)])
        needed = sorted({int(np.searchsorted(starts, row, side="right") - 1) for row, _ in rows})
        table = handle.read_row_groups(needed, columns=["jpg_0", "jpg_1"])
        offset_of = {g: sum(starts[n + 1] - starts[n] for n in needed[: needed.index(g)]) for g in needed}
        for row, group in rows:
            row_group = int(np.searchsorted(starts, row, side="right") - 1)
            local = offset_of[row_group] + row - starts[row_group]
            group.images = [table.column(c)[int(local)].as_py() for c in ("jpg_0", "jpg_1")]


def _jsonl_index(config: ImportConfig) -> list[tuple[str, int, _Group]]:
    source = Path(config.source)
    file = source / "metadata.jsonl" if source.is_dir() else source
    if not file.exists():
        raise FileNotFoundError(f"{file}: not found")
    index, group_size = [], None
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err})") from None
        prompt, images = row.get("prompt") or row.get("caption"), row.get("images")
        if not isinstance(prompt, str) or not isinstance(images, list) or len(images) < 2:
            raise ValueError(f"{where}: needs a 'prompt' string and an 'images' list of >= 2 paths")
        if group_size not in (None, len(images)):
            raise ValueError(f"{where}: {len(images)} images, but earlier lines have {group_size}")
        group_size = len(images)
        scores = row.get("scores", {})
        scores = {"score": scores} if isinstance(scores, list) else scores
        for name, values in scores.items():
            if not isinstance(values, list) or len(values) != len(images):
                raise ValueError(f"{where}: scores {name!r} must list one number per image")
        paths = [str(file.parent / p) for p in images]
        index.append((str(file), number, _Group(prompt, paths, scores, {"file": file.name, "line": number})))
    return index


def _synth_arrays(groups: list[_Group], first_index: int, config: ImportConfig):
    decoded = [[decode_image(im, config.image_size, f"{g.origin} image {k}") for k, im in enumerate(g.images)]
               for g in groups]
    images = np.stack([np.stack([image for image, _ in row]) for row in decoded])
    # original_size / crop_top_left: SDXL's size and crop micro-conditioning of each image (the cache builds per-image
    # time_ids from them), so an upsampled 512 px Pick-a-Pic image is not presented to the model as a 1024 px one
    meta = [
        {
            "index": first_index + i,
            "prompt_id": f"{first_index + i:08d}",
            "prompt": g.prompt,
            "images": [
                {"source": config.format, **g.origin, "image": k, "scores": {n: v[k] for n, v in g.scores.items()},
                 "original_size": list(size), "crop_top_left": list(center_crop_top_left(*size, config.image_size))}
                for k, (_, size) in enumerate(row)
            ],
        }
        for i, (g, row) in enumerate(zip(groups, decoded))
    ]
    return images, meta


def _scores_from_provenance(groups: list[dict]) -> np.ndarray | None:
    names = sorted(groups[0]["images"][0]["scores"]) if groups else []
    if not names:
        return None
    return np.array([[[im["scores"][n] for n in names] for im in g["images"]] for g in groups], dtype=np.float64)


def run_import(config: ImportConfig) -> Manifest | None:
    """Import this worker's synth shards; once all exist, derive the label stage. Returns the label manifest
    (the synth one for unscored data; None while other workers' shards are missing)."""
    index = _pickapic_index(config) if config.format == "pickapic" else _jsonl_index(config)
    if config.limit is not None:
        index = index[: config.limit]
    if not index:
        raise ValueError(f"{config.source}: nothing to import")
    ranges = shard_ranges(len(index), config.groups_per_shard)

    def write_synth(shard: int, writer, _models: None) -> None:
        entries = index[ranges[shard][0] : ranges[shard][1]]
        if config.format == "pickapic":
            _pickapic_images(entries)
        images, meta = _synth_arrays([group for _, _, group in entries], ranges[shard][0], config)
        writer.save_array("images.npy", images)
        writer.save_json("groups.json", meta)

    synth = run_worker_stage(StageDir(config.output, "synth"), config, stage_config(config, RUNTIME_FIELDS), None,
                             [end - start for start, end in ranges], lambda: None, write_synth)
    if synth is None or _scores_from_provenance(synth.load_json(0, "groups.json")) is None:
        return synth  # None while other workers' shards are missing; unscored data has no label stage
    label_stage = StageDir(config.output, "label")
    label_config = {"source": "import", "pairs": config.pairs, "tie_tolerance": 0.0}
    label_stage.prepare(label_config, len(synth.shards), synth.fingerprint, overwrite=config.overwrite)

    def write_label(shard: int, writer) -> None:
        groups = synth.load_json(shard, "groups.json")
        arrays = label_groups(_scores_from_provenance(groups), [g["index"] for g in groups], config.pairs, 0.0)
        for name, array in arrays.items():
            writer.save_array(name, array)

    # labels are cheap: the worker that completes synth derives every missing label shard
    return run_stage(label_stage, list(range(len(synth.shards))), lambda i: synth.shards[i]["num_groups"],
                     write_label, config.progress)


def cli(argv: list[str]) -> int:
    from fastpref.data import stage_cli

    return stage_cli(argv, ImportConfig, run_import, "import", "import Pick-a-Pic parquet or a folder/JSONL dataset")


if __name__ == "__main__":
    import sys

    sys.exit(cli(sys.argv[1:]))
