"""The trainer routes each objective config to the right loss on the right images.

For every objective (and every loss type of dpo / rankdpo) a Trainer is built from a config, its TrainStep runs on
a fixed batch, and the loss must equal an independent computation: the per-image errors of the policy and of the
reference, computed here directly (same t, eps and noisy input; the reference is the initial model loaded afresh
from disk, or the cached e_ref), then fed to the pure-torch oracle fastpref.ops.reference.ranked_pair_loss_reference
(or the objective's closed form) on the images the objective should use, which are picked here by hand from psi:
best / worst for dpo, cpo and mapo (groups whose scores all tie dropped), the best for sft, all K for rankdpo and
kto. The policy is perturbed first, so that it differs from the reference and every loss is away from its
starting value.

Tolerances: the trainer computes in float32, the oracle in float64 from the same float32 predictions, rtol 1e-4
(ipo 1e-3: its loss is the square of a margin of ~1e-3 that float32 errors of ~1 resolve to ~1e-7), atol 0; measured
<= 1.7e-5 (ipo alike). beta is 500 in latent space, not the default 2500, so that float32 rounding of the errors is
not magnified past that. A routing mistake (dpo -> rankdpo, hinge -> sigmoid, sft on the worst image, a coefficient
not passed on, ...) moved the loss by 1% or more where tried (test_the_oracle_rejects_a_misrouted_step keeps a few).

Also: unit tests of `select_images` and `min_snr_weight`.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fastpref.data.noise import draw_timesteps_and_noise
from fastpref.models.bundle import unet_encoder_features
from fastpref.ops.reference import ranked_pair_loss_reference
from fastpref.train import ncp
from fastpref.train import step as step_module
from fastpref.train.loop import Trainer
from fastpref.train.objectives import ObjectiveConfig, min_snr_weight, select_images
from helpers.train import make_config

TIED_GROUP = 2  # this batch position gets all-equal scores: pairwise objectives must drop it

# ----------------------------------------------------------------------------------------- the oracle


def rows_by_hand(name: str, psi: torch.Tensor) -> list[tuple[int, list[int]]]:
    """[(batch position, [image slots])] the objective should train on, per group, in the order the ops expect
    (winner first for pairs). Ties: the first best / first worst slot (torch.argmax / argmin's convention)."""
    picked = []
    for g, scores in enumerate(psi.tolist()):
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        if name in ("rankdpo", "kto"):
            picked.append((g, list(range(len(scores)))))
        elif name == "sft":
            picked.append((g, [best]))
        elif max(scores) > min(scores):  # dpo, cpo, mapo: no preference in an all-tied group
            picked.append((g, [best, worst]))
    return picked


def min_snr_by_hand(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, prediction_type: str):
    """Hang et al. 2023 (Min-SNR-gamma), as diffusers' train_text_to_image.py weights the MSE, in float64."""
    abar = alphas_cumprod.double()[t.long()]
    snr = abar / (1.0 - abar)  # (alpha / sigma)^2, diffusers.training_utils.compute_snr
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0)


