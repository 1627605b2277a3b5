"""DRaFT through the trainer: toy-sd with the toy recipe, full fine-tuning with the frozen reference, the recipes'
NeMo-Aligner values, sd15-draftp / sdxl-draftp end to end on tiny random models of their families, exact SIGKILL
resume, and 2 gloo processes == 1 (DDP, FSDP2)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fastpref.config import load_config, to_dict  # noqa: E402
from fastpref.train.metrics import read_metrics  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared test helpers (tests/helpers)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_draft import draft_config  # noqa: E402
from helpers.train import launch_train as launch, write_train_config as write_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from fastpref.models import sd, sdxl
    from fastpref.toy.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("draft-train-models")
    sd.build_random(sd.tiny_config("tiny"), build_tokenizer(), seed=0).save_pretrained(root / "sd")
    sdxl.build_random(sdxl.tiny_config("tiny"), build_tokenizer(), seed=0).save_pretrained(root / "sdxl")
    return {name: str(root / name) for name in ("sd", "sdxl")}


def trainable(out, step):
    from safetensors.torch import load_file

    return load_file(Path(out) / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")


def test_toy_draft_recipe_trains_toy_sd(tmp_path):
    """configs/toy-draft.yaml's training on the shipped toy-sd, shrunk: reward and grad norm logged, a validation
    grid, the LoRA moved; no reference is built without the KL."""
    from fastpref.train.loop import train

    try:  # moving from fastpref.train.loop to fastpref.pipeline
        from fastpref.pipeline import train_config_of_recipe
    except ImportError:
        from fastpref.train.loop import train_config_of_recipe

    cfg = train_config_of_recipe(str(CONFIGS / "toy-draft.yaml"), [
        f"output_dir={tmp_path / 'run'}", "max_steps=2", "checkpoint_every=2", "progress=false", "tensorboard=false",
        "lr_warmup_steps=0", "validation.every=2", "validation.num_inference_steps=2", "validation.seeds=[0,1]",
        "validation.num_prompts=1", "online.prompts_per_rollout=2", "online.num_steps=3", "online.draft.batch_size=1"])
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["reference"] == "none"
    out = Path(cfg.output_dir)
    records = read_metrics(out)
    for record in records:
        for key in ("loss", "reward", "reward_shapeclip", "grad_norm", "draft_k"):
            assert key in record and record[key] == record[key], (key, record)
        assert record["loss"] == pytest.approx(-record["reward"], rel=1e-6)  # DRaFT: no KL term
    # the validation prompts' reward and diversity over seeds, of the step-0 weights, logged with step 1
    assert 0 < records[0]["val_diversity_pixel"] < 1 and 0 < records[0]["val_diversity_shapeclip"] < 2
    assert 0 < records[0]["val_reward"] <= 1 and "val_reward" not in records[1]
    assert (out / "validation" / "step-000002.png").exists()
    weights = trainable(out, 2)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_draft_plus_on_the_flow_model_toy_sd3_through_fastpref_train(tmp_path):
    """`fastpref train --config configs/toy-draft.yaml model.path=toy-sd3-v2`, DRaFT+ with K = 2: the flow sampler (Euler
    on the flow ODE) with gradients through its last 2 velocity predictions, the KL to the adapters-off reference (0
    at the first step, > 0 once the LoRA moved), reward and grad norm logged, the LoRA updated."""
    from fastpref.pipeline import train_cli

    out = tmp_path / "run"
    code = train_cli(["--config", str(CONFIGS / "toy-draft.yaml"), "model.path=toy-sd3-v2", f"output_dir={out}",
                      "max_steps=2", "checkpoint_every=2", "progress=false", "tensorboard=false", "lr_warmup_steps=0",
                      "validation.every=0", "online.prompts_per_rollout=2", "online.num_steps=4",
                      "online.draft.k=2", "online.draft.kl_coeff=0.5", "online.draft.batch_size=2"])
    assert code == 0
    out = out / "train" / "main"  # a run recipe's main training
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["reference"] == "adapters_off"
    records = read_metrics(out)
    assert [r["draft_k"] for r in records] == [2, 2]
    for record in records:
        for key in ("loss", "reward", "reward_shapeclip", "kl", "grad_norm"):
            assert math.isfinite(record[key]), (key, record)
        assert record["loss"] == pytest.approx(-record["reward"] + 0.5 * record["kl"], rel=1e-5, abs=1e-7)
    assert records[0]["kl"] < 1e-10 < records[1]["kl"]
    assert records[0]["grad_norm"] > 0
    weights = trainable(out, 2)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_full_fine_tuning_with_the_frozen_reference(tiny_models, tmp_path):
    """mode full: DRaFT+'s reference is a frozen copy; the KL is 0 at the first step (same weights) and > 0 after."""
    from fastpref.train.loop import train

    cfg = draft_config(tiny_models["sd"], tmp_path / "run", mode="full", lr=1e-3,
                       **{"online.draft.variant": "alignprop", "online.draft.k": 2})
    summary = train(cfg)
    assert summary["reference"] == "frozen_copy"
    records = read_metrics(tmp_path / "run")
    assert records[0]["kl"] == 0.0 and records[1]["kl"] > 0
    assert records[1]["loss"] == pytest.approx(-records[1]["reward"] + 0.5 * records[1]["kl"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name, values", [
    ("sd15-draftp", {"online.num_steps": 50, "online.guidance_scale": 7.5, "online.eta": 0.0, "lora.rank": 32,
                     "lr": 1e-4, "online.draft.kl_coeff": 0.2, "online.draft.k": 1, "online.resolution": 512,
                     "online.reward": {"pickscore": 1.0}, "max_grad_norm": 10.0}),
    ("sdxl-draftp", {"online.num_steps": 40, "online.guidance_scale": 5.0, "online.draft.kl_coeff": 0.1,
                     "online.draft.k": 1, "lora.rank": 32, "lr": 1e-4, "online.resolution": 1024,
                     "online.reward": {"pickscore": 1.0}}),
])
def test_real_recipes_carry_nemo_values(name, values):
    from fastpref.pipeline import RunConfig, build_stages

    train = build_stages(load_config(RunConfig, CONFIGS / f"{name}.yaml", [])).trains["main"]
    assert train.objective.name == "draft" and train.mode == "lora"
    for key, expected in values.items():
        value = train
        for part in key.split("."):
            value = getattr(value, part)
        assert value == expected, key


