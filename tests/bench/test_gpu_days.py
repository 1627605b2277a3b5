"""bench/gpu_days.py: fastpref's estimate carries its cache stage, timed by the baseline's phases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import gpu_days  # noqa: E402


def _row(system, objective, images_per_s, encode_ms=0.0, reference_ms=0.0, group_size=2):
    return {"section": "headline", "status": "ok", "system": system, "objective": objective, "mode": "full",
            "images_per_s": images_per_s, "images_per_step": 8, "group_size": group_size,
            "encode_ms": encode_ms, "reference_ms": reference_ms}


def test_cache_stage_is_added_to_fastpref_and_reuse_is_an_option():
    # baseline: 8 images per step, 800 ms encoding + 1600 ms reference -> 0.1 s + 0.2 s per image
    rows = [_row("baseline", "dpo", 2.0, encode_ms=800.0, reference_ms=1600.0), _row("fastpref", "dpo", 8.0),
            _row("fastpref", "rankdpo", 8.0, group_size=4)]
    base, fast, rank = gpu_days.estimates_from_rows(rows, "dev", True, rankdpo_epochs=3)
    day = gpu_days.SECONDS_PER_DAY
    seen = 2 * gpu_days.DPO_SDXL_STEPS * gpu_days.DPO_SDXL_PAIRS_PER_STEP
    assert base.cache_days == 0 and base.gpu_days == pytest.approx(seen / 2.0 / day)
    cache = (2 * gpu_days.DPO_PICKAPIC_PAIRS * 0.1 + seen * 0.2) / day
    assert fast.cache_days == pytest.approx(cache)
    assert fast.gpu_days == pytest.approx(seen / 8.0 / day + cache)
    images = gpu_days.RANKDPO_PROMPTS * 4
    assert rank.cache_days == pytest.approx((images * 0.1 + 3 * images * 0.2) / day)
    assert rank.gpu_days == pytest.approx(3 * images / 8.0 / day + rank.cache_days)
    table = gpu_days.markdown([fast])
    reused = fast.gpu_days - cache + cache / gpu_days.SWEEP_RUNS
    assert f"| {fast.gpu_days:.3g} | {cache:.3g} | {reused:.3g} |" in table


def test_without_a_baseline_row_the_cache_stage_is_said_to_be_missing():
    (fast,) = gpu_days.estimates_from_rows([_row("fastpref", "dpo", 8.0)], "dev", True)
    assert fast.cache_days == 0 and "cache stage not costed" in fast.note
