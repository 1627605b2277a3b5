"""Pick-a-Pic parquet and JSONL-folder imports: ties, labels, images, errors, and the cache stage on top."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
import pytest

from fastpref.config import from_dict
from fastpref.data.importers import ImportConfig, run_import
from fastpref.data.shards import StageDir

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
PIL = pytest.importorskip("PIL.Image")

LABELS = [1.0, 0.5, 0.0, 1.0, 0.0]  # row 1 is a tie


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    PIL.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def pickapic(tmp_path):
    """A Pick-a-Pic-like parquet file, two rows per row group, lossless PNG bytes (one JPEG)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(len(LABELS), 2, 16, 16, 3), dtype=np.uint8)
    table = pa.table({
        "caption": [f"caption {i}" for i in range(len(LABELS))],
        "jpg_0": [encode(images[i, 0], "JPEG" if i == 4 else "PNG") for i in range(len(LABELS))],
        "jpg_1": [encode(images[i, 1]) for i in range(len(LABELS))],
        "label_0": LABELS,
        "label_1": [1 - x for x in LABELS],
    })
    path = tmp_path / "train-0000.parquet"
    pq.write_table(table, path, row_group_size=2)
    return path, images


def import_config(source, output, fmt="pickapic", **overrides):
    data = {"source": str(source), "format": fmt, "output": str(output), "image_size": 16, "groups_per_shard": 2,
            "progress": False, **overrides}
    return from_dict(ImportConfig, data)


def test_pickapic_drops_ties_and_keeps_labels_and_images(tmp_path, pickapic):
    path, images = pickapic
    label = run_import(import_config(path, tmp_path / "out"))
    synth = StageDir(tmp_path / "out", "synth").open("checksum")
    groups = [g for i in range(len(synth.shards)) for g in synth.load_json(i, "groups.json")]
    kept_rows = [0, 2, 3, 4]
    assert [g["prompt"] for g in groups] == [f"caption {r}" for r in kept_rows]
    assert [g["images"][0]["row"] for g in groups] == kept_rows
    stored = np.concatenate([synth.load(i, "images.npy") for i in range(len(synth.shards))])
    np.testing.assert_array_equal(stored[:3], images[kept_rows[:3]])  # PNG rows: exact
    jpeg = pq.read_table(path, columns=["jpg_0"]).column("jpg_0")[4].as_py()
    np.testing.assert_array_equal(stored[3, 0], np.asarray(PIL.open(io.BytesIO(jpeg)).convert("RGB")))  # lossy row
    psi = np.concatenate([label.load(i, "psi.npy") for i in range(len(label.shards))])
    np.testing.assert_array_equal(psi, [[1, 0], [0, 1], [1, 0], [0, 1]])
    pairs = np.concatenate([label.load(i, "pairs.npy") for i in range(len(label.shards))])
    np.testing.assert_array_equal(pairs, [[0, 0, 1], [1, 1, 0], [2, 0, 1], [3, 1, 0]])


def test_pickapic_keeps_ties_on_request(tmp_path, pickapic):
    label = run_import(import_config(pickapic[0], tmp_path / "out", keep_ties=True, limit=3))
    psi = np.concatenate([label.load(i, "psi.npy") for i in range(len(label.shards))])
    np.testing.assert_array_equal(psi, [[1, 0], [0.5, 0.5], [0, 1]])
    assert label.load(0, "pairs.npy").tolist() == [[0, 0, 1]]  # the tie gives no pair


def test_two_import_workers_give_the_same_bytes_as_one(tmp_path, pickapic):
    from data_helpers import tree_digest

    run_import(import_config(pickapic[0], tmp_path / "one"))
    assert run_import(import_config(pickapic[0], tmp_path / "two", shard_index=1, num_workers=2)) is None
    assert run_import(import_config(pickapic[0], tmp_path / "two", shard_index=0, num_workers=2)) is not None
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")