def oracle_loss(obj: ObjectiveConfig, e_pol: torch.Tensor, e_ref: torch.Tensor | None, scores: torch.Tensor,
                per_group: int, num_train_timesteps: int) -> torch.Tensor:
    """The objective on float64 per-image errors laid out group by group (winner first for pairs)."""
    n = e_pol.shape[0]
    offsets = torch.arange(0, n + 1, per_group, dtype=torch.int64)
    pair_scores = torch.tensor([1.0, 0.0], dtype=torch.float64).repeat(n // 2) if per_group == 2 else None
    if obj.name == "dpo":
        loss, _ = ranked_pair_loss_reference(e_pol - e_ref, pair_scores, offsets, obj.beta, obj.loss_type, "uniform")
        return loss.mean()
    if obj.name == "rankdpo":
        loss, stats = ranked_pair_loss_reference(e_pol - e_ref, scores, offsets, obj.beta, obj.loss_type,
                                                 obj.weighting)
        return loss[stats[:, 0] > 0].mean()  # groups with at least one ordered pair
    if obj.name == "cpo":
        loss, _ = ranked_pair_loss_reference(e_pol, pair_scores, offsets, obj.beta, "sigmoid", "uniform")
        return loss.mean() + obj.cpo_sft_weight * e_pol[0::2].mean()
    if obj.name == "sft":
        return e_pol.mean()
    if obj.name == "mapo":  # mapo-t2i train.py: a*e / (exp(a*e) - 1) as log-likelihood proxy
        e_w, e_l = e_pol[0::2], e_pol[1::2]
        a = obj.mapo_snr_value
        log_odds = a * e_w / torch.expm1(a * e_w) - a * e_l / torch.expm1(a * e_l)
        return e_w.mean() - obj.mapo_beta * F.logsigmoid(num_train_timesteps * log_odds).mean()
    if obj.name == "kto":  # Diffusion-KTO, halo sigmoid, kl = clamp(mean implied reward, 0) without gradient
        implied = e_ref - e_pol
        kl = implied.mean().clamp_min(0.0)
        desirable = scores >= obj.kto_desirable_threshold
        sign = torch.where(desirable, 1.0, -1.0).double()
        weight = torch.where(desirable, obj.kto_desirable_weight, obj.kto_undesirable_weight).double()
        return (weight * (1.0 - torch.sigmoid(sign * obj.beta * (implied - kl)))).mean()
    raise AssertionError(obj.name)


@torch.no_grad()
def expected_loss(trainer: Trainer, batch: dict, epoch: int, initial_unet) -> torch.Tensor:
    """The loss the trainer's step should produce on `batch`, computed without TrainStep / select_images /
    compute_loss."""
    obj = trainer.cfg.objective
    bundle, scheduler = trainer.bundle, trainer.bundle.noise_scheduler
    picked = rows_by_hand(obj.name, batch["psi"])
    x0, eps, t, cond, scores, cached, z = [], [], [], [], [], [], []
    shape = tuple(batch["latents"].shape[2:])
    for g, slots in picked:
        group_id = int(batch["group_ids"][g])
        draw = draw_timesteps_and_noise(trainer.dataset.noise_seed, epoch, [group_id], shape, bundle)
        variance_noise = ncp.draw_variance_noise(trainer.dataset.noise_seed, epoch, [group_id], shape)
        for i in slots:
            x0.append(batch["latents"][g, i].float())
            eps.append(draw.noise[0])
            t.append(draw.timesteps[0])
            cond.append(batch["cond"]["encoder_hidden_states"][g].float())
            scores.append(float(batch["psi"][g, i]))
            z.append(variance_noise[0])
            if "e_ref" in batch:
                cached.append(float(batch["e_ref"][g, i]))
    x0, eps, cond, z = (torch.stack(v) for v in (x0, eps, cond, z))
    t = torch.stack(t).long()
    scores = torch.tensor(scores, dtype=torch.float64)
    noisy = scheduler.add_noise(x0, eps, t)
    assert bundle.prediction_type == "epsilon"
    target = eps
    policy = bundle.denoiser(noisy, t, encoder_hidden_states=cond).sample
    compares = obj.name in ("dpo", "rankdpo", "kto")
    reference = initial_unet(noisy, t, encoder_hidden_states=cond).sample if compares or obj.feature_space == "ncp" \
        else None

    if obj.feature_space == "ncp":  # errors between encoder features of the initial model at t-1
        s = ncp.previous_timesteps(t)

        def features(output):
            x_s = ncp.ddpm_previous_sample(scheduler, "epsilon", output, noisy, t, s, z)
            return ncp.flatten_features(unet_encoder_features(initial_unet, x_s, s, cond), obj.ncp_layers).double()

        f_target = features(target)
        e_pol = (features(policy) - f_target).square().mean(dim=1)
        e_ref = (features(reference) - f_target).square().mean(dim=1) if compares else None
    else:
        e_pol = (policy.double() - target.double()).square().flatten(1).mean(dim=1)
        if not compares:
            e_ref = None
        elif trainer.reference_mode == "cached":
            e_ref = torch.tensor(cached, dtype=torch.float64)
        else:
            e_ref = (reference.double() - target.double()).square().flatten(1).mean(dim=1)
        if obj.min_snr_gamma is not None:
            weight = min_snr_by_hand(scheduler.alphas_cumprod, t, obj.min_snr_gamma, bundle.prediction_type)
            e_pol = e_pol * weight
            e_ref = e_ref * weight if e_ref is not None else None
    per_group = len(picked[0][1])
    return oracle_loss(obj, e_pol, e_ref, scores, per_group, bundle.num_train_timesteps)


# ----------------------------------------------------------------------------------------- setup


@pytest.fixture(scope="module")
def initial_unet(cached_dataset):
    """The model every run starts from, loaded afresh: the reference (and NCP's feature extractor)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(cached_dataset["model"], subfolder="unet").eval()


def perturb_policy(trainer: Trainer) -> None:
    """Move the policy away from the initial model (LoRA: B != 0; full: every weight), deterministically."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.bundle.denoiser.named_parameters():
            if not param.requires_grad:
                continue
            if trainer.cfg.mode == "lora":
                if "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.add_(0.01 * param.std().nan_to_num(0.0) * torch.randn(param.shape, generator=generator))


def fixed_batch(trainer: Trainer) -> tuple[int, dict]:
    """The first batch of epoch 1 (4 groups), with one group's scores made all equal."""
    batches = trainer.batches()
    for epoch, batch in batches:
        if epoch == 1:
            break
    batch = dict(batch)
    psi = batch["psi"].clone()
    psi[TIED_GROUP] = 0.5
    batch["psi"] = psi
    return epoch, batch


def build(cached_dataset, tmp_path, objective: dict, mode: str, reference: str) -> Trainer:
    objective = objective if objective.get("feature_space") == "ncp" else {**LATENT, **objective}
    overrides = {f"objective.{key}": value for key, value in objective.items()}
    cfg = make_config(cached_dataset, tmp_path, mode=mode, reference=reference, **{"data.batch_groups": 4},
                      **overrides)
    trainer = Trainer(cfg)
    perturb_policy(trainer)
    trainer.bundle.denoiser.eval()
    return trainer


# Non-default coefficients throughout, so that a coefficient the config does not reach the loss with fails too.
# beta: 500 in latent space (margins of ~1e-3 give beta * margin of O(1), and float32 error rounding of ~1e-7 moves
# the loss by < 1e-5); NCP's feature errors are ~1e-4 of the latent ones, so it gets 50000.
LATENT = {"beta": 500.0, "cpo_sft_weight": 0.5, "mapo_beta": 0.2, "mapo_snr_value": 0.7,
          "kto_desirable_weight": 1.5}
NCP = {"beta": 50000.0, "cpo_sft_weight": 0.5, "feature_space": "ncp"}

CASES = [
    # (objective overrides, mode, reference, the reference mode the trainer must pick)
    *[({"name": "dpo", "loss_type": lt}, "lora", "auto", "cached") for lt in ("sigmoid", "hinge", "ipo")],
    ({"name": "dpo"}, "lora", "adapters_off", "adapters_off"),
    ({"name": "dpo", "min_snr_gamma": 5.0}, "lora", "auto", "cached"),
    *[({"name": "rankdpo", "loss_type": lt}, "lora", "auto", "cached") for lt in ("sigmoid", "hinge", "ipo")],
    ({"name": "rankdpo", "weighting": "uniform"}, "lora", "auto", "cached"),
    ({"name": "rankdpo", "loss_type": "hinge"}, "full", "frozen_copy", "frozen_copy"),
    ({"name": "kto"}, "full", "frozen_copy", "frozen_copy"),
    ({"name": "kto", "kto_undesirable_weight": 2.0}, "lora", "auto", "cached"),
    ({"name": "cpo"}, "lora", "auto", "none"),
    ({"name": "sft"}, "full", "auto", "none"),
    ({"name": "mapo"}, "lora", "auto", "none"),
    # NCP: the same objectives on encoder features of the frozen initial model at t-1 (live reference only)
    ({"name": "dpo", **NCP}, "lora", "adapters_off", "adapters_off"),
    ({"name": "dpo", "loss_type": "hinge", **NCP}, "full", "frozen_copy", "frozen_copy"),
    ({"name": "rankdpo", **NCP}, "lora", "adapters_off", "adapters_off"),
    ({"name": "rankdpo", "loss_type": "ipo", **NCP}, "lora", "adapters_off", "adapters_off"),
    ({"name": "cpo", **NCP}, "lora", "adapters_off", "adapters_off"),
    ({"name": "sft", **NCP}, "full", "frozen_copy", "frozen_copy"),
]


def case_id(case):
    objective, mode, reference, _ = case
    shown = [str(v) for k, v in objective.items() if k not in NCP or k == "feature_space"]
    return "-".join([*shown, mode, reference])


def tolerances(objective: dict) -> dict:
    return {"rtol": 1e-3 if objective.get("loss_type") == "ipo" else 1e-4, "atol": 0.0}


# ----------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_the_step_computes_the_configured_objective_on_the_right_images(cached_dataset, tmp_path, initial_unet,
                                                                         case):
    objective, mode, reference, expected_reference = case
    trainer = build(cached_dataset, tmp_path, objective, mode, reference)
    assert trainer.reference_mode == expected_reference
    epoch, batch = fixed_batch(trainer)
    with torch.no_grad():
        out = trainer.step_fn.forward(batch, epoch)
    expected = expected_loss(trainer, batch, epoch, initial_unet)
    torch.testing.assert_close(out.loss.double(), expected, **tolerances(objective))
    per_group = {"rankdpo": 3, "kto": 3, "sft": 1}.get(objective["name"], 2)
    groups = 4 if objective["name"] in ("rankdpo", "kto", "sft") else 3  # pairs: the tied group is dropped
    assert out.num_images == groups * per_group
    if objective["name"] in ("dpo", "rankdpo"):  # a loss away from its value at policy == reference
        beta = trainer.cfg.objective.beta
        value = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": 1.0 / (2 * beta) ** 2}[trainer.cfg.objective.loss_type]
        assert abs(float(out.loss) - value) > 1e-2 * value


