"""bench/step.py times fastpref against a faithful re-implementation of the public Diffusion-DPO step
(bench/baseline_dpo.py). The comparison only means something if both compute the same loss: on the same batch
(same latents, conditioning, noise, timesteps, policy and reference), the baseline's
-logsigmoid(-0.5 * beta_dpo * (model_diff - ref_diff)) equals fastpref's diffusion_dpo_loss at beta = beta_dpo / 2,
to float32 rounding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import baseline_dpo  # noqa: E402

PAIRS = 3
BETA_DPO = 5000.0


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from fastpref.models import load, sd
    from fastpref.toy.tokenizer import build_tokenizer

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny-sd") / "model"
    sd.build_random(sd.tiny_config("tiny"), build_tokenizer(), seed=0).save_pretrained(folder)
    return load(str(folder))


@pytest.mark.slow  # builds a tiny SD model and runs 2 x 3 forwards per mode: ~1-3 min on the shared 2-core CPU
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_the_baseline_step_computes_fastprefs_diffusion_dpo_loss(bundle, mode):
    from fastpref.ops import diffusion_dpo_loss
    from fastpref.train.loop import LoraConfig, add_lora
    from fastpref.train.step import with_denoiser

    import copy

    bundle = copy.copy(bundle)
    bundle.denoiser = copy.deepcopy(bundle.denoiser)
    if mode == "lora":
        add_lora(bundle.denoiser, LoraConfig())
    step = baseline_dpo.BaselineDPOStep(bundle, mode=mode, beta_dpo=BETA_DPO, lr=0.0)
    # move the policy off the reference (a fresh LoRA / copy equals it: every margin 0, the loss ln 2 whatever
    # the formula); small enough that beta * margin stays in sigmoid's unsaturated range
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in step.params:
            p.add_(1e-3 * torch.randn(p.shape, generator=gen))
    policy_state = {k: v.clone() for k, v in bundle.denoiser.state_dict().items()}
    pixels = torch.rand(2 * PAIRS, 3, 32, 32, generator=gen) * 2 - 1  # winners, then losers (the script's layout)
    encoder = bundle.text_modules()[0]
    ids = [torch.randint(0, encoder.config.vocab_size, (PAIRS, 8), generator=gen)]

    torch.manual_seed(1)
    out = step(baseline_dpo.BaselineBatch(pixels, ids))

    # the same draws, in the baseline's order (VAE sample, then noise, then timesteps), on the weights before its step
    bundle.denoiser.load_state_dict(policy_state)
    torch.manual_seed(1)
    with torch.no_grad():
        latents = baseline_dpo.encode_pixels(bundle, pixels)
        cond = {k: v.repeat(2, 1, 1) for k, v in baseline_dpo.encode_text(bundle, ids).items()}
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        timesteps = torch.randint(0, bundle.num_train_timesteps, (2 * PAIRS,)).long().chunk(2)[0].repeat(2)
        noisy = bundle.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = bundle.denoise(noisy, timesteps, cond)
        if mode == "full":
            ref = with_denoiser(bundle, step.reference).denoise(noisy, timesteps, cond)
        else:
            bundle.denoiser.disable_adapters()
            ref = bundle.denoise(noisy, timesteps, cond)
            bundle.denoiser.enable_adapters()
    # fastpref's layout: pairs, winner first (w0, l0, w1, l1, ...)
    order = torch.stack([torch.arange(PAIRS), torch.arange(PAIRS) + PAIRS], dim=1).flatten()
    ours = diffusion_dpo_loss(pred[order], noise[order], ref[order], beta=BETA_DPO / 2, backend="reference")
    assert 0.05 < float(out["loss"]) < 5.0 and abs(float(out["loss"]) - 0.6931) > 1e-3  # informative, not ln 2
    torch.testing.assert_close(ours.loss.double(), out["loss"].double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.metrics["implicit_accuracy"].double(), out["implicit_acc"].double())
