"""NCP (objective.feature_space: ncp) under the distributed backends, 2 CPU processes (gloo, torchrun): a LoRA run
trains like 1 process with the same global batch (FSDP2, DeepSpeed ZeRO-2 and ZeRO-3), and the frozen feature encoder
(LoRA: the policy with its adapters off; full fine-tuning: the frozen copy) is never trained, the frozen copy never
wrapped or sharded, and its features are the same on every rank and the same as an unwrapped one-process model's."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from fastpref.config import to_dict
from fastpref.train.metrics import read_metrics

from helpers.train import make_config
from test_parallel import launch

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STRATEGIES = ["fsdp2", "zero2", "zero3"]
# The tiny random U-Net's feature errors are ~1e-5: at the published beta (2500) 4 steps move the loss by ~1e-4, below
# the tolerance; 1e6 moves it by 0.05 (0.693 -> 0.642), so a wrong gradient shows.
NCP = {"objective.name": "rankdpo", "objective.feature_space": "ncp", "objective.beta": 1e6}
LORA = {"mode": "lora", "reference": "adapters_off", **NCP}
FULL = {"mode": "full", "reference": "frozen_copy", **NCP}


@pytest.fixture(scope="module")
def single_process_ncp_metrics(cached_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("single-ncp")
    cfg = make_config(cached_dataset, out / "run", max_steps=4, checkpoint_every=2, **{"data.batch_groups": 4, **LORA})
    launch(cfg, out / "cfg.yaml", 1)
    return read_metrics(out / "run")


# One torchrun per strategy: a LoRA NCP run exactly as `fastpref train` runs it (Trainer(cfg).train(), 4 steps, its
# metrics for the trajectory test), then a full fine-tune (2 steps, frozen_copy), each followed by a probe: every rank
# runs the trained step (no_grad) on the same batch, recording what the feature encoder returns, next to the same step
# of an unwrapped model built here from the saved initial weights (+ the gathered trained weights of the policy).
WORKER = '''
import json, sys
import torch
import yaml
from torch.distributed.tensor import DTensor
from fastpref.config import from_dict
from fastpref.models import load
from fastpref.train.loop import TrainConfig, Trainer, add_lora
from fastpref.train.step import ReferenceModel, TrainStep

folder = sys.argv[1]


def full_parameters(parallel):
    """name -> the full tensor on this rank (FSDP2: DTensor shards gathered; ZeRO-3: partitions gathered)."""
    named = dict(parallel.module.named_parameters())
    if parallel.strategy == "zero3":
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None):
            return {n: p.data.detach().clone() for n, p in named.items()}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in named.items()}


def probe(step, batch):
    """(every encoder output of one no-grad step on `batch`, its metrics)."""
    seen, encode = [], step.reference.encoder_features

    def recording(*args, **kwargs):
        features = encode(*args, **kwargs)
        seen.append([f.detach().clone() for f in features])
        return features

    step.reference.encoder_features = recording
    try:
        with torch.no_grad():
            out = step.forward(batch, 0)
    finally:
        del step.reference.encoder_features
    return seen, {"loss": float(out.loss), **{k: float(v) for k, v in out.metrics.items()}}


def hooks(module):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


for mode in ("lora", "full"):
    cfg = from_dict(TrainConfig, yaml.safe_load(open(f"{folder}/{mode}.yaml")))
    initial = load(cfg.model.path, family="sd").denoiser.state_dict()
    trainer = Trainer(cfg)
    parallel = trainer.parallel
    trainer.train()
    params = dict(parallel.module.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    optimizer = trainer.optimizer
    groups = (getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "fp16_groups", None)  # ZeRO-2 / ZeRO-3
              or [g["params"] for g in optimizer.param_groups])
    ids = {id(p): n for n, p in params.items()}
    in_optimizer = sorted(ids.get(id(p), "?") for group in groups for p in group)
    full = full_parameters(parallel)
    base = {n.replace(".base_layer", ""): t for n, t in full.items() if n not in trainable}
    report = {
        "strategy": parallel.strategy, "world_size": parallel.world_size, "reference": trainer.reference_mode,
        "trainable": sorted(trainable), "in_optimizer": in_optimizer, "policy_hooks": hooks(parallel.module),
        "frozen_checked": len(base), "initial": len(initial),
        "frozen_not_initial": sorted(n for n, t in base.items() if not torch.equal(t, initial[n])),
        # full: weights that left their initial value; LoRA: B matrices that left 0
        "trainable_moved": sum(not torch.equal(full[n], initial[n]) if n in initial else
                               "lora_B" in n and bool(full[n].any()) for n in trainable),
    }
    # the unwrapped one-process twin: initial weights from disk, then the trained policy weights
    twin = load(cfg.model.path, family="sd")
    twin.vae = None
    twin.text_encoders = [None] * len(twin.text_encoders)
    reference = ReferenceModel(trainer.reference_mode, twin.denoiser)  # before any change, as the trainer does
    if mode == "lora":
        add_lora(twin.denoiser, cfg.lora)
    missing, unexpected = twin.denoiser.load_state_dict({n: full[n] for n in trainable}, strict=False)
    assert not unexpected and not set(trainable) & set(missing), (unexpected, missing)
    twin.denoiser.train()
    twin_step = TrainStep(twin, twin.denoiser, cfg.objective, reference, trainer.dataset.noise_seed,
                          loss_backend=cfg.loss_backend)
    batch = next(iter(trainer.dataset.stream(2, seed=123, rank=0, world_size=1)))  # the same groups on every rank
    features, metrics = probe(trainer.step_fn, batch)
    twin_features, twin_metrics = probe(twin_step, batch)
    report.update(metrics=metrics, twin_metrics=twin_metrics)
    frozen = trainer.step_fn.reference.frozen
    if frozen is not None:
        report["frozen_copy"] = {
            "hooks": hooks(frozen),
            "fsdp": any(type(m).__name__.startswith("FSDP") for m in frozen.modules()),
            "dtensor": any(isinstance(p, DTensor) for p in frozen.parameters()),
            "zero3": any(hasattr(p, "ds_id") for p in frozen.parameters()),
            "requires_grad": any(p.requires_grad for p in frozen.parameters()),
            "is_policy": frozen is parallel.module or any(m is frozen for m in parallel.module.modules()),
            "not_initial": sorted(n for n, t in frozen.state_dict().items() if not torch.equal(t, initial[n])),
        }
    rank = parallel.rank
    with open(f"{folder}/{mode}-rank{rank}.json", "w") as file:
        json.dump(report, file)
    torch.save({"features": features, "twin": twin_features}, f"{folder}/{mode}-rank{rank}.pt")
    parallel.barrier()
trainer.parallel.close()
'''


@pytest.fixture(scope="module", params=STRATEGIES)
def two_process_ncp(request, cached_dataset, tmp_path_factory):
    strategy = request.param
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed", reason="the 'distributed' extra (deepspeed) is not installed")
    folder = tmp_path_factory.mktemp(f"ncp-{strategy}")
    for mode, settings, steps in (("lora", LORA, 4), ("full", FULL, 2)):
        cfg = make_config(cached_dataset, folder / mode, max_steps=steps, checkpoint_every=2, parallel=strategy,
                          **{"data.batch_groups": 2, **settings})
        (folder / f"{mode}.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    script = folder / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}  # as launch() runs the ranks
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(folder)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return strategy, folder


def test_ncp_lora_two_processes_match_one(two_process_ncp, single_process_ncp_metrics):
    strategy, folder = two_process_ncp
    single = [r["loss"] for r in single_process_ncp_metrics]
    losses = [r["loss"] for r in read_metrics(folder / "lora")]
    assert len(losses) == 4
    # step 1: the LoRA policy is the reference (B = 0), every margin exactly 0; then it moves
    assert abs(single[0] - math.log(2)) < 1e-7 and abs(losses[0] - math.log(2)) < 1e-7
    assert abs(single[-1] - single[0]) > 0.03, single
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single), rtol=2e-3, atol=1e-5)
    # the errors in the encoder's feature space themselves, not only the loss
    torch.testing.assert_close(torch.tensor([r["e_pol"] for r in read_metrics(folder / "lora")]),
                               torch.tensor([r["e_pol"] for r in single_process_ncp_metrics]), rtol=2e-3, atol=0.0)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_ncp_feature_encoder_is_frozen_and_the_same_on_every_rank(two_process_ncp, mode):
    strategy, folder = two_process_ncp
    reports = [json.loads((folder / f"{mode}-rank{rank}.json").read_text()) for rank in (0, 1)]
    tensors = [torch.load(folder / f"{mode}-rank{rank}.pt") for rank in (0, 1)]
    for report in reports:
        assert report["strategy"] == strategy and report["world_size"] == 2
        assert report["reference"] == {"lora": "adapters_off", "full": "frozen_copy"}[mode]
        assert report["trainable"] and report["trainable_moved"] > 0
        if mode == "lora":
            assert all("lora_" in name for name in report["trainable"])
        # the backend trains the policy's trainable parameters and nothing else
        assert report["in_optimizer"] == report["trainable"]
        # LoRA: the encoder is the policy's own (sharded) base weights with the adapters off: after training they are
        # still the initial model's, bit for bit. Full: the policy has no frozen weights.
        assert report["frozen_checked"] == (report["initial"] if mode == "lora" else 0)
        assert report["frozen_not_initial"] == []
        if strategy != "zero2":
            assert report["policy_hooks"] > 0  # the backend did wrap the policy (the frozen copy's check means something)
        if mode == "full":
            assert report["frozen_copy"] == {"hooks": 0, "fsdp": False, "dtensor": False, "zero3": False,
                                             "requires_grad": False, "is_policy": False, "not_initial": []}
        # the probe went through a moved policy: its features differ from the reference's
        assert report["metrics"]["margin"] != 0.0
        for key, value in report["metrics"].items():
            assert report["twin_metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    # the same batch on every rank: the same metrics and, bit for bit, the same features
    assert reports[0]["metrics"] == reports[1]["metrics"]
    features = [t["features"] for t in tensors]
    assert len(features[0]) == 3  # the policy's x_(t-1), the target's, the reference's
    for rank0, rank1 in zip(*features):
        assert len(rank0) == len(rank1) == 4  # conv_in, 2 down blocks, mid block
        for a, b in zip(rank0, rank1):
            assert torch.equal(a, b)
    # and the unwrapped one-process model (initial weights from disk) computes the same features
    for ours, twin in zip(features[0], tensors[0]["twin"]):
        for a, b in zip(ours, twin):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
