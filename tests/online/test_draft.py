"""DRaFT's pieces on tiny random models: the deterministic samplers against diffusers, gradients only through the
last K steps (hook count and a finite difference), the reference at the very x_i the policy saw, DRaFT+'s KL against
a float64 recomputation, DRaFT-LV with n = 1 against DRaFT-1, AlignProp's seeded K, and the config refusals."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fastpref.config import ConfigError  # noqa: E402
from helpers.train import train_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from fastpref.models import sd, sd3, sdxl
    from fastpref.toy.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("draft-models")
    sd.build_random(sd.tiny_config("tiny"), build_tokenizer(), seed=0).save_pretrained(root / "sd")
    sdxl.build_random(sdxl.tiny_config("tiny"), build_tokenizer(), seed=0).save_pretrained(root / "sdxl")
    sd3.build_random(sd3.tiny_config("tiny"), build_tokenizer(), seed=0).save_pretrained(root / "sd3")
    return {name: str(root / name) for name in ("sd", "sdxl", "sd3")}


def draft_config(model, out, **overrides):
    data = {
        "model": {"path": model},
        "objective": {"name": "draft"},
        "output_dir": str(out),
        "max_steps": 2,
        "checkpoint_every": 2,
        "progress": False,
        "tensorboard": False,
        "lr": 1e-3,
        "loss_backend": "reference",
        "online": {"prompts": "toy:train", "prompts_per_rollout": 2, "group_size": 2, "num_steps": 4,
                   "guidance_scale": 3.0, "eta": 0.0, "reward": {"quality": 1.0},
                   "draft": {"k": 2, "kl_coeff": 0.5, "batch_size": 2}},
    }
    return train_config(data, **overrides)


def first_batch(trainer):
    epoch, batch = next(trainer.batches())
    return epoch, batch


def trainable_parameters(trainer):
    return [p for p in trainer.bundle.denoiser.parameters() if p.requires_grad]


class CallLog:
    """Every denoiser call: its timestep, whether it builds a graph, whether a gradient reached its output."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, args, kwargs_or_output, output=None):
        output = kwargs_or_output if output is None else output
        sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        timestep = args[1] if len(args) > 1 else None
        entry = {"t": float(torch.as_tensor(timestep).reshape(-1)[0]) if timestep is not None else None,
                 "graph": sample.requires_grad, "grad": None}
        if sample.requires_grad:
            def record(grad, entry=entry):
                entry["grad"] = float(grad.abs().sum())
            sample.register_hook(record)
        self.calls.append(entry)

    def close(self):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_sampler_is_diffusers_euler_discrete(prediction_type):
    """The SDXL sampler's steps reproduce diffusers' EulerDiscreteScheduler (s_churn 0) on random model outputs."""
    import diffusers

    from fastpref.online.draft import DeterministicSampler

    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 prediction_type=prediction_type, timestep_spacing="leading",
                                                 steps_offset=1)
    reference = diffusers.EulerDiscreteScheduler.from_config(scheduler.config)
    bundle = type("B", (), {"prediction_type": prediction_type, "family": "sdxl", "sample_scheduler": scheduler})()
    sampler = DeterministicSampler.for_bundle(bundle, 6)
    reference.set_timesteps(6)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    x = sampler.initial(noise)
    y = noise * reference.init_noise_sigma
    torch.testing.assert_close(x, y)
    for i, t in enumerate(reference.timesteps):
        assert float(sampler.timesteps[i]) == float(t)
        torch.testing.assert_close(sampler.model_input(x, i), reference.scale_model_input(y, t))
        output = torch.randn(2, 4, 8, 8, generator=generator)
        x = sampler.step(i, output, x)
        y = reference.step(output, t, y).prev_sample
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_renoise_is_the_forward_process():
    """DRaFT-LV's re-noising: DDIM's add_noise at the last step's timestep, x0 + sigma eps (Euler), flow mixing."""
    import diffusers

    from fastpref.online.draft import DeterministicSampler

    ddpm = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    bundle = type("B", (), {"prediction_type": "epsilon", "family": "sd", "noise_scheduler": ddpm})()
    sampler = DeterministicSampler.for_bundle(bundle, 5)
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = sampler.timesteps[-1:]
    torch.testing.assert_close(sampler.renoise(x0, 4, eps), ddpm.add_noise(x0, eps, t.expand(2)))


# ---------------------------------------------------------------------------------------------- gradients