def test_bad_pickapic_label_is_named(tmp_path):
    table = pa.table({"caption": ["x"], "jpg_0": [b""], "jpg_1": [b""], "label_0": [0.3]})
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: row 0: label_0 must be 0, 0.5 or 1"):
        run_import(import_config(tmp_path / "bad.parquet", tmp_path / "out"))


def write_folder(tmp_path, rows):
    rng = np.random.default_rng(1)
    for i, row in enumerate(rows):
        for name in row["images"]:
            PIL.fromarray(rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_jsonl_folder_with_two_scorers(tmp_path, tiny_sd_path):
    rows = [
        {"prompt": "a red circle", "images": ["a0.png", "a1.png", "a2.png"],
         "scores": {"hps": [0.1, 0.3, 0.2], "pick": [3.0, 1.0, 2.0]}},
        {"prompt": "a blue square", "images": ["b0.png", "b1.png", "b2.png"],
         "scores": {"hps": [0.5, 0.4, 0.3], "pick": [9.0, 8.0, 7.0]}},
    ]
    (tmp_path / "src").mkdir()
    folder = write_folder(tmp_path / "src", rows)
    label = run_import(import_config(folder, tmp_path / "out", fmt="jsonl", image_size=32))
    np.testing.assert_allclose(label.load(0, "scores.npy")[0], [[0.1, 3.0], [0.3, 1.0], [0.2, 2.0]], rtol=1e-7)  # float32
    np.testing.assert_allclose(label.load(0, "psi.npy"), [[0.5, 0.5, 0.5], [1.0, 0.5, 0.0]])
    synth = StageDir(tmp_path / "out", "synth").open()
    assert synth.load(0, "images.npy").shape == (2, 3, 32, 32, 3)  # 20x24 center-cropped and resized
    # the cache stage runs on imported data like on synthesized data
    from data_helpers import cache_config

    from fastpref.data.cache import run_cache
    from fastpref.data.dataset import CachedDataset

    run_cache(cache_config(str(tmp_path / "out"), tiny_sd_path, flip=False, reference_errors={"epochs": 0}))
    batch = next(iter(CachedDataset(tmp_path / "out").stream(2, shuffle=False)))
    np.testing.assert_allclose(batch["psi"].numpy(), [[0.5, 0.5, 0.5], [1.0, 0.5, 0.0]])
    assert batch["latents"].shape == (2, 3, 4, 8, 8) and "e_ref" not in batch


def test_jsonl_errors_name_the_line(tmp_path):
    rows = [{"prompt": "x", "images": ["a.png", "b.png"]}, {"prompt": "y", "images": ["c.png", "d.png", "e.png"]}]
    write_folder(tmp_path, rows)
    with pytest.raises(ValueError, match=r"metadata\.jsonl: line 2: 3 images, but earlier lines have 2"):
        run_import(import_config(tmp_path, tmp_path / "out", fmt="jsonl"))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"prompt": "x", "images": ["a.png", "b.png"], "scores": [1]}))
    with pytest.raises(ValueError, match=r"line 1: scores 'score' must list one number per image"):
        run_import(import_config(tmp_path, tmp_path / "out", fmt="jsonl"))


def test_stage_cli_reads_yaml_overrides_and_worker_flags(tmp_path, pickapic, capsys):
    from fastpref.data.importers import cli

    (tmp_path / "import.yaml").write_text(f"source: {pickapic[0]}\nformat: pickapic\noutput: {tmp_path / 'out'}\n")
    args = ["-c", str(tmp_path / "import.yaml"), "image_size=16", "progress=false"]
    assert cli([*args, "--shard-index", "1", "--num-workers", "2"]) == 0
    assert "other workers' shards are still missing" in capsys.readouterr().out
    assert cli([*args, "--shard-index", "0", "--num-workers", "2"]) == 0
    assert "4 groups in 1 shards" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["-c", str(tmp_path / "import.yaml"), "image_sise=16"])
    assert "image_sise: unknown key" in capsys.readouterr().err