def test_the_oracle_rejects_a_misrouted_step(cached_dataset, tmp_path, initial_unet, monkeypatch):
    """The comparison above is sharp enough to catch routing mistakes: dpo computed as rankdpo, hinge computed as
    sigmoid, sft trained on the worst image, pairs taken worst first, the tied group kept."""
    from fastpref.train import objectives

    trainer = build(cached_dataset, tmp_path, {"name": "dpo", "loss_type": "hinge"}, "lora", "auto")
    epoch, batch = fixed_batch(trainer)
    right = {}
    for name, loss_type in (("dpo", "hinge"), ("sft", "sigmoid")):
        trainer.step_fn.objective = trainer.cfg.objective = ObjectiveConfig(name=name, loss_type=loss_type, beta=500.0)
        right[name] = expected_loss(trainer, batch, epoch, initial_unet)

    def loss_with(name, loss_type="hinge", select=None, compute=None):
        cfg = ObjectiveConfig(name=name, loss_type=loss_type, beta=500.0)
        trainer.step_fn.objective = cfg
        with monkeypatch.context() as patch:
            if select is not None:
                patch.setattr(step_module, "select_images", select)
            if compute is not None:
                patch.setattr(step_module, "compute_loss", compute)
            with torch.no_grad():
                return trainer.step_fn.forward(batch, epoch).loss.double()

    def assert_far(loss, name):
        assert not torch.allclose(loss, right[name], rtol=1e-2, atol=1e-4), (float(loss), float(right[name]))

    torch.testing.assert_close(loss_with("dpo"), right["dpo"], rtol=1e-4, atol=0.0)  # unpatched: agrees

    def as_rankdpo(cfg, pred, target, psi, e_ref, ref_pred, weight, group_size, backend):
        return objectives.compute_loss(dataclasses.replace(cfg, name="rankdpo"), pred, target, psi, e_ref, ref_pred,
                                       weight, group_size, backend)

    def all_images(cfg, psi, group_size):
        return objectives.select_images(dataclasses.replace(cfg, name="rankdpo"), psi, group_size)

    def worst_first(cfg, psi, group_size):
        kept, index = objectives.select_images(cfg, psi, group_size)
        return kept, index.flip(1)

    def keep_ties(cfg, psi, group_size):  # the all-tied group kept (its pair: image 0 against itself)
        return torch.arange(psi.shape[0]), torch.stack([psi.argmax(1), psi.argmin(1)], dim=1)

    def sft_on_worst(cfg, psi, group_size):
        return torch.arange(psi.shape[0]), psi.argmin(dim=1)[:, None]

    assert_far(loss_with("dpo", select=all_images, compute=as_rankdpo), "dpo")  # dpo routed to rankdpo
    assert_far(loss_with("dpo", loss_type="sigmoid"), "dpo")  # hinge computed as sigmoid
    assert_far(loss_with("dpo", select=worst_first), "dpo")
    assert_far(loss_with("dpo", select=keep_ties), "dpo")
    assert_far(loss_with("sft", "sigmoid", select=sft_on_worst), "sft")