def test_gradient_flows_only_through_the_last_k_steps(tiny_models, tmp_path):
    """N = 4, K = 2: the prefix's calls build no graph; the last two calls (recomputed once more in the backward by
    checkpointing) get a nonzero gradient; every trainable weight that moves is reached through them."""
    from fastpref.train.online import OnlineTrainer

    trainer = OnlineTrainer(draft_config(tiny_models["sd"], tmp_path / "run", **{"online.draft.kl_coeff": 0.0}))
    log = CallLog(trainer.bundle.denoiser)
    try:
        epoch, batch = first_batch(trainer)
        timesteps = [float(t) for t in trainer.method.sampler.timesteps]
        prefix = [c for c in log.calls]
        assert len(prefix) == 2 and not any(c["graph"] for c in prefix)  # steps 0, 1 for the two images at once
        assert [c["t"] for c in prefix] == timesteps[:2]
        log.calls.clear()
        out = trainer.method.forward(batch, epoch)
        assert [c["t"] for c in log.calls] == timesteps[2:] and all(c["graph"] for c in log.calls)
        recomputed = []
        handle = trainer.bundle.denoiser.register_forward_pre_hook(
            lambda module, args: recomputed.append(float(torch.as_tensor(args[1]).reshape(-1)[0])))
        try:
            out.loss.backward()
        finally:
            handle.remove()
        assert all(c["grad"] is not None and c["grad"] > 0 for c in log.calls[:2]), log.calls
        # checkpointing: each differentiable call ran once more, in the backward (last step first); the recompute
        # stops once the activations it needs are back, so only a pre-hook sees it
        assert recomputed == timesteps[2:][::-1]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable_parameters(trainer))
    finally:
        log.close()


def test_truncated_gradient_matches_a_finite_difference(tiny_models, tmp_path):
    """d loss / d theta along a random unit direction, x_{N-K} held fixed (the truncation), by autograd and by a
    central difference of the same forward (steps, decode, KL). The reward is a fixed random linear functional of the
    pixels, centred so that the loss is small: float32 noise on a loss of order 1 would swamp the difference."""
    from fastpref.train.online import OnlineTrainer

    trainer = OnlineTrainer(draft_config(tiny_models["sd"], tmp_path / "run"))
    method = trainer.method
    epoch, batch = first_batch(trainer)
    parameters = trainable_parameters(trainer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0: move it so that the KL and the adapters' A weights carry a gradient
        for p in parameters:
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    weights = torch.randn(64, 3, 64, 64, generator=generator)

    def linear_reward(pixels, texts):
        n, _, h, w = pixels.shape
        return ((pixels - 0.5) * weights[:n, :, :h, :w]).flatten(1).mean(1), {}

    method.reward = linear_reward
    loss = method.forward(batch, epoch).loss
    grads = torch.autograd.grad(loss, parameters)
    # along the gradient plus a random part: the largest derivative there is (well above float32 noise), and a
    # gradient wrong in direction or size shows
    noise = [torch.randn(p.shape, generator=generator) for p in parameters]
    scale = sum(float(g.square().sum()) for g in grads) ** 0.5 / sum(float(d.square().sum()) for d in noise) ** 0.5
    direction = [g + 0.5 * scale * d for g, d in zip(grads, noise)]
    norm = sum(float(d.square().sum()) for d in direction) ** 0.5
    direction = [d / norm for d in direction]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))
    h = 3e-2

    def loss_at(scale):
        with torch.no_grad():
            for p, d in zip(parameters, direction):
                p.add_(scale * h * d)
            value = float(method.forward(batch, epoch).loss)
            for p, d in zip(parameters, direction):
                p.sub_(scale * h * d)
        return value

    numeric = (loss_at(1) - loss_at(-1)) / (2 * h)
    assert analytic != 0
    assert analytic == pytest.approx(numeric, rel=2e-2)


def test_reference_sees_the_policys_x_i_and_kl_is_the_float64_recomputation(tiny_models, tmp_path):
    from fastpref.online.rollout import expand_rows
    from fastpref.train.online import OnlineTrainer

    trainer = OnlineTrainer(draft_config(tiny_models["sdxl"], tmp_path / "run"))
    with torch.no_grad():  # a policy that differs from the reference
        for p in trainable_parameters(trainer):
            p.add_(0.05 * torch.randn_like(p))
    method = trainer.method
    epoch, batch = first_batch(trainer)
    seen = []
    policy_inputs = []
    original = trainer.reference_prediction

    def recording(latents, t, cond, uncond, scale):
        seen.append(latents.clone())
        return original(latents, t, cond, uncond, scale)

    trainer.reference_prediction = recording
    handle = trainer.bundle.denoiser.register_forward_pre_hook(
        lambda module, args: policy_inputs.append(args[0].detach().clone()) if torch.is_grad_enabled() else None)
    try:
        x = batch["x"]
        cond = batch["cond"]
        _, predictions, references = method.differentiable_steps(x, batch["start"], cond,
                                                                 expand_rows(trainer.uncond, x.shape[0]))
    finally:
        handle.remove()
    n = x.shape[0]
    assert len(seen) == len(policy_inputs) == 2
    for ref_input, pol_input in zip(seen, policy_inputs):
        torch.testing.assert_close(ref_input, pol_input[:n], rtol=0, atol=0)  # CFG: [x; x], the same x_i
        torch.testing.assert_close(ref_input, pol_input[n:], rtol=0, atol=0)
    # the reference really is the adapters-off network, not the policy
    assert all(float((p - r).abs().max()) > 0 for p, r in zip(predictions, references))
    kl = method.kl(predictions, references)
    expected = torch.stack([((p.double() - r.double()) ** 2).flatten(1).mean(1)
                            for p, r in zip(predictions, references)]).mean(0)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-9)
    kl.sum().backward()  # and the fused op carries the KL's gradient to the policy
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable_parameters(trainer))


