"""NCP (Noise-Conditioned Perception): encoder features, the DDPM step to t-1, gradients, config checks, training."""

import math

import pytest
import torch

from fastpref.config import ConfigError, from_dict
from fastpref.ops import sample_errors
from fastpref.train import ncp
from fastpref.train.objectives import ObjectiveConfig
from fastpref.train.step import ReferenceModel, TrainStep


@pytest.fixture(scope="module")
def tokenizer():
    from fastpref.toy.tokenizer import build_tokenizer

    return build_tokenizer()


def tiny_bundle(family, tokenizer, prediction_type="epsilon"):
    from fastpref.models import sd, sdxl

    module = {"sd": sd, "sdxl": sdxl}[family]
    bundle = module.build_random(module.tiny_config("tiny", prediction_type=prediction_type), tokenizer, seed=0)
    bundle.vae = None
    return bundle


def random_cond(bundle, rows, generator):
    unet = bundle.denoiser
    cond = {"encoder_hidden_states": torch.randn(rows, 7, unet.config.cross_attention_dim, generator=generator)}
    if bundle.family == "sdxl":
        projection = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        cond["text_embeds"] = torch.randn(rows, projection, generator=generator)
        cond["time_ids"] = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(rows, 1)
    return cond


def add_lora(bundle, perturb=True):
    """LoRA as the trainer adds it; `perturb` gives the adapters non-zero weights (peft starts B at 0)."""
    from fastpref.train.loop import LoraConfig, add_lora as trainer_add_lora

    trainer_add_lora(bundle.denoiser, LoraConfig(rank=4))
    if perturb:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in bundle.denoiser.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return bundle


def synthetic_batch(bundle, groups=2, k=3, seed=0, psi=None):
    generator = torch.Generator().manual_seed(seed)
    cond = random_cond(bundle, groups, generator)
    return {
        "latents": torch.randn(groups, k, 4, 8, 8, generator=generator),
        "psi": psi if psi is not None else torch.rand(groups, k, generator=generator),
        "group_ids": torch.arange(100, 100 + groups),
        "cond": cond,
    }


def make_step(bundle, name="rankdpo", reference="adapters_off", **objective):
    cfg = ObjectiveConfig(name=name, feature_space="ncp", **objective)
    cfg.validate()
    return TrainStep(bundle, bundle.denoiser, cfg, ReferenceModel(reference, bundle.denoiser), noise_seed=3,
                     loss_backend="reference")


# ----------------------------------------------------------------------------------------- encoder features


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_encoder_features_are_the_unet_forward_up_to_the_mid_block(tokenizer, family):
    """bundle.encoder_features against the hidden states diffusers' own UNet forward produces (forward hooks)."""
    bundle = tiny_bundle(family, tokenizer)
    unet = bundle.denoiser.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([5, 300, 999])
    cond = random_cond(bundle, 3, generator)
    seen = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o))]
    hooks += [block.register_forward_hook(lambda m, i, o: seen.append(o[0])) for block in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o)))
    with torch.no_grad():
        bundle.denoise(x, t, cond)
        for hook in hooks:
            hook.remove()
        features = bundle.encoder_features(x, t, cond)
    assert len(features) == len(unet.down_blocks) + 2
    assert [f.shape for f in features] == [s.shape for s in seen]
    assert features[0].shape == (3, unet.config.block_out_channels[0], 8, 8)
    assert features[-1].shape == (3, unet.config.block_out_channels[-1], 4, 4)
    for mine, theirs in zip(features, seen):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    # the conditioning matters (cross-attention in the down blocks): another prompt, other features
    other = random_cond(bundle, 3, generator)
    with torch.no_grad():
        assert not torch.allclose(bundle.encoder_features(x, t, other)[-1], features[-1])