def test_sdxl_time_ids_follow_each_imported_images_source_size_and_crop(tmp_path, tiny_family_path):
    """The importer records each image's source (height, width) and its center crop's top-left in the frame resized
    to image_size (diffusers' SDXL DPO script: shorter side resized, y1 = round((h' - size) / 2)); the SDXL cache
    turns them into per-image time_ids (original size, crop, target size), which the stream serves per image."""
    from data_helpers import cache_config

    from fastpref.data.cache import run_cache
    from fastpref.data.dataset import CachedDataset

    sizes = {"a0.png": (48, 32), "a1.png": (32, 64), "b0.png": (20, 20), "b1.png": (37, 50)}
    (tmp_path / "src").mkdir()
    rng = np.random.default_rng(2)
    for name, (h, w) in sizes.items():
        PIL.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(tmp_path / "src" / name)
    rows = [{"prompt": "a red circle", "images": ["a0.png", "a1.png"], "scores": [0.2, 0.9]},
            {"prompt": "a blue square", "images": ["b0.png", "b1.png"], "scores": [0.7, 0.1]}]
    (tmp_path / "src" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_import(import_config(tmp_path / "src", tmp_path / "out", fmt="jsonl", image_size=32))
    groups = StageDir(tmp_path / "out", "synth").open().load_json(0, "groups.json")
    recorded = [(im["original_size"], im["crop_top_left"]) for g in groups for im in g["images"]]
    # 48x32 -> 48x32 (shorter side 32), crop y (48-32)/2 = 8; 32x64 -> x 16; 20x20 -> 32x32, none; 37x50 -> 32x43,
    # x round(5.5) = 6 (Python's round half to even, as diffusers' script)
    assert recorded == [([48, 32], [8, 0]), ([32, 64], [0, 16]), ([20, 20], [0, 0]), ([37, 50], [0, 6])]

    run_cache(cache_config(str(tmp_path / "out"), tiny_family_path("sdxl"), family="sdxl", flip=False,
                           reference_errors={"epochs": 1, "seed": 0}))
    dataset = CachedDataset(tmp_path / "out")
    assert dataset.image_cond_keys == ["time_ids"] and "time_ids" not in dataset.cond_keys
    want = {0: [[48, 32, 8, 0, 32, 32], [32, 64, 0, 16, 32, 32]], 1: [[20, 20, 0, 0, 32, 32], [37, 50, 0, 6, 32, 32]]}
    batch = next(iter(dataset.stream(2, shuffle=False)))
    for row, group_id in enumerate(batch["group_ids"].tolist()):
        np.testing.assert_array_equal(batch["image_cond"]["time_ids"][row].numpy(), want[group_id])
    pairs = next(iter(dataset.stream(2, shuffle=False, select="best_worst")))  # winner first: b0 before b1, a1 first
    np.testing.assert_array_equal(pairs["image_cond"]["time_ids"].numpy(),
                                  [want[0][::-1], want[1]])
    # training: each image's own time_ids reach the denoiser, and the cached e_ref were computed with them too
    from helpers.train import make_config

    from fastpref.train.loop import Trainer

    trainer = Trainer(make_config({"root": str(tmp_path / "out"), "model": tiny_family_path("sdxl")},
                                  tmp_path / "train", mode="full", max_steps=1, **{"objective.name": "dpo"}))
    assert trainer.reference_mode == "cached"
    seen, denoise = [], trainer.step_fn.policy.denoise
    trainer.step_fn.policy.denoise = lambda x, t, cond: seen.append(cond["time_ids"].clone()) or denoise(x, t, cond)
    epoch, batch = next(trainer.batches())
    out = trainer.step_fn.forward(batch, epoch)
    rows = [want[g][::-1] if g == 0 else want[g] for g in batch["group_ids"].tolist()]
    np.testing.assert_array_equal(seen[0].numpy(), np.concatenate(rows))
    torch.testing.assert_close(out.metrics["e_pol"], out.metrics["e_ref"], rtol=1e-5, atol=0)