def test_toy_draftp_recipe_is_a_kl_sweep():
    """One `fastpref run` recipe: DRaFT (kl 0) and DRaFT+ at increasing kl_coeff, the same everything else."""
    from fastpref.pipeline import RunConfig, build_stages

    trains = build_stages(load_config(RunConfig, CONFIGS / "toy-draftp.yaml", [])).trains
    coefficients = sorted(t.online.draft.kl_coeff for t in trains.values())
    assert coefficients[0] == 0 and len(coefficients) >= 4 and len(set(coefficients)) == len(coefficients)
    reference = to_dict(next(iter(trains.values())))
    for train in trains.values():
        data = to_dict(train)
        data["online"]["draft"]["kl_coeff"] = reference["online"]["draft"]["kl_coeff"]
        data["output_dir"] = reference["output_dir"]
        assert data == reference


def test_toy_draft_recipes_are_world_v2_and_the_v1_one_differs_only_in_its_world():
    """configs/toy-draft.yaml trains as configs/toy-draftp.yaml's main variant (the v2 recipes), and
    configs/toy-draftp-v1.yaml is that sweep on world v1: the v1 model, v1's training prompts and v1's tuned lr,
    everything else equal (the records made before the move name it)."""
    from fastpref.pipeline import RunConfig, build_stages

    def trains(name):
        stages = build_stages(load_config(RunConfig, CONFIGS / name, []))
        return {key: to_dict(train) for key, train in stages.trains.items()}

    v2, v1 = trains("toy-draftp.yaml"), trains("toy-draftp-v1.yaml")
    draft = trains("toy-draft.yaml")["main"]
    main = dict(v2["kl0"])
    assert main["model"]["path"] == "toy-sd-v2" and main["online"]["prompts"] == "toy-v2:train-balanced"
    for key in ("output_dir", "validation", "keep_checkpoints"):
        draft.pop(key), main.pop(key)
    assert draft == main
    assert v1.keys() == v2.keys()
    for name in v2:
        a, b = v1[name], v2[name]
        assert a["model"]["path"] == "toy-sd" and a["online"]["prompts"] == "toy:train-balanced" and a["lr"] == 3e-3
        assert a["online"]["toy_world"] in (None, "v1") and b["online"]["toy_world"] == "v2"  # the rewards' world
        for data in (a, b):
            data.pop("output_dir", None), data["model"].pop("path"), data.pop("lr")
            data["online"].pop("prompts"), data["online"].pop("toy_world")
        assert a == b, name
    eval_v1, eval_v2 = (load_config(RunConfig, CONFIGS / name, []).eval for name in ("toy-draftp-v1.yaml",
                                                                                     "toy-draftp.yaml"))
    assert to_dict(eval_v1) == to_dict(eval_v2)


