"""Fidelity on real checkpoints (issue 14), on tiny random models: what only bites in bf16 / fp16 or on real data.

- the cache encodes in float32 when the VAE's config says force_upcast, takes a VAE override, refuses non-finite
  latents naming the shard;
- cached e_ref are computed as the training step computes the policy's error (weights dtype, autocast, float32
  inputs, their layout, the forward's row count, the loss kernel), so at step 0 (policy == reference) they are the
  policy's errors bit for bit and the loss is ln 2 for cached and live references in fp32, under bf16 autocast and
  under fp16 autocast with loss scaling; a cache made with another recipe is not used silently;
- caption dropout is drawn per group from the seed, reproducibly, and the cached e_ref saw the same draw;
- speed.optimizer: adafactor is transformers' Adafactor with the Diffusion-DPO SDXL settings, and resumes exactly;
- the LR warm-up starts at 0, as diffusers' constant_with_warmup.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fastpref.data.shards import ShardError
from fastpref.train.loop import Trainer

from test_loop import make_config as train_config

LN2 = math.log(2)


def recache(cached_dataset, out, **overrides) -> dict[str, str]:
    """The conftest's Syn-Pic images and labels (tiny SD, 8 prompts x K=3) cached again with `overrides`."""
    import data_helpers as helpers

    from fastpref.data.cache import run_cache

    settings = {"output": str(out), "reference_errors": {"epochs": 1, "seed": 11}, **overrides}
    bundle = settings.pop("bundle", None)
    run_cache(helpers.cache_config(cached_dataset["root"], cached_dataset["model"], **settings), bundle=bundle)
    return {"root": str(out), "model": cached_dataset["model"]}


def stored_latents(root) -> np.ndarray:
    from fastpref.data.dataset import CachedDataset

    dataset = CachedDataset(root)
    return np.stack([np.load(path) for path in dataset.files["latents"]])


# ------------------------------------------------------------------------------------------------ VAE precision


@pytest.mark.parametrize("force_upcast", [True, False])
def test_a_force_upcast_vae_encodes_in_float32_whatever_the_cache_dtype(cached_dataset, tmp_path, monkeypatch,
                                                                        force_upcast):
    import diffusers

    from fastpref.models import sd

    bundle = sd.load(cached_dataset["model"], dtype=torch.bfloat16)
    bundle.vae.register_to_config(force_upcast=force_upcast)
    seen = []
    encode = diffusers.AutoencoderKL.encode

    def recording_encode(self, x, *args, **kwargs):
        seen.append((self.dtype, x.dtype))
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoencoderKL, "encode", recording_encode)
    recache(cached_dataset, tmp_path / "data", bundle=bundle, dtype="bfloat16", flip=False,
            reference_errors={"epochs": 0, "seed": 11})
    want = torch.float32 if force_upcast else torch.bfloat16
    assert seen and set(seen) == {(want, want)}
    assert bundle.vae.dtype == torch.bfloat16  # the given bundle's VAE is left as it was (a float32 copy encoded)