def test_lv_with_one_renoising_is_draft_1_from_the_renoised_latent(tiny_models, tmp_path):
    """DRaFT-LV, n = 1: the same loss and gradient as DRaFT-1 started from the re-noised x_1 of the stop-grad x0."""
    from fastpref.train.online import OnlineTrainer

    cfg = draft_config(tiny_models["sd3"], tmp_path / "run", **{"online.draft.variant": "lv", "online.draft.k": 1,
                                                               "online.draft.lv_samples": 1})
    trainer = OnlineTrainer(cfg)
    method = trainer.method
    with torch.no_grad():
        for p in trainable_parameters(trainer):
            p.add_(0.05 * torch.randn_like(p))
    epoch, batch = first_batch(trainer)
    assert batch["start"] == method.sampler.num_steps and batch["lv_noise"].shape[1] == 1
    parameters = trainable_parameters(trainer)
    lv = method.forward(batch, epoch)
    lv_grads = torch.autograd.grad(lv.loss, parameters)
    last = method.sampler.num_steps - 1
    single = {"x": method.sampler.renoise(batch["x"], last, batch["lv_noise"][:, 0]), "start": last,
              "texts": batch["texts"], "cond": batch["cond"]}
    one = method.forward(single, epoch)
    grads = torch.autograd.grad(one.loss, parameters)
    assert float(lv.loss) == pytest.approx(float(one.loss), rel=1e-6)
    for a, b in zip(lv_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # with n = 2 the reward is the mean of the two re-noisings' rewards
    batch2 = dict(batch, lv_noise=torch.cat([batch["lv_noise"], torch.randn_like(batch["lv_noise"])], dim=1))
    two = method.forward(batch2, epoch)
    other = method.forward(dict(single, x=method.sampler.renoise(batch["x"], last, batch2["lv_noise"][:, 1])), epoch)
    assert float(two.metrics["reward"]) == pytest.approx((float(one.metrics["reward"]) +
                                                          float(other.metrics["reward"])) / 2, rel=1e-5)


def test_alignprop_draws_k_per_step_seeded_and_in_range(tiny_models, tmp_path):
    from fastpref.online.rollout import RolloutPrompts
    from fastpref.train.online import OnlineTrainer

    cfg = draft_config(tiny_models["sd"], tmp_path / "run", **{"online.draft.variant": "alignprop",
                                                               "online.draft.k": 4, "online.draft.k_min": 2})
    method = OnlineTrainer(cfg).method
    draws = [method.truncation(RolloutPrompts(epoch, start, [])) for epoch in range(3) for start in range(0, 40, 2)]
    assert set(draws) == {2, 3, 4}
    again = [method.truncation(RolloutPrompts(epoch, start, [])) for epoch in range(3) for start in range(0, 40, 2)]
    assert draws == again


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, key", [
    ({"online.reward": {"verifier": 1.0}}, "online.reward.verifier"),  # not differentiable
    ({"online.eta": 1.0}, "online.eta"),
    ({"online.draft.k": 5}, "online.draft.k"),
    ({"online.draft.variant": "lv", "online.draft.k": 2}, "online.draft.k"),
    ({"online.draft.variant": "alignprop", "online.draft.k": 2, "online.draft.k_min": 3}, "online.draft.k_min"),
    ({"online.draft.batch_size": 3}, "online.draft.batch_size"),
    ({"online.draft.kl_coeff": -1.0}, "online.draft.kl_coeff"),
    ({"online.draft.variant": "bogus"}, "online.draft.variant"),
])
def test_bad_draft_configs_are_refused_at_validation(tmp_path, monkeypatch, overrides, key):
    """Refused by the config itself (no model path needed, nothing loads), the message naming the key."""
    import fastpref.models

    monkeypatch.setattr(fastpref.models, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        draft_config("toy-sd", tmp_path / "run", **overrides)