@pytest.mark.slow
def test_toy_draftp_run_reports_the_tradeoff(tmp_path, monkeypatch):
    """configs/toy-draftp.yaml through `fastpref run`, shrunk: every kl_coeff trained, DRaFT's path (base, the main
    variant's checkpoint, its end) and the DRaFT+ points in report.json's trade-off section, the table and the plot
    in report.md, and docs/results/record.py keeping them."""
    import importlib.util

    from fastpref.pipeline import RunConfig, run

    out = tmp_path / "toy-draftp"
    cfg = load_config(RunConfig, CONFIGS / "toy-draftp.yaml", [
        f"output_dir={out}", "progress=false", "train.max_steps=2", "train.checkpoint_every=1",
        "train.keep_checkpoints=2", "train.lr_warmup_steps=0", "train.tensorboard=false",
        "train.online.prompts_per_rollout=2", "train.online.num_steps=2", "train.online.draft.batch_size=2",
        "eval.main_checkpoints=[1]", "eval.seeds_per_prompt=2", "eval.max_prompts_per_category=1",
        "eval.min_images_per_category=2", "eval.steps=2"])
    report = run(cfg)
    section = report["tradeoff"]
    names = list(report["train"])
    assert section["curve"] == ["base", f"{names[0]}@1", names[0]] and section["candidates"] == names[1:]
    assert list(section["models"]) == section["curve"] + names[1:]
    for name, row in section["models"].items():
        assert 0 < row["reward"] < 1 and row["diversity_shapeclip"] > 0 and row["minigeneval"] == \
            report["eval"][name]["overall"]
        assert ("reward_vs_base" in row) == (name != "base")
    assert [section["models"][n]["kl_coeff"] for n in names] == \
        sorted(section["models"][n]["kl_coeff"] for n in names) and section["models"][names[0]]["kl_coeff"] == 0
    assert set(section["matched"]) == set(names[1:])
    text = (out / "report.md").read_text()
    assert "## Reward vs diversity" in text and "![reward vs diversity](tradeoff.png)" in text
    assert (out / "tradeoff.png").stat().st_size > 0
    spec = importlib.util.spec_from_file_location("record_results", CONFIGS.parent / "docs" / "results" / "record.py")
    record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record)
    monkeypatch.setattr(record, "HERE", tmp_path)
    saved = json.loads(record.record(out, commit="test").read_text())
    assert saved["tradeoff"]["curve"] == section["curve"]
    assert "](toy-draftp-tradeoff.png)" in (tmp_path / "toy-draftp.md").read_text()


def tiny_pickscore(tmp_path):
    pytest.importorskip("transformers")
    from helpers.rewards import save_tiny_clip

    return save_tiny_clip(tmp_path / "tiny-clip")


