"""2 gloo processes where one rank's micro-batches carry no preference at all (every group tied in psi, e.g.
dpo on keep_ties data): that rank still runs the forward and a backward weighed 0, so it joins the gradient
collectives of DDP / FSDP2 / ZeRO-2 the other rank waits in. Before, it skipped the forward and backpropagated
`sum(p) * 0` outside the wrapped module, and the other rank could wait forever: the run has a timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORKER = '''
import json, sys
import torch
torch.set_num_threads(1)
from fastpref.config import from_dict
from fastpref.train.loop import Trainer, TrainConfig

dataset, out, strategy = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = from_dict(TrainConfig, {
    "model": {"path": dataset["model"]}, "data": {"root": dataset["root"], "batch_groups": 2},
    "output_dir": out, "max_steps": 2, "progress": False, "tensorboard": False, "lr": 1e-3,
    "loss_backend": "reference", "objective": {"name": "dpo"}, "parallel": strategy})
trainer = Trainer(cfg)
rank = trainer.parallel.rank


def trainable():  # full tensors on every rank (FSDP2 shards them)
    with trainer.parallel.gathered():
        return {n: p.detach().clone() for n, p in trainer.bundle.denoiser.named_parameters() if p.requires_grad}


initial = trainable()


def rank_1_all_tied(batches):
    for epoch, batch in batches:
        if rank == 1:
            batch = {**batch, "psi": torch.full_like(batch["psi"], 0.5)}
        yield epoch, batch


batches = rank_1_all_tied(trainer.batches())
metrics = [trainer.optimizer_step(batches)[0] for _ in range(2)]
final = trainable()
result = {"rank": rank, "metrics": metrics,
          "moved": sum(float((final[n].float() - initial[n].float()).abs().sum()) for n in initial),
          "checksum": sum(float(p.double().sum()) for p in final.values())}
with open(f"{out}/rank{rank}.json", "w") as file:
    json.dump(result, file)
trainer.parallel.close()
'''


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero2"])
def test_a_rank_without_preferences_keeps_the_collectives_in_step(cached_dataset, tmp_path, strategy):
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed", reason="the 'distributed' extra (deepspeed) is not installed")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               json.dumps(cached_dataset), str(tmp_path), strategy]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{strategy}: the ranks hung (no result in 240 s): {str(err.stderr)[-3000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert [bool(m) for m in result["metrics"]] == [True, True]
        assert result["moved"] > 0  # rank 0's preferences trained both ranks' replicas
    assert "loss" in results[0]["metrics"][0] and "loss" not in results[1]["metrics"][0]  # rank 1 kept no group
    assert results[0]["checksum"] == pytest.approx(results[1]["checksum"], rel=1e-6)
