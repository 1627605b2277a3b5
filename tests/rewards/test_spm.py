"""The step-aware preference model (fastpref/rewards/spm.py) and its trainer (fastpref/rewards/spm_train.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from fastpref.config import ConfigError, from_dict  # noqa: E402
from fastpref.rewards.base import build_reward  # noqa: E402
from fastpref.rewards.spm import StepAwareModel, StepAwarePreferenceReward  # noqa: E402
from fastpref.rewards.spm_train import SPMTrainConfig, check_diffusion_model, preference_pairs, spm_loss  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


from helpers.threads import single_thread_torch  # noqa: E402,F401 (autouse)
from helpers.rewards import save_tiny_clip  # noqa: E402


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A saved random CLIPModel (2 vision layers, 32x32 images) with the toy tokenizer and an image processor."""
    return str(save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), vision_layers=2))


def randomize_time_conditioning(model: StepAwareModel, seed: int = 0, std: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("base."):
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def pixels(count=3, seed=0):
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- model


def test_toy_spm_starts_as_its_base_shapeclip_at_every_t():
    from fastpref.toy import shapeclip

    model = StepAwareModel.from_base("shapeclip")
    base = shapeclip.load_shipped()
    x = pixels()
    with torch.no_grad():
        expected = base.logit_scale.exp().clamp(max=100) * base.similarity(x, PROMPTS)
        for t in (0, 500, 999):
            torch.testing.assert_close(model(x, PROMPTS, torch.full((3,), t)), expected, rtol=0, atol=1e-5)


def test_clip_spm_starts_as_pickscore_of_its_base(tiny_clip):
    model = StepAwareModel.from_base("clip", tiny_clip)
    pick = build_reward("pickscore", tiny_clip)
    x = pixels()
    with torch.no_grad():
        expected = pick(x, PROMPTS)
        for t in (0, 700):
            torch.testing.assert_close(model(x, PROMPTS, torch.full((3,), t)), expected, rtol=1e-5, atol=1e-5)


def spo_image_features(model: StepAwareModel, pixel_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SPO's HFTimeConditionedCLIPModel.get_image_features written out in float64 from the same modules
    (time_conditioned_clip.py: modulate(x, shift, scale) = x (1 + scale) + shift; gates on the residual branches)."""
    clip = model.base.double()
    spm = model.double()
    vision = clip.vision_model
    temb = spm.t_embedder.mlp(spm.t_embedder.sinusoid(t, 256).double())
    h = vision.pre_layrnorm(vision.embeddings(pixel_values.double()))
    for layer, modulation in zip(vision.encoder.layers, spm.layer_modulations):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(temb).chunk(6, dim=1)
        x = layer.layer_norm1(h) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        attention, _ = layer.self_attn(hidden_states=x, attention_mask=None)
        h = h + gate_msa[:, None] * attention
        x = layer.layer_norm2(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        h = h + gate_mlp[:, None] * layer.mlp(x)
    pooled = vision.post_layernorm(h[:, 0])
    shift, scale = spm.pooled_modulation(temb).chunk(2, dim=1)
    pooled = pooled * (1 + scale) + shift
    return clip.visual_projection(pooled)


def test_clip_spm_matches_spo_time_conditioned_clip_in_float64(tiny_clip):
    """The hooks put shift / scale / gate exactly where SPO's TimeConditionedCLIPEncoderLayer does."""
    from fastpref.rewards.pretrained import clip_preprocess

    model = StepAwareModel.from_base("clip", tiny_clip)
    randomize_time_conditioning(model)
    model.double()
    x, t = pixels().double(), torch.tensor([0, 400, 951])
    with torch.no_grad():
        got = model.image_features(x, t)
        images = clip_preprocess(x, model.image_size, model.image_mean, model.image_std)
        expected = torch.nn.functional.normalize(spo_image_features(model, images, t), dim=-1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # and t matters once the conditioning is trained
    with torch.no_grad():
        other = model.image_features(x, torch.tensor([999, 999, 999]))
    assert (other - got).abs().max() > 1e-3


def test_toy_spm_scores_depend_on_t_and_gradients_reach_every_time_parameter():
    model = StepAwareModel.from_base("shapeclip")
    randomize_time_conditioning(model, std=0.05)
    x = pixels()
    s0 = model(x, PROMPTS, torch.zeros(3))
    s1 = model(x, PROMPTS, torch.full((3,), 900))
    assert (s0 - s1).abs().max() > 1e-3
    (s0.sum() + s1.sum()).backward()
    for name, p in model.named_parameters():
        if not name.startswith("base.text"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_spm_reward_save_load_round_trip_and_registry(tmp_path, tiny_clip):
    for kind, source in (("shapeclip", None), ("clip", tiny_clip)):
        model = StepAwareModel.from_base(kind, source)
        randomize_time_conditioning(model, std=0.05)
        model.save_pretrained(tmp_path / kind)
        reward = build_reward("spm", str(tmp_path / kind))
        assert isinstance(reward, StepAwarePreferenceReward)
        x, t = pixels(), torch.tensor([0, 300, 900])
        with torch.no_grad():
            torch.testing.assert_close(reward(x, PROMPTS, timesteps=t), model(x, PROMPTS, t), rtol=0, atol=1e-6)
            # uint8 images and an int timestep through the Reward interface, batched
            as_uint8 = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
            assert reward(as_uint8, PROMPTS, batch_size=2, timesteps=500).shape == (3,)
    (tmp_path / "clip" / "time_conditioning.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="time_conditioning.safetensors"):
        build_reward("spm", str(tmp_path / "clip"))
    with pytest.raises(FileNotFoundError, match="spm_config.json"):
        build_reward("spm", str(tmp_path))


# ---------------------------------------------------------------------------------------------- loss and data


def spo_criterion_float64(s0, s1, label_0, n):
    """SPMCriterion.calc_loss (in_batch_negatives False), written out with cross_entropy as SPO does."""
    logits = torch.stack([s0, s1], -1).double()
    zeros = torch.zeros(len(s0), dtype=torch.long)
    loss_0 = torch.nn.functional.cross_entropy(logits, zeros, reduction="none")
    loss_1 = torch.nn.functional.cross_entropy(logits, zeros + 1, reduction="none")
    label_0 = label_0.double()
    loss = label_0 * loss_0 + (1 - label_0) * loss_1 + (label_0 == 0.5).double() * np.log(0.5)
    weight = (1 / n.double()) / (1 / n.double()).sum()
    return (loss * weight).sum()


def test_spm_loss_matches_spo_criterion_forward_and_backward():
    generator = torch.Generator().manual_seed(3)
    s0 = (torch.randn(12, generator=generator) * 5).requires_grad_()
    s1 = (torch.randn(12, generator=generator) * 5).requires_grad_()
    label = torch.tensor([1, 0, 0.5] * 4)
    n = torch.randint(1, 6, (12,), generator=generator).float()
    loss = spm_loss(s0, s1, label, n)
    s0_ref, s1_ref = s0.detach().double().requires_grad_(), s1.detach().double().requires_grad_()
    expected = spo_criterion_float64(s0_ref, s1_ref, label, n)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(s0.grad.double(), s0_ref.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s1.grad.double(), s1_ref.grad, rtol=1e-5, atol=1e-7)
    # a tie scored equal and a sure win cost nothing; the weights follow 1 / examples per prompt
    assert float(spm_loss(torch.tensor([2.0]), torch.tensor([2.0]), torch.tensor([0.5]), torch.ones(1))) == 0.0
    assert float(spm_loss(torch.tensor([60.0]), torch.tensor([0.0]), torch.tensor([1.0]), torch.ones(1))) < 1e-20
    uneven = spm_loss(torch.tensor([0.0, 0.0]), torch.tensor([1.0, -1.0]), torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0]))
    per = -torch.log_softmax(torch.tensor([[0.0, 1.0], [0.0, -1.0]]), -1)[:, 0]
    torch.testing.assert_close(uneven, (per * torch.tensor([0.25, 0.75])).sum())


def test_preference_pairs_soft_labels_from_psi():
    psi = np.array([[1.0, 0.5, 0.5, 0.0]])
    pairs, label = preference_pairs(psi, "all", 0.0)
    assert pairs.tolist() == [[0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 2], [0, 1, 3], [0, 2, 3]]
    assert label.tolist() == [1.0, 1.0, 1.0, 0.5, 1.0, 1.0]
    pairs, label = preference_pairs(np.array([[0.2, 0.9, 0.4]]), "best_worst", 0.0)
    assert pairs.tolist() == [[0, 1, 0]] and label.tolist() == [1.0]
    assert len(preference_pairs(np.array([[0.5, 0.5]]), "best_worst", 0.0)[0]) == 0  # all tied: no pair


# ---------------------------------------------------------------------------------------------- training


def train_config(root: str, model: str, out: str, **overrides) -> SPMTrainConfig:
    data = {"output": out, "data": {"root": root, "eval_groups": 2}, "diffusion": {"model": model, "family": "sd"},
            "steps": 3, "batch_size": 4, "lr": 1e-3, "lr_warmup_steps": 1, "eval_timesteps": [0, 500],
            "progress": False, "device": "cpu"}
    data.update(overrides)
    return from_dict(SPMTrainConfig, data)


@pytest.fixture(scope="module")
def synpic(tmp_path_factory):
    """A tiny labelled Syn-Pic root: random-weight SD, 6 toy prompts x K = 3."""
    import data_helpers as helpers

    from fastpref.data.label import run_label
    from fastpref.data.synth import run_synth
    from fastpref.models import sd
    from fastpref.toy.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("spm-ds")
    model = root / "tiny-sd"
    sd.build_random(sd.tiny_config("tiny"), build_tokenizer(), seed=0).save_pretrained(model)
    run_synth(helpers.synth_config(helpers.write_prompts(root / "prompts.jsonl", 6), str(model), str(root)))
    run_label(helpers.label_config(str(root)), rewards=helpers.make_rewards())
    return {"root": str(root), "model": str(model)}


def test_spm_train_end_to_end_saves_a_loadable_reward_with_metrics(synpic, tmp_path):
    from fastpref.rewards.spm_train import train_spm

    out = tmp_path / "spm"
    metrics = train_spm(train_config(synpic["root"], synpic["model"], str(out)))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics and set(metrics["accuracy"]) == {"0", "500"} == set(metrics["accuracy_initial"])
    assert metrics["train_pairs"] == 4 * 3 and metrics["held_out_pairs"] <= 2 * 3
    reward = build_reward("spm", str(out))
    fresh = StepAwareModel.from_base("shapeclip")
    trained = dict(reward.model.named_parameters())
    moved = [n for n, p in fresh.named_parameters() if not torch.equal(p, trained[n])]
    assert any(n.startswith("t_embedder") for n in moved) and any(n.startswith("layer_modulations") for n in moved)
    assert any(n.startswith("base.") for n in moved)  # the whole model trains, as SPO's


def test_spm_training_fits_a_batch():
    """A few AdamW steps on one fixed batch at one t drive spm_loss down (the loss and the t path train)."""
    model = StepAwareModel.from_base("shapeclip")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x0, x1 = pixels(4, seed=1), pixels(4, seed=2)
    prompts = PROMPTS + PROMPTS[:1]
    t = torch.full((8,), 600)
    label, n = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.ones(4)
    losses = []
    for _ in range(15):
        scores = model(torch.cat([x0, x1]), prompts * 2, t)
        loss = spm_loss(scores[:4], scores[4:], label, n)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_bad_spm_configs_are_refused_before_any_model_loads(synpic, tmp_path):
    from fastpref.models import toy_model_path
    from fastpref.rewards.spm_train import cli

    with pytest.raises(ConfigError, match="diffusion.model: .*flow-matching"):
        check_diffusion_model(train_config(synpic["root"], "", "x", diffusion={"model": str(toy_model_path("toy-sd3"))}).diffusion)
    with pytest.raises(ConfigError, match="diffusion.model: .*flow-matching"):
        check_diffusion_model(train_config(synpic["root"], "", "x", diffusion={"model": "org/some-sd3", "family": "sd3"}).diffusion)
    with pytest.raises(ConfigError, match="init.model: kind 'clip' needs"):
        train_config(synpic["root"], synpic["model"], "x", init={"kind": "clip"})
    with pytest.raises(ConfigError, match="guidance_scale"):
        train_config(synpic["root"], synpic["model"], "x", diffusion={"model": "m", "guidance_scale": 0.5})
    config = tmp_path / "bad.yaml"
    config.write_text(f"output: {tmp_path / 'o'}\ndata: {{root: {tmp_path / 'nothing'}}}\n"
                      f"diffusion: {{model: {synpic['model']}}}\n")
    assert cli(["train", "--config", str(config), "progress=false"]) == 2
    assert not (tmp_path / "o").exists()


def spo_named_state_dict(model: StepAwareModel) -> dict:
    """The model's weights under the names SPO's StepAwarePreferenceModel(HFTimeConditionedCLIPModel) gives them
    (time_conditioned_clip.py: vision_model.encoder.layers.{i}.adaLN_modulation, vision_model.adaLN_modulation,
    t_embedder.mlp; the CLIP weights unchanged), all under `model.`."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("base."):
            state["model." + key[5:]] = value
        elif key.startswith("layer_modulations."):
            layer, rest = key[len("layer_modulations."):].split(".", 1)
            state[f"model.vision_model.encoder.layers.{layer}.adaLN_modulation.{rest}"] = value
        elif key.startswith("pooled_modulation."):
            state["model.vision_model.adaLN_modulation." + key[len("pooled_modulation."):]] = value
        else:
            state["model." + key] = value
    return state


def test_convert_spo_released_checkpoint(tiny_clip, tmp_path):
    from fastpref.rewards.spm_train import cli

    model = StepAwareModel.from_base("clip", tiny_clip)
    randomize_time_conditioning(model)
    with torch.no_grad():
        model.base.logit_scale.fill_(2.0)  # a base weight that differs from the CLIP it starts from
    torch.save(spo_named_state_dict(model), tmp_path / "spo.bin")
    assert cli(["convert", "--spo-checkpoint", str(tmp_path / "spo.bin"), "--base", tiny_clip,
                "--processor", tiny_clip, "--out", str(tmp_path / "converted")]) == 0
    reward = build_reward("spm", str(tmp_path / "converted"))
    x, t = pixels(), torch.tensor([0, 300, 900])
    with torch.no_grad():
        torch.testing.assert_close(reward(x, PROMPTS, timesteps=t), model(x, PROMPTS, t), rtol=0, atol=1e-6)
    state = spo_named_state_dict(model)
    state.pop("model.t_embedder.mlp.0.weight")
    torch.save(state, tmp_path / "partial.bin")
    assert cli(["convert", "--spo-checkpoint", str(tmp_path / "partial.bin"), "--base", tiny_clip,
                "--processor", tiny_clip, "--out", str(tmp_path / "bad")]) == 2


def test_shipped_toy_spm_loads_with_trained_time_conditioning():
    from fastpref.rewards.spm import SHIPPED_TOY_SPM

    reward = build_reward("spm")
    metrics = json.loads((SHIPPED_TOY_SPM / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"0", "251", "501", "701", "951"} == set(metrics["accuracy_initial"])
    card = (SHIPPED_TOY_SPM / "MODEL_CARD.md").read_text()
    for t in ("0", "251", "501"):  # the card's table is this run's numbers
        assert f"{100 * metrics['accuracy'][t]:.1f}%" in card and f"{100 * metrics['accuracy_initial'][t]:.1f}%" in card
    fresh = StepAwareModel.from_base("shapeclip")
    trained = dict(reward.model.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.named_parameters() if n.startswith("layer_modulations"))
    x = pixels()
    with torch.no_grad():
        assert (reward(x, PROMPTS, timesteps=0) - reward(x, PROMPTS, timesteps=600)).abs().max() > 1e-4
