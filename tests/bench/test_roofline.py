"""bench/roofline.py: phase floors from the FLOP counts and byte counts, at SDXL's real shape."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import roofline  # noqa: E402


def test_phase_floors_at_sdxl_shape():
    arch = roofline.load_arch("sdxl", 1.0, 1024)
    params = 2_567_000_000
    base = {p.name: p for p in roofline.phases(arch, 8, "full", "baseline", params)}
    fast = {p.name: p for p in roofline.phases(arch, 8, "full", "fastpref", params)}
    assert set(base) == {"encode", "reference", "policy", "loss ops", "optimizer"}
    assert set(fast) == {"policy", "loss ops", "optimizer"}  # the cache stage ran encode and reference
    latent = 8 * 4 * 128 * 128 * 2
    assert base["loss ops"].bytes == 6 * latent and fast["loss ops"].bytes == 5 * latent
    forward = arch.denoiser_forward_flops(8)
    assert base["reference"].flops == forward.total
    # the baseline's forced gradient checkpointing recomputes the forward's checkpointed blocks
    assert base["policy"].flops == pytest.approx(fast["policy"].flops + forward.recomputed)
    assert fast["optimizer"].bytes == 28 * params and base["optimizer"].bytes == 12 * params  # AdamW vs Adafactor
    h100 = roofline.DEVICES[1]
    policy = fast["policy"]
    assert policy.floor_s(h100) == pytest.approx(max(policy.flops / 989e12, policy.bytes / 3.35e12))
    assert policy.flops / 989e12 > policy.bytes / 3.35e12  # the denoiser is compute-bound at this shape
    loss = fast["loss ops"]
    assert loss.floor_s(h100) == pytest.approx(loss.bytes / 3.35e12)  # the loss is bandwidth-bound