# ----------------------------------------------------------------------------------------- select_images


PSI = torch.tensor([
    [0.2, 0.9, 0.5],  # best 1, worst 0
    [0.7, 0.7, 0.1],  # best ties: the first (0); worst 2
    [0.4, 0.4, 0.4],  # all tied: no preference
    [1.0, 0.3, 0.3],  # worst ties: the first (1)
])


@pytest.mark.parametrize("name", ["dpo", "cpo", "mapo"])
def test_pairwise_objectives_take_best_then_worst_and_drop_all_tied_groups(name):
    kept, index = select_images(ObjectiveConfig(name=name), PSI, 3)
    assert kept.tolist() == [0, 1, 3]
    assert index.tolist() == [[1, 0], [0, 2], [0, 1]]
    assert torch.equal(select_images(ObjectiveConfig(name=name), PSI[[0, 3]], 3)[1], index[[0, 2]])  # row-local
    kept, index = select_images(ObjectiveConfig(name=name), PSI[[2, 2]], 3)
    assert kept.numel() == 0 and index.shape == (0, 2)  # TrainStep.forward then returns None (nothing to learn)


def test_sft_takes_the_best_image_of_every_group_ties_included():
    kept, index = select_images(ObjectiveConfig(name="sft"), PSI, 3)
    assert kept.tolist() == [0, 1, 2, 3]
    assert index.tolist() == [[1], [0], [0], [0]]  # the first best; an all-tied group still has a "best"