def test_feature_layers_and_the_multiscale_normalisation():
    """multiscale: every hidden state scaled by D_mid / D_i before the squared error (the reference's
    normalize_intermediate_steps), i.e. e = sum_i (D_mid/D_i)^2 ||dH_i||^2 / sum_i D_i."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, 8, 8, 8), (2, 8, 4, 4), (2, 16, 2, 2), (2, 16, 2, 2)]
    pol = [torch.randn(s, generator=generator) for s in shapes]
    tgt = [torch.randn(s, generator=generator) for s in shapes]
    sizes = [math.prod(s[1:]) for s in shapes]
    by_hand = sum((sizes[-1] / d) ** 2 * (p - g).square().flatten(1).sum(1) for p, g, d in zip(pol, tgt, sizes))
    by_hand = by_hand / sum(sizes)
    e_pol, _ = sample_errors(ncp.flatten_features(pol, "multiscale"), ncp.flatten_features(tgt, "multiscale"),
                             backend="reference")
    torch.testing.assert_close(e_pol, by_hand)
    assert torch.equal(ncp.flatten_features(pol, "mid"), pol[-1].flatten(1))
    assert torch.equal(ncp.flatten_features(pol, "down"), pol[-2].flatten(1))


# ----------------------------------------------------------------------------------------- the step to t-1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_to_t_minus_1_is_the_ddpm_posterior_step(tokenizer, prediction_type):
    """ddpm_previous_sample == diffusers' DDPMScheduler.step (t -> t-1, fixed_small variance, same z)."""
    from diffusers import DDPMScheduler

    from fastpref.models.bundle import ddpm_scheduler_config

    scheduler = DDPMScheduler.from_config(ddpm_scheduler_config(prediction_type))
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 2, 250, 999])
    x_t = torch.randn(4, 4, 8, 8, generator=generator)
    output = torch.randn(4, 4, 8, 8, generator=generator)
    # diffusers draws its variance noise from the generator it is given: the same seeds give our z
    z = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(100 + i)) for i in range(4)])
    mine = ncp.ddpm_previous_sample(scheduler, prediction_type, output, x_t, t, ncp.previous_timesteps(t), z)
    for i in range(4):
        step_generator = torch.Generator().manual_seed(100 + i)
        theirs = scheduler.step(output[i:i + 1], int(t[i]), x_t[i:i + 1], generator=step_generator).prev_sample
        torch.testing.assert_close(mine[i:i + 1], theirs, rtol=1e-5, atol=1e-5)
    # the true target gives x0_hat = x0: x_(t-1) is a draw of q(x_(t-1) | x_t, x0)
    x0 = torch.randn(4, 4, 8, 8, generator=generator)
    eps = torch.randn(4, 4, 8, 8, generator=generator)
    noisy = scheduler.add_noise(x0, eps, t)
    target = eps if prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)
    s = ncp.previous_timesteps(t)
    mean = ncp.ddpm_previous_sample(scheduler, prediction_type, target, noisy, t, s, torch.zeros_like(z))
    abar = scheduler.alphas_cumprod
    a_t, a_s = abar[t].view(-1, 1, 1, 1), abar[s].view(-1, 1, 1, 1)
    posterior_mean = (a_s.sqrt() * (1 - a_t / a_s) / (1 - a_t)) * x0 + ((a_t / a_s).sqrt() * (1 - a_s) / (1 - a_t)) * noisy
    torch.testing.assert_close(mean, posterior_mean, rtol=1e-4, atol=1e-5)
    # t = 0: the reference code clamps t-1 to 0, so the step is the identity
    zero = torch.zeros(1, dtype=torch.long)
    torch.testing.assert_close(ncp.ddpm_previous_sample(scheduler, prediction_type, output[:1], x_t[:1], zero, zero,
                                                        z[:1]), x_t[:1])


def test_variance_noise_is_a_function_of_seed_epoch_and_group():
    a = ncp.draw_variance_noise(3, 1, torch.tensor([5, 9]), (4, 8, 8))
    b = ncp.draw_variance_noise(3, 1, [9], (4, 8, 8))
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], ncp.draw_variance_noise(3, 2, [5], (4, 8, 8))[0])
    from fastpref.data.noise import draw_timesteps_and_noise

    class Sampler:
        def sample_timesteps(self, n, generator=None):
            return torch.randint(0, 1000, (n,), generator=generator)

    assert not torch.equal(a[0], draw_timesteps_and_noise(3, 1, [5], (4, 8, 8), Sampler()).noise[0])