def test_a_vae_override_encodes_the_latents(cached_dataset, tmp_path):
    """cache.vae: the latents are the override's (e.g. madebyollin/sdxl-vae-fp16-fix), recorded in the plan."""
    import diffusers

    from fastpref.data.dataset import CachedDataset
    from fastpref.models.bundle import toy_vae_config

    torch.manual_seed(5)
    diffusers.AutoencoderKL(**toy_vae_config("tiny")).save_pretrained(tmp_path / "other-vae")
    plain = recache(cached_dataset, tmp_path / "plain", flip=False, reference_errors={"epochs": 0, "seed": 11})
    other = recache(cached_dataset, tmp_path / "other", flip=False, reference_errors={"epochs": 0, "seed": 11},
                    vae=str(tmp_path / "other-vae"))
    assert CachedDataset(other["root"]).manifest.config["vae"] == str(tmp_path / "other-vae")
    assert "vae" not in CachedDataset(plain["root"]).manifest.config  # a default cache keeps the plan it had
    a, b = stored_latents(plain["root"]), stored_latents(other["root"])
    assert np.abs(a.astype(np.float32) - b.astype(np.float32)).max() > 1e-2  # another VAE, other latents

    from fastpref.data.synth import image_seed
    from fastpref.data.shards import StageDir
    from fastpref.models import sd

    bundle = sd.load(cached_dataset["model"])
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "other-vae")
    images = StageDir(cached_dataset["root"], "synth").open().load(0, "images.npy")
    pixels = torch.from_numpy(images[0]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    generators = [torch.Generator().manual_seed(image_seed(0, 0, k, "plain")) for k in range(len(pixels))]
    with torch.no_grad():
        expected = bundle.encode_images(pixels, generator=generators, vae=vae)
    torch.testing.assert_close(torch.from_numpy(b[0]).float(), expected, rtol=2e-3, atol=2e-3)  # float16 storage


def test_non_finite_latents_are_refused_naming_the_shard(cached_dataset, tmp_path):
    """latents that overflow float16 storage (here: a scaling factor of 1e30) stop the cache at the first shard."""
    from fastpref.models import sd

    bundle = sd.load(cached_dataset["model"])
    bundle.vae.register_to_config(scaling_factor=1e30)
    with pytest.raises(ShardError, match=r"cache shard 0 \(.*shard-00000\): non-finite latents .* group ids \[0"):
        recache(cached_dataset, tmp_path / "data", bundle=bundle)
    assert not list((tmp_path / "data" / "cache").glob("shard-*"))


# ------------------------------------------------------------------------------- cached e_ref: the step's recipe

FULL_DPO = {"mode": "full", "objective.name": "dpo", "objective.beta": 5000.0, "max_steps": 2}
CHECKED_EPOCHS = 2
# and the optimizer steps after them (fp16: up to 8 skipped; batch_groups 8: 1 step an epoch)
CACHED_EPOCHS = CHECKED_EPOCHS + 9


# fp16 on CPU: slow kernels, and the loss scaler backs off from 2^16 over a few skipped steps (~25 s here)
@pytest.mark.parametrize("batch_groups", [2, 8])
@pytest.mark.parametrize("mixed_precision", ["no", "bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_step_0_loss_is_ln2_for_cached_and_live_references(cached_dataset, tmp_path, mixed_precision, batch_groups):
    """The cache computes e_ref with the trained weights' dtype (float32) under the training autocast, from float32
    latents / noise / targets, contiguous as the step's batches, in denoiser forwards of the training step's row count
    (forward_rows = batch_groups x 2 images for DPO; the cache's shards of 2 groups x K=3 make 6 rows, so the last
    forward of each is padded) and with the trainer's loss kernel (auto on both sides). At step 0 (policy ==
    reference) the cached e_ref are then the policy's errors bit for bit and the DPO loss (beta 5000) is ln 2, over
    whole epochs, at every precision, as with the live reference (a frozen copy under the same autocast).
    Before (issue 14), 1 e_ref in 16 (bf16) / 4 in 16 (fp16) differed by up to 6e-4 relative: the VAE's latents
    reached the cache's denoiser channels_last; and on this CPU a forward of 16 rows rounds otherwise than one of 3
    (float32 1x1 convolutions), which batch_groups 8 against the cache's old 3-row forwards shows.
    Then an optimizer step runs (fp16: loss-scaled; the scaler backs off from 2^16 for a few skipped steps first)."""
    from fastpref.data.dataset import CachedDataset

    rows = 2 * batch_groups
    ds = recache(cached_dataset, tmp_path / "data", mixed_precision=mixed_precision,
                 reference_errors={"epochs": CACHED_EPOCHS, "seed": 11, "forward_rows": rows})
    config = CachedDataset(ds["root"]).manifest.config
    if mixed_precision == "no":
        assert "reference_recipe" not in config  # the legacy float32 recipe: such caches keep their plans
    else:
        assert config["reference_recipe"] == {"weights": "float32", "autocast": mixed_precision, "inputs": "float32"}
    assert config["reference_errors"] == {"epochs": CACHED_EPOCHS, "seed": 11}  # forward_rows: runtime, not planned
    for reference in ("auto", "frozen_copy"):
        trainer = Trainer(train_config(ds, tmp_path / reference, reference=reference, loss_backend="auto", **FULL_DPO,
                                       **{"speed.mixed_precision": mixed_precision, "data.batch_groups": batch_groups}))
        assert trainer.reference_mode == ("cached" if reference == "auto" else "frozen_copy")
        captured = capture_losses(trainer)
        losses, epochs = [], set()
        for _ in range(CHECKED_EPOCHS * len(trainer.stream)):
            epoch, batch = next(trainer.batches())
            epochs.add(epoch)
            losses.append(float(trainer.step_fn.forward(batch, epoch).loss.detach()))
        assert epochs == set(range(CHECKED_EPOCHS))
        assert {out.e_pol.numel() for out in captured} == {rows}  # no group dropped: every forward has `rows` rows
        e_pol = torch.cat([out.e_pol.detach() for out in captured])
        e_ref = torch.cat([out.e_ref.detach() for out in captured])
        differing = (e_ref != e_pol).nonzero().flatten().tolist()
        assert not differing, (reference, differing, ((e_ref - e_pol) / e_pol)[differing])
        assert max(abs(loss - LN2) for loss in losses) < 1e-6, losses
        metrics, _ = trainer.optimizer_step(trainer.batches())
        for _ in range(8 if mixed_precision == "fp16" else 0):  # overflows at 2^16 make the loss scaler back off
            if not metrics.get("skipped"):
                break
            metrics, _ = trainer.optimizer_step(trainer.batches())
        assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0, (metrics, trainer.parallel.loss_scale)


def test_forward_rows_is_checked_and_the_loss_backend_named_before_the_model_loads(cached_dataset, tmp_path,
                                                                                 monkeypatch):
    from fastpref.config import ConfigError

    with pytest.raises(ConfigError, match=r"reference_errors\.forward_rows: must be >= 1 .* got 0"):
        recache(cached_dataset, tmp_path / "rows", reference_errors={"epochs": 1, "seed": 11, "forward_rows": 0})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=r"reference_errors\.loss_backend: triton: backend='triton'"):
        recache(cached_dataset, tmp_path / "triton",
                reference_errors={"epochs": 1, "seed": 11, "loss_backend": "triton"})
    assert not (tmp_path / "triton" / "cache").exists()


def test_a_cache_of_another_recipe_is_named_and_biases_the_start(cached_dataset, tmp_path):
    """What issue 14 measured: e_ref cached in bf16 weights and inputs without autocast, training in fp32 weights under
    bf16 autocast. auto runs the reference live instead (warned, naming both recipes); forced, the start is biased."""
    legacy = recache(cached_dataset, tmp_path / "legacy", dtype="bfloat16")
    overrides = {**FULL_DPO, "speed.mixed_precision": "bf16"}
    needle = (r"computed in bfloat16 \(latents, noise and targets rounded to bfloat16\), training runs in bfloat16 "
              r"\(float32 weights under bf16 autocast\)")
    with pytest.warns(UserWarning, match=needle):
        trainer = Trainer(train_config(legacy, tmp_path / "auto", **overrides))
    assert trainer.reference_mode == "frozen_copy"
    with pytest.warns(UserWarning, match=needle + "; the margins start biased"):
        forced = Trainer(train_config(legacy, tmp_path / "forced", reference="cached", **overrides))
    captured = capture_losses(forced)
    epoch, batch = next(forced.batches())
    forced.step_fn.forward(batch, epoch)
    assert bool((captured[0].e_pol != captured[0].e_ref).all())  # every sample off, not a rounding accident


# -------------------------------------------------------------------------------------------- caption dropout


def test_caption_dropout_is_drawn_per_group_from_the_seed_and_shared_with_cached_e_ref(cached_dataset, tmp_path):
    from fastpref.data.dataset import CachedDataset
    from fastpref.data.noise import draw_caption_dropout
    from fastpref.models import sd

    ds = recache(cached_dataset, tmp_path / "data", caption_dropout=0.5, reference_errors={"epochs": 2, "seed": 11})
    plain = CachedDataset(cached_dataset["root"])
    dataset = CachedDataset(ds["root"])
    bundle = sd.load(cached_dataset["model"])
    with torch.no_grad():
        empty = bundle.encode_prompt([""])["encoder_hidden_states"][0].half()
    dropped_any = kept_any = False
    for epoch in range(2):
        streams = [dataset.stream(2, seed=3), dataset.stream(2, seed=3)]
        for stream in streams:
            stream.set_epoch(epoch)
        for batch, again in zip(*streams):
            assert torch.equal(batch["caption_dropped"], again["caption_dropped"])  # reproducible
            assert torch.equal(batch["cond"]["encoder_hidden_states"], again["cond"]["encoder_hidden_states"])
        stream = dataset.stream(2, seed=3)
        stream.set_epoch(epoch)
        for batch in stream:
            ids = batch["group_ids"]
            want = draw_caption_dropout(dataset.noise_seed, epoch, ids, 0.5)
            assert torch.equal(batch["caption_dropped"], want)
            for row, group_id in enumerate(ids.tolist()):
                original = torch.from_numpy(np.load(plain.files["cond.encoder_hidden_states"][group_id]))
                got = batch["cond"]["encoder_hidden_states"][row]
                if want[row]:
                    dropped_any = True
                    torch.testing.assert_close(got, empty, rtol=0, atol=1e-3)
                else:
                    kept_any = True
                    assert torch.equal(got, original)
    assert dropped_any and kept_any

    # step 0, policy == reference: the cached e_ref saw the same empty captions as the policy
    trainer = Trainer(train_config(ds, tmp_path / "train", **FULL_DPO))
    assert trainer.reference_mode == "cached"
    captured = capture_losses(trainer)
    for _ in range(4):
        epoch, batch = next(trainer.batches())
        trainer.step_fn.forward(batch, epoch)
    e_pol = torch.cat([out.e_pol for out in captured])
    e_ref = torch.cat([out.e_ref for out in captured])
    torch.testing.assert_close(e_pol, e_ref, rtol=1e-5, atol=1e-7)
    # without the draw in the cache, the dropped groups' e_ref would be another prompt's error
    assert not torch.allclose(torch.from_numpy(plain.e_ref[:, 0]), torch.from_numpy(dataset.e_ref[:, 0]), rtol=1e-3)


def capture_losses(trainer) -> list:
    """The PreferenceLossOutput of every step forward (per-sample e_pol / e_ref)."""
    import fastpref.train.step as step

    captured, compute_loss = [], step.compute_loss

    def recording(*args, **kwargs):
        out = compute_loss(*args, **kwargs)
        captured.append(out)
        return out

    step.compute_loss = recording  # restored by the restore_compute_loss fixture
    return captured


@pytest.fixture(autouse=True)
def restore_compute_loss():
    import fastpref.train.step as step

    original = step.compute_loss
    yield
    step.compute_loss = original


# ------------------------------------------------------------------------------------------ optimizer, schedule


def test_adafactor_is_transformers_with_the_diffusion_dpo_sdxl_settings_and_resumes_exactly(cached_dataset, tmp_path):
    transformers = pytest.importorskip("transformers")
    settings = {"mode": "full", "speed.optimizer": "adafactor", "weight_decay": 0.01, "lr": 1e-3, "max_steps": 4,
                "checkpoint_every": 2, "lr_warmup_steps": 2}
    straight = Trainer(train_config(cached_dataset, tmp_path / "straight", **settings))
    optimizer = straight.optimizer
    assert isinstance(optimizer, transformers.optimization.Adafactor)
    group = optimizer.param_groups[0]
    assert (group["beta1"], group["relative_step"], group["scale_parameter"], group["clip_threshold"],
            group["weight_decay"], group["warmup_init"]) == (None, False, False, 1.0, 0.01, False)
    before = {k: v.clone() for k, v in straight.bundle.denoiser.state_dict().items()}
    straight.train()
    after = straight.bundle.denoiser.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trains

    first = Trainer(train_config(cached_dataset, tmp_path / "resumed", **{**settings, "max_steps": 2}))
    first.train()
    resumed = Trainer(train_config(cached_dataset, tmp_path / "resumed", **settings))
    assert resumed.train(resume=True)["resumed_from"] == 2
    state = resumed.optimizer.state_dict()["state"]
    assert state and all("exp_avg_sq_row" in s or "exp_avg_sq" in s for s in state.values())
    for key, value in resumed.bundle.denoiser.state_dict().items():
        assert torch.equal(value, after[key]), key


@pytest.mark.parametrize("schedule, theirs_name", [("constant", "constant_with_warmup"), ("linear", "linear"),
                                                   ("cosine", "cosine")])
def test_lr_warmup_starts_at_zero_as_diffusers(cached_dataset, tmp_path, schedule, theirs_name):
    diffusers_optimization = pytest.importorskip("diffusers.optimization")
    trainer = Trainer(train_config(cached_dataset, tmp_path, lr=1e-3, lr_warmup_steps=4, max_steps=8,
                                   lr_scheduler=schedule))
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    theirs = diffusers_optimization.get_scheduler(theirs_name, probe, num_warmup_steps=4, num_training_steps=8)
    ours, expected = [], []
    for _ in range(9):
        ours.append(trainer.scheduler.get_last_lr()[0])
        expected.append(theirs.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
        probe.step()
        theirs.step()
    assert ours == pytest.approx(expected, rel=1e-12) and ours[0] == 0.0 and ours[4] == 1e-3
    if schedule == "constant":
        assert ours[4:] == [1e-3] * 5
    else:  # from lr after the warm-up down to 0 at max_steps
        assert all(a > b for a, b in zip(ours[4:], ours[5:])) and ours[8] == pytest.approx(0.0, abs=1e-15)
        midway = 0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5))
        assert ours[6] == pytest.approx(1e-3 * midway, rel=1e-12)