@pytest.mark.parametrize("name", ["rankdpo", "kto"])
def test_rankdpo_and_kto_take_all_images_of_every_group(name):
    kept, index = select_images(ObjectiveConfig(name=name), PSI, 3)
    assert kept.tolist() == [0, 1, 2, 3]
    assert index.tolist() == [[0, 1, 2]] * 4


def test_pairwise_pick_at_k_2_is_winner_first_whatever_the_slot_order():
    psi = torch.tensor([[0.1, 0.8], [0.8, 0.1], [0.3, 0.3]])
    kept, index = select_images(ObjectiveConfig(name="dpo"), psi, 2)
    assert kept.tolist() == [0, 1] and index.tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize("name", ["rankdpo", "dpo", "cpo", "sft", "mapo", "kto"])
def test_every_objective_needs_scores(name):
    with pytest.raises(ValueError, match="label the dataset first"):
        select_images(ObjectiveConfig(name=name), None, 3)


# ----------------------------------------------------------------------------------------- min_snr_weight


def scaled_linear_alphas_cumprod(num_steps=1000, beta_start=0.00085, beta_end=0.012) -> torch.Tensor:
    """SD's training schedule in float64, from its definition (not from diffusers)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [1.0, 5.0, 1e6])
def test_min_snr_weight_is_min_snr_gamma_in_float64(prediction_type, gamma):
    """w = min(SNR, gamma) / SNR (epsilon), min(SNR, gamma) / (SNR + 1) (v), SNR = abar / (1 - abar)."""
    abar = scaled_linear_alphas_cumprod()
    t = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])
    weight = min_snr_weight(abar, t, gamma, prediction_type)
    assert weight.dtype == torch.float64
    snr = [float(abar[i]) / (1.0 - float(abar[i])) for i in t.tolist()]
    by_hand = [min(x, gamma) / (x if prediction_type == "epsilon" else x + 1.0) for x in snr]
    torch.testing.assert_close(weight, torch.tensor(by_hand, dtype=torch.float64), rtol=1e-12, atol=0.0)
    if gamma == 1e6 and prediction_type == "epsilon":
        assert torch.equal(weight, torch.ones_like(weight))  # gamma above every SNR: plain MSE
    if prediction_type == "epsilon":  # high-SNR (small t) steps are down-weighted, low-SNR ones untouched
        assert weight[0] < 1.0 or gamma >= snr[0]
        assert float(weight[-1]) == 1.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_matches_diffusers_compute_snr_recipe(prediction_type):
    """Against diffusers' train_text_to_image.py: snr = compute_snr(scheduler, t), weights = min(snr, gamma), then
    / snr (epsilon) or / (snr + 1) (v_prediction); on the scheduler's own float32 alphas_cumprod."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from fastpref.models.bundle import ddpm_scheduler_config

    scheduler = DDPMScheduler.from_config(ddpm_scheduler_config(prediction_type))
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), scaled_linear_alphas_cumprod(), rtol=1e-4, atol=0.0)
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0))
    gamma = 5.0
    snr = compute_snr(scheduler, t)
    theirs = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    theirs = theirs / snr if prediction_type == "epsilon" else theirs / (snr + 1)
    torch.testing.assert_close(min_snr_weight(scheduler.alphas_cumprod, t, gamma, prediction_type), theirs,
                               rtol=1e-5, atol=0.0)
    # and in float64 the same up to float32 rounding of the schedule
    torch.testing.assert_close(min_snr_weight(scheduler.alphas_cumprod.double(), t, gamma, prediction_type),
                               theirs.double(), rtol=1e-5, atol=0.0)


def test_min_snr_weight_refuses_flow_models():
    with pytest.raises(ValueError, match="epsilon / v_prediction"):
        min_snr_weight(scaled_linear_alphas_cumprod(), torch.tensor([3]), 5.0, "flow")


@pytest.mark.parametrize("name, setting, needle", [
    ("cpo", {"loss_type": "hinge"}, "loss_type: 'hinge' applies to objectives dpo and rankdpo only"),
    ("sft", {"loss_type": "ipo"}, "loss_type: 'ipo' applies to objectives dpo and rankdpo only"),
    ("dpo", {"weighting": "uniform"}, "weighting: 'uniform' applies to rankdpo only"),
    ("kto", {"weighting": "uniform"}, "weighting: 'uniform' applies to rankdpo only"),
])
def test_a_setting_the_objective_would_ignore_is_refused(name, setting, needle):
    from fastpref.config import ConfigError
    from fastpref.train.objectives import ObjectiveConfig

    with pytest.raises(ConfigError, match=needle):
        ObjectiveConfig(name=name, **setting).validate()
    ObjectiveConfig(name="rankdpo", **setting).validate()  # the objective that uses it accepts it
