"""Checkpoints: atomic step directories, keep the last N, and everything needed to resume exactly.

Layout of one checkpoint (written to a temp dir, renamed into place only when complete):
    <run>/checkpoints/step-000120/
        trainer_state.pt       optimizer, LR scheduler, loss scaler (fp16), data position, RNG states, counters:
                               tensors, numbers, strings, lists and dicts only, read with torch.load(weights_only=True)
                               so that a checkpoint from someone else cannot run code (save_state / load_state)
        trainable.safetensors  the trainable parameters in fp32 under their module names (exact resume)
        lora/                  LoRA runs: pytorch_lora_weights.safetensors that diffusers' load_lora_weights reads
        denoiser/              full fine-tunes: the denoiser via save_pretrained (from_pretrained loads it)
        meta.json              step, config hash, wall time
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fastpref.utils.atomic import commit_dir

STEP_DIR = re.compile(r"^step-(\d{6,})$")
# leftovers of a run killed while saving: a half-written checkpoint, or a complete one that commit_dir had moved
# aside to replace it (killed between its two renames)
PARTIAL_DIR = re.compile(r"^\.step-(\d{6,})\.tmp$")
MOVED_ASIDE_DIR = re.compile(r"^\.step-(\d{6,})\.old$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be (or must not be) loaded; the message names the file."""


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as plain data (numpy's key array as a list): weights_only-loadable."""
    version, key, gauss_next = random.getstate()
    name, np_key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": [version, list(key), gauss_next],
        "numpy": [name, np_key.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, key, gauss_next = state["python"]
    random.setstate((version, tuple(key), gauss_next))
    name, np_key, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(np_key, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(state: dict[str, Any], path: Path) -> None:
    """torch.save of plain data (tensors, numbers, strings, lists, dicts); load_state reads it back."""
    torch.save(state, path)


def load_state(path: Path, allowed: tuple = ()) -> dict[str, Any]:
    """A file written by save_state, unpickled with weights_only=True: anything but tensors, plain data and the
    classes in `allowed` (e.g. a planted object whose unpickling would run code) is refused, never constructed."""
    import pickle

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused to load: it holds more than tensors and plain data (a checkpoint "
                              f"from an older fastpref, or one made to run code when unpickled): {first}") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: cannot read ({type(err).__name__}: {err})") from None


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"checkpoint keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.directory / f"step-{step:06d}"

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        self._restore_moved_aside()
        found = (STEP_DIR.match(p.name) for p in self.directory.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def _restore_moved_aside(self) -> None:
        """A complete step-N that was moved aside to be replaced, with no step-N in its place, is the checkpoint."""
        for path in self.directory.iterdir():
            match = MOVED_ASIDE_DIR.match(path.name)
            if match and path.is_dir() and not self.path_for(int(match.group(1))).exists():
                with contextlib.suppress(OSError):  # another rank may be restoring it at the same moment
                    os.replace(path, self.path_for(int(match.group(1))))

    def _remove_partial(self) -> None:
        """Main rank, once a checkpoint is committed: no other save is in flight, so every temp dir is a leftover
        (e.g. of a step that a resumed run with another checkpoint_every never saves again)."""
        for path in self.directory.iterdir():
            if PARTIAL_DIR.match(path.name) or MOVED_ASIDE_DIR.match(path.name):
                shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> Path | None:
        # Only complete checkpoints ever carry a step-* name (see commit), so the newest is safe to load.
        steps = self.steps()
        return self.path_for(steps[-1]) if steps else None

    def begin(self, step: int, is_main: bool = True) -> Path:
        """The temp directory every rank writes its part of checkpoint `step` into (a name all ranks know)."""
        tmp = self.directory / f".step-{step:06d}.tmp"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while saving
            tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int, tmp: Path, meta: dict[str, Any] | None = None) -> Path:
        """Main rank, after every rank wrote: the checkpoint appears under its final name, old ones are pruned."""
        info = {"step": step, "saved_at": time.time(), **(meta or {})}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2))
        target = self.path_for(step)
        commit_dir(tmp, target)
        for old in self.steps()[: -self.keep_last]:
            shutil.rmtree(self.path_for(old), ignore_errors=True)
        self._remove_partial()
        return target

    def save(self, step: int, write: Callable[[Path], None], meta: dict[str, Any] | None = None) -> Path:
        """Single process: `write(tmp_dir)` fills the checkpoint; it appears under its final name once complete."""
        tmp = self.begin(step)
        try:
            write(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.commit(step, tmp, meta)

    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        meta_path = Path(path) / "meta.json"
        try:
            return json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RuntimeError(f"checkpoint {path}: cannot read meta.json ({err})") from None


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: param.detach().to("cpu", copy=True).contiguous()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


def save_trainable(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(trainable_state_dict(module), str(path))


def load_trainable(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = dict(module.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise RuntimeError(
            f"checkpoint {path}: trainable parameters do not match the model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}); was it written by another config?"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
