"""bench/step.py --smoke: runs end to end on the toy SD model and writes a sane CSV, Markdown table and plot."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("data", "encode", "reference", "policy", "optimizer", "communication")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-step")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "step.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=170, cwd=ROOT,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (csv_path,) = out.glob("step-*-smoke-*.csv")
    return {"rows": list(csv.DictReader(csv_path.open())), "out": out, "stdout": result.stdout}


def rows_of(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def test_outputs_written(smoke):
    out = smoke["out"]
    (md,) = out.glob("step-*-smoke-*.md")
    (png,) = out.glob("step-*-smoke-*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = md.read_text()
    assert "| arch | section | variant" in text and "device:" in text and "fastpref configuration" in text
    assert "wrote" in smoke["stdout"]
    for row in smoke["rows"]:
        assert row["env_device"] and row["env_torch"] and row["peak_source"] and row["speed_config"]


def test_headline_rows_measured_and_sane(smoke):
    rows = smoke["rows"]
    for objective, mode in [("dpo", "full"), ("dpo", "lora"), ("rankdpo", "full"), ("rankdpo", "lora")]:
        (row,) = rows_of(rows, section="headline", system="fastpref", objective=objective, mode=mode)
        assert row["status"] == "ok", row["status"]
        step_ms = float(row["step_ms"])
        assert step_ms > 0 and float(row["min_ms"]) <= step_ms
        assert float(row["images_per_s"]) == pytest.approx(int(row["images_per_step"]) / step_ms * 1e3, rel=1e-3)
        assert 0 < float(row["MFU"]) < 1 and 0 < float(row["HFU"]) < 1
        # MFU counts only what the step executes: with cached latents and reference errors (no checkpointing)
        # that is exactly the hardware's work, never more
        assert float(row["hardware_TFLOP_per_step"]) == float(row["model_TFLOP_per_step"])
        assert float(row["MFU"]) <= float(row["HFU"])
        assert float(row["encode_ms"]) == 0 and float(row["reference_ms"]) == 0
    for mode in ("full", "lora"):
        (fast,) = rows_of(rows, section="headline", system="fastpref", objective="dpo", mode=mode)
        (base,) = rows_of(rows, system="baseline", mode=mode)
        assert fast["images_per_step"] == base["images_per_step"]
        # the baseline encodes pixels and text and runs the reference on top of the same policy step
        assert float(base["encode_ms"]) > 0 and float(base["reference_ms"]) > 0
        # ... and the baseline executes the reference forward and the encoders on top of the same policy work
        forward = float(fast["model_TFLOP_per_step"])
        assert float(base["model_TFLOP_per_step"]) > forward
        assert float(base["hardware_TFLOP_per_step"]) >= float(base["model_TFLOP_per_step"])
        assert float(fast["cache_reference_TFLOP_per_image_epoch"]) > 0 and float(fast["cache_encode_TFLOP_per_image"]) > 0
        assert float(fast["vs_baseline"]) == pytest.approx(
            float(fast["images_per_s"]) / float(base["images_per_s"]), rel=1e-2)


def test_ablation_rows_measured_or_explained(smoke):
    ablation = rows_of(smoke["rows"], section="ablation")
    names = {r["variant"] for r in ablation}
    for feature in ("latent cache", "cached reference errors", "fused ops", "compile", "FP8", "8-bit AdamW",
                    "channels-last", "gradient checkpointing"):
        assert any(feature in name for name in names), feature
    for row in ablation:
        if row["status"] == "ok":
            assert float(row["step_ms"]) > 0 and row["vs_fastpref"]
            phase_sum = sum(float(row[f"{p}_ms"]) for p in PHASES)
            assert phase_sum == pytest.approx(float(row["phase_sum_ms"]), rel=1e-3)
        else:
            assert not row.get("step_ms") and len(row["status"]) > 20  # a reason, not a number
    (no_cache,) = [r for r in ablation if "latent cache" in r["variant"]]
    (live_ref,) = [r for r in ablation if "cached reference" in r["variant"]]
    assert float(no_cache["encode_ms"]) > 0 and float(live_ref["reference_ms"]) > 0