@pytest.mark.slow
def test_real_recipes_run_end_to_end_on_tiny_models(tiny_models, tmp_path):
    """configs/sd15-draftp.yaml (DDIM) and sdxl-draftp.yaml (Euler) through `fastpref run` on tiny random models of
    their families, PickScore on a tiny random CLIP."""
    from fastpref.pipeline import RunConfig, run

    clip = tiny_pickscore(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    for name, family in (("sd15-draftp", "sd"), ("sdxl-draftp", "sdxl")):
        cfg = load_config(RunConfig, CONFIGS / f"{name}.yaml", [
            f"output_dir={tmp_path / name}", "progress=false", f"train.model.path={tiny_models[family]}",
            "train.parallel=none", "train.speed.mixed_precision=\"no\"", "train.max_steps=2",
            "train.checkpoint_every=2", "train.tensorboard=false", "train.validation.every=2",
            "train.validation.num_inference_steps=2", f"train.online.prompts={prompts}",
            "train.online.prompts_per_rollout=2", "train.online.num_steps=3", "train.online.resolution=32",
            f"train.online.reward_paths.pickscore={clip}"])
        report = run(cfg)
        assert report["train"]["main"]["steps"] == 2
        records = read_metrics(tmp_path / name / "train" / "main")
        assert all(r["kl"] == r["kl"] and "reward_pickscore" in r for r in records)
        assert (tmp_path / name / "train" / "main" / "checkpoints" / "step-000002" / "lora").is_dir()


def resume_config(tiny_models, out, **overrides):
    return draft_config(tiny_models["sd"], out, max_steps=4, checkpoint_every=2,
                        **{"online.draft.variant": "alignprop", "online.draft.k": 2, **overrides})


@pytest.mark.slow
def test_sigkill_and_resume_is_exact(tiny_models, tmp_path):
    """Killed (SIGKILL) once step 3 is logged, resumed from step 2: metrics and weights equal the uninterrupted
    run's bit for bit (noise and AlignProp's K keyed by seed / epoch / prompt position)."""
    from helpers.train import sigkill_once_logged_then_resume

    straight = write_config(resume_config(tiny_models, tmp_path / "straight"), tmp_path / "s.yaml")
    done = launch(straight)
    assert done.returncode == 0, done.stderr[-4000:]
    killed_cfg = write_config(resume_config(tiny_models, tmp_path / "killed"), tmp_path / "k.yaml")
    sigkill_once_logged_then_resume(killed_cfg, tmp_path / "killed", 3, tmp_path / "killed.log")
    expected = {r["step"]: r for r in read_metrics(tmp_path / "straight")}
    got = {r["step"]: r for r in read_metrics(tmp_path / "killed")}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "reward", "kl", "grad_norm", "draft_k"):
            assert got[step][key] == expected[step][key], (step, key)
    a, b = trainable(tmp_path / "straight", 4), trainable(tmp_path / "killed", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero2", "zero3"])
def test_two_processes_equal_one(tiny_models, tmp_path, strategy):
    """2 gloo processes (each samples and backpropagates half the images of a step) train as 1 process does."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed", reason="the 'distributed' extra (deepspeed) is not installed")
    overrides = {"online.draft.batch_size": 1}
    one = write_config(resume_config(tiny_models, tmp_path / "one", **overrides), tmp_path / "one.yaml")
    proc = launch(one)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = write_config(resume_config(tiny_models, tmp_path / "two", parallel=strategy, **overrides),
                       tmp_path / "two.yaml")
    proc = launch(two, nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["draft_k"] for r in a] == [r["draft_k"] for r in b]
    for key in ("loss", "reward", "kl", "grad_norm"):  # metrics: means over the ranks' equal shares
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=2e-3, abs=1e-7), key
    wa, wb = trainable(tmp_path / "one", 4), trainable(tmp_path / "two", 4)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=2e-3, atol=1e-5)