# ----------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradients_reach_the_policy_through_the_frozen_encoder(tokenizer, mode):
    bundle = tiny_bundle("sd", tokenizer)
    if mode == "lora":
        add_lora(bundle)
        step = make_step(bundle, "dpo", "adapters_off")
    else:
        step = make_step(bundle, "dpo", "frozen_copy")
    out = step.forward(synthetic_batch(bundle), epoch=0)
    out.loss.backward()
    trained = {n: p for n, p in bundle.denoiser.named_parameters() if p.requires_grad}
    assert trained and all(p.grad is not None for p in trained.values())
    assert sum(float(p.grad.abs().sum()) for p in trained.values()) > 0
    # the encoder is frozen: base weights (LoRA: shared with the policy, adapters off) or the frozen copy
    frozen = step.reference.frozen if mode == "full" else bundle.denoiser
    assert all(p.grad is None for n, p in frozen.named_parameters() if "lora" not in n)
    if mode == "lora":
        assert bundle.denoiser.conv_in.weight.grad is None  # not a LoRA target: frozen
        # and the adapters are back on after the step
        assert any(m.__class__.__name__.endswith("Linear") and not getattr(m, "disable_adapters", True)
                   for m in bundle.denoiser.modules())


def test_the_policy_gradient_is_the_derivative_through_the_encoder(tokenizer):
    """d e_pol / d pred by autograd equals a central finite difference (float64): the gradient goes through
    the step to t-1 and the encoder, not around them."""
    bundle = tiny_bundle("sd", tokenizer)
    bundle.denoiser.double().eval().requires_grad_(False)
    reference = ReferenceModel("frozen_copy", bundle.denoiser)
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    target = torch.randn_like(noisy)
    z = torch.randn_like(noisy)
    t = torch.tensor([400, 400])
    cond = {k: v.double() for k, v in random_cond(bundle, 2, generator).items()}

    def encode(x, s, c):
        return reference.encoder_features(bundle, x, s, c, torch.autocast("cpu", enabled=False))

    def e_pol(pred):
        f_pol, f_tgt, _ = ncp.ncp_features(bundle, encode, noisy, t, cond, z, pred, target, None)
        return (f_pol - f_tgt).square().mean(dim=1).sum()

    pred = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(e_pol(pred), pred)
    direction = torch.randn(pred.shape, generator=generator, dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        numeric = (e_pol(pred + h * direction) - e_pol(pred - h * direction)) / (2 * h)
    assert float(grad.abs().sum()) > 0
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-5, atol=0.0)


def test_gradient_checkpointing_does_not_change_the_ncp_gradients(tokenizer):
    """The LoRA encoder is the policy with adapters off: a checkpointed block would recompute itself in the
    backward with the adapters on again. The encoder pass pauses checkpointing, so the gradients agree."""
    grads = {}
    for checkpointing in (False, True):
        bundle = add_lora(tiny_bundle("sd", tokenizer))
        if checkpointing:
            bundle.denoiser.enable_gradient_checkpointing()
        bundle.denoiser.train()
        step = make_step(bundle, "dpo", "adapters_off")
        step.forward(synthetic_batch(bundle), epoch=0).loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in bundle.denoiser.named_parameters() if p.requires_grad}
        if checkpointing:
            assert bundle.denoiser.is_gradient_checkpointing  # restored after the encoder pass
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------------------- objectives


def test_ncp_dpo_equals_ncp_rankdpo_at_k_2(tokenizer):
    bundle = add_lora(tiny_bundle("sd", tokenizer))
    psi = torch.tensor([[0.2, 0.9], [1.0, 0.0], [0.6, 0.1]])
    batch = synthetic_batch(bundle, groups=3, k=2, psi=psi)
    losses = {name: make_step(bundle, name).forward(batch, epoch=1) for name in ("dpo", "rankdpo")}
    torch.testing.assert_close(losses["dpo"].loss, losses["rankdpo"].loss, rtol=1e-5, atol=1e-7)
    assert abs(float(losses["dpo"].loss.detach()) - math.log(2)) > 1e-4  # the perturbed LoRA policy is not the reference
    # and NCP is not the latent-space loss
    latent = TrainStep(bundle, bundle.denoiser, ObjectiveConfig(name="dpo"),
                       ReferenceModel("adapters_off", bundle.denoiser), 3, loss_backend="reference")
    assert not torch.allclose(latent.forward(batch, epoch=1).loss, losses["dpo"].loss)


