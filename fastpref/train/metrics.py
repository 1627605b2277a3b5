"""Training metrics: one JSON line per step (the loss log that resume tests compare), TensorBoard, and W&B if asked;
images (validation grids) go to TensorBoard / W&B only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastpref.utils.imports import available


class MetricsLogger:
    """Writes metrics.jsonl (+ TensorBoard / W&B); on resume drops lines past the checkpoint's step."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                record = json.loads(line)
                if resume_step is not None and record.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(f"{line}\n" for line in kept))
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard and available("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._wandb = None
        if wandb_project:
            if not available("wandb"):
                raise RuntimeError("train.wandb_project is set but wandb is not installed: pip install wandb")
            import wandb

            self._wandb = wandb.init(project=wandb_project, dir=str(self.run_dir), config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def log_image(self, tag: str, image, step: int) -> None:
        """An RGB uint8 (H, W, 3) image (e.g. a validation grid) to TensorBoard / W&B; metrics.jsonl is left alone."""
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
