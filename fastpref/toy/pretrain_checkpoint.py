"""Resumable state of a toy pretraining run (work_dir/checkpoint.pt): modules, optimizer, RNGs, step, EMA and the
run's record so far (losses, training minutes, the early snapshot's step), so that a resumed run's metrics.json
describes the whole run; written atomically, read back as tensors and plain data only (a planted pickle cannot run)."""

from __future__ import annotations

import torch

from fastpref.toy.pretrain_loop import PretrainArgs
from fastpref.train.checkpoint import load_state
from fastpref.utils.atomic import atomic_file


def save_checkpoint(
    args: PretrainArgs, modules: dict, optimizer, rng, step: int, total: int | None, ema=None, generator=None,
    record: dict | None = None,
) -> None:
    args.work_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "modules": {name: module.state_dict() for name, module in modules.items()},
        "optimizer": optimizer.state_dict(),
        "rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "step": step,
        "total": total,
        "ema": ema.state_dict() if ema is not None else None,
        "generator": generator.get_state() if generator is not None else None,
        "record": record or {},
    }
    with atomic_file(args.work_dir / "checkpoint.pt") as handle:
        torch.save(payload, handle)


def maybe_resume(args: PretrainArgs, modules: dict, optimizer, rng, ema=None, generator=None) -> dict:
    path = args.work_dir / "checkpoint.pt" if args.work_dir else None
    if not (args.resume and path and path.exists()):
        return {"step": 0, "total": None, "rng": rng, "record": {}}
    payload = load_state(path)  # tensors and plain data only, never a pickled object
    for name, module in modules.items():
        module.load_state_dict(payload["modules"][name])
    optimizer.load_state_dict(payload["optimizer"])
    rng.bit_generator.state = payload["rng"]
    torch.set_rng_state(payload["torch_rng"])
    if ema is not None and payload["ema"] is not None:
        ema.load_state_dict(payload["ema"])
    if generator is not None and payload.get("generator") is not None:
        generator.set_state(payload["generator"])
    # checkpoints written before the record existed resume with an empty one
    return {"step": payload["step"], "total": payload["total"], "rng": rng, "record": payload.get("record") or {}}