@pytest.mark.parametrize("layers", ["multiscale", "mid", "down"])
def test_every_layer_choice_runs_and_starts_at_log_2(tokenizer, layers):
    """At initialisation the LoRA policy is the reference: every pair's margin is 0, the loss log 2."""
    bundle = add_lora(tiny_bundle("sdxl", tokenizer), perturb=False)
    out = make_step(bundle, "rankdpo", ncp_layers=layers).forward(synthetic_batch(bundle), epoch=0)
    assert abs(float(out.loss) - math.log(2)) < 1e-6
    torch.testing.assert_close(out.metrics["e_pol"], out.metrics["e_ref"])
    assert float(out.metrics["e_pol"]) > 0


def test_ncp_step_at_the_start_does_not_depend_on_how_the_batch_is_split(tokenizer):
    """LoRA at its start (B = 0): the policy is the reference, so e_pol == e_ref exactly and RankDPO's policy ranks
    tie-break by row index whatever the batch. One step on 4 groups then has the mean gradient of 2 steps on 2 groups
    each, as 1 process and 2 processes with the same global batch must (test_ncp_parallel.py runs those). Encoding the
    target and reference rows in one 2N-row pass rounded differently from the policy's N rows: that noise picked the
    ranks, and the two gradients differed by 20-35%."""
    bundle = add_lora(tiny_bundle("sd", tokenizer), perturb=False)
    step = make_step(bundle, "rankdpo")
    batch = synthetic_batch(bundle, groups=4, k=3)
    halves = [{"latents": batch["latents"][i:i + 2], "psi": batch["psi"][i:i + 2],
               "group_ids": batch["group_ids"][i:i + 2], "cond": {k: v[i:i + 2] for k, v in batch["cond"].items()}}
              for i in (0, 2)]
    trained = [p for p in bundle.denoiser.parameters() if p.requires_grad]

    def loss_and_grad(b):
        for p in trained:
            p.grad = None
        out = step.forward(b, epoch=0)
        out.loss.backward()
        return out, torch.cat([p.grad.flatten() for p in trained])

    whole, grad = loss_and_grad(batch)
    assert float(whole.metrics["margin"]) == 0.0 and abs(float(whole.loss) - math.log(2)) < 1e-7
    split = [loss_and_grad(half) for half in halves]
    assert all(float(out.metrics["margin"]) == 0.0 for out, _ in split)
    mean = (split[0][1] + split[1][1]) / 2
    assert float(grad.norm()) > 0
    assert float((grad - mean).norm() / grad.norm()) < 1e-5


# ----------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("mode", ["cached", "none"])
def test_ncp_refuses_a_reference_that_is_not_live(tokenizer, mode):
    bundle = tiny_bundle("sd", tokenizer)
    with pytest.raises(ConfigError, match=rf"reference: '{mode}' cannot serve .*adapters_off.*frozen_copy"):
        make_step(bundle, "dpo", mode)


def test_ncp_with_cached_reference_is_refused_by_the_config_and_auto_runs_it_live(cached_dataset, tmp_path):
    from fastpref.train.loop import TrainConfig, Trainer

    settings = {
        "model": {"path": cached_dataset["model"]}, "data": {"root": cached_dataset["root"], "batch_groups": 2},
        "output_dir": str(tmp_path), "max_steps": 2, "progress": False, "tensorboard": False,
        "reference": "cached", "objective": {"name": "rankdpo", "feature_space": "ncp"},
    }
    with pytest.raises(ConfigError, match="reference: 'cached' cannot serve objective.feature_space: ncp"):
        from_dict(TrainConfig, settings)  # validation, before any model is loaded
    trainer = Trainer(from_dict(TrainConfig, {**settings, "reference": "auto"}))
    assert trainer.dataset.e_ref is not None  # the dataset has cached errors, yet NCP needs the live model
    assert trainer.reference_mode in ("adapters_off", "frozen_copy")


def test_ncp_refuses_flow_matching_models(tokenizer):
    from fastpref.models import sd3

    bundle = sd3.build_random(sd3.tiny_config("tiny"), tokenizer, seed=0)
    with pytest.raises(ConfigError, match="needs a DDPM-trained U-Net.*'sd3' model predicts 'flow'"):
        ncp.check_supported(bundle, "frozen_copy")
    with pytest.raises(NotImplementedError, match="no U-Net encoder"):
        bundle.encoder_features(None, None, {})


@pytest.mark.parametrize(
    "objective, needle",
    [
        ({"name": "mapo", "feature_space": "ncp"}, "objective.feature_space: 'ncp' composes with objectives"),
        ({"name": "kto", "feature_space": "ncp"}, "not 'kto'"),
        ({"name": "dpo", "feature_space": "ncp", "min_snr_gamma": 5.0}, "objective.min_snr_gamma: must be null"),
        ({"name": "dpo", "feature_space": "perceptual"}, "objective.feature_space: 'perceptual' is not one of"),
        ({"name": "dpo", "feature_space": "ncp", "ncp_layers": "up"}, "objective.ncp_layers: 'up' is not one of"),
    ],
)
def test_ncp_config_validation(objective, needle):
    from fastpref.train.loop import TrainConfig

    with pytest.raises(ConfigError, match=needle):
        from_dict(TrainConfig, {"data": {"root": "/nowhere"}, "objective": objective})


def test_ncp_objectives_need_the_initial_model():
    """Reference-free objectives still need the frozen initial denoiser (the encoder) under NCP, but never run
    the reference's prediction into the loss."""
    cpo = ObjectiveConfig(name="cpo", feature_space="ncp")
    assert cpo.needs_reference and not cpo.compares_to_reference
    assert not ObjectiveConfig(name="cpo").needs_reference
    assert ObjectiveConfig(name="dpo", feature_space="ncp").compares_to_reference


# ----------------------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "objective, mode, reference",
    [("rankdpo", "lora", "adapters_off"), ("dpo", "full", "frozen_copy"), ("cpo", "lora", "adapters_off"),
     ("sft", "full", "frozen_copy")],
)
def test_ncp_objectives_train_in_the_loop(cached_dataset, tmp_path, objective, mode, reference):
    from fastpref.train.loop import TrainConfig, train
    from fastpref.train.metrics import read_metrics

    cfg = from_dict(TrainConfig, {
        "model": {"path": cached_dataset["model"]}, "data": {"root": cached_dataset["root"], "batch_groups": 2},
        "output_dir": str(tmp_path), "max_steps": 3, "checkpoint_every": 3, "progress": False,
        "tensorboard": False, "lr": 1e-3, "loss_backend": "reference", "mode": mode, "reference": reference,
        "objective": {"name": objective, "feature_space": "ncp"},
    })
    summary = train(cfg)
    assert summary["reference"] == reference
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records)


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory):
    """8 prompts x K=3 images of the shipped toy-sd, labelled and cached (no cached e_ref)."""
    import data_helpers as helpers

    from fastpref.models import toy_model_path

    root = tmp_path_factory.mktemp("ncp-toy")
    model = str(toy_model_path("toy-sd"))
    torch.set_num_threads(1)
    prompts = helpers.write_prompts(root / "prompts.jsonl", 8)
    helpers.build_dataset(root, prompts, model, reference_errors={"epochs": 0})
    return {"root": str(root), "model": model}


@pytest.mark.slow  # builds its own toy-sd dataset (synth, label, cache) first
def test_ncp_rankdpo_lowers_the_loss_of_the_shipped_toy_model(toy_dataset, tmp_path):
    """A few NCP-RankDPO LoRA steps on toy-sd data: the loss of the epoch-0 batches falls below its start (log 2,
    where policy = reference)."""
    from fastpref.train.loop import TrainConfig, Trainer

    cfg = from_dict(TrainConfig, {
        "model": {"path": toy_dataset["model"]}, "data": {"root": toy_dataset["root"], "batch_groups": 4},
        "output_dir": str(tmp_path), "max_steps": 6, "checkpoint_every": 100, "progress": False,
        "tensorboard": False, "lr": 1e-2, "loss_backend": "reference",
        "objective": {"name": "rankdpo", "feature_space": "ncp"},
    })
    trainer = Trainer(cfg)
    assert trainer.reference_mode == "adapters_off"  # auto, no cached e_ref

    def epoch_zero_loss():
        with torch.no_grad():  # a stream of its own: the trainer's keeps its position
            losses = [float(trainer.step_fn.forward(batch, 0).loss)
                      for batch in trainer.dataset.stream(cfg.data.batch_groups, seed=cfg.seed)]
        return sum(losses) / len(losses)

    before = epoch_zero_loss()
    assert abs(before - math.log(2)) < 1e-6
    trainer.train()
    after = epoch_zero_loss()
    assert after < before - 0.015, (before, after)  # 0.693 -> 0.654 when written
