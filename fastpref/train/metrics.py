"""What a training run reports: metrics.jsonl, TensorBoard, W&B, the progress bar and the final summary.

metrics.jsonl: one JSON line per logged step, what the run computed (loss, implicit_accuracy, margin, e_pol, e_ref,
grad_norm, lr, nonfinite_total, loss_scale under fp16; `skipped` on a skipped step) and images_per_s. Apart from
images_per_s it is reproducible from the config, so resume tests compare it.

Memory peaks differ between two runs of the same config, so they go to TensorBoard / W&B, the progress bar and
summary.json only (`memory_usage`):
    max_rss_gb     every device: the process's peak resident set size (host RAM), getrusage's ru_maxrss, GiB;
    max_memory_gb  CUDA devices: torch.cuda.max_memory_allocated, GiB: the peak of the tensors torch allocated on
                   the GPU (not the caching allocator's reserve, nor other processes); what bounds the batch size.
On a CPU run the tensors live in host RAM: max_rss_gb is then the training's memory (plus Python, libraries, data).

summary.json (written atomically at the end, next to metrics.jsonl) and the printed summary: steps, final and mean
loss / implicit accuracy / margin over the steps this process ran, steps skipped, wall time, images/s, memory.
Images (validation grids) go to TensorBoard / W&B only.
"""

from __future__ import annotations

import json
import math
import sys
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

    def log(self, step: int, metrics: dict[str, float], measurements: dict[str, float] | None = None) -> None:
        """`metrics` to every sink; `measurements` (memory peaks: they differ between identical runs) to
        TensorBoard / W&B only, not to metrics.jsonl."""
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}, allow_nan=True) + "\n")
        self._file.flush()
        clean.update({k: float(v) for k, v in (measurements or {}).items()})
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


def memory_usage(device) -> dict[str, float]:
    """Peak memory so far, in GiB: max_rss_gb (host, every device) and max_memory_gb (CUDA); see the module doc."""
    import torch

    usage = {}
    try:
        import resource  # POSIX only
    except ImportError:
        pass
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        usage["max_rss_gb"] = rss / (2**30 if sys.platform == "darwin" else 2**20)
    if getattr(device, "type", None) == "cuda":
        usage["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return usage


def progress_postfix(metrics: dict[str, float], images_per_s: float, memory: dict[str, float]) -> dict[str, str]:
    """The progress bar's loss, implicit accuracy, margin, lr (when logged), images/s and memory (GPU peak on CUDA,
    else the process's peak RSS)."""
    postfix = {"loss": f"{metrics.get('loss', math.nan):.4f}"}
    if "implicit_accuracy" in metrics:
        postfix["acc"] = f"{metrics['implicit_accuracy']:.2f}"
    if "margin" in metrics:
        postfix["margin"] = f"{metrics['margin']:.3g}"
    if "lr" in metrics:
        postfix["lr"] = f"{metrics['lr']:.2e}"
    postfix["img/s"] = f"{images_per_s:.3g}"
    memory_gb = memory.get("max_memory_gb", memory.get("max_rss_gb"))
    if memory_gb is not None:
        postfix["mem"] = f"{memory_gb:.2f}G"
    return postfix


class RunHistory:
    """The per-step metrics of this process's steps, for the final summary."""

    KEYS = ("loss", "implicit_accuracy", "margin")

    def __init__(self):
        self.steps = 0
        self.skipped = 0
        self.values: dict[str, list[float]] = {key: [] for key in self.KEYS}

    def add(self, metrics: dict[str, float]) -> None:
        self.steps += 1
        if metrics.get("skipped") or not math.isfinite(metrics.get("loss", math.nan)):
            self.skipped += 1
            return
        for key in self.KEYS:
            if key in metrics:
                self.values[key].append(float(metrics[key]))

    def summary(self) -> dict[str, float]:
        """final_<key> (the last step that updated) and mean_<key> (over the updating steps) for loss, implicit
        accuracy and margin, where the objective reports them."""
        out = {}
        for key, values in self.values.items():
            if values:
                out[f"final_{key}"] = values[-1]
                out[f"mean_{key}"] = math.fsum(values) / len(values)
        return out


def write_summary(path: str | Path, summary: dict[str, Any]) -> None:
    """summary.json, atomically (a reader sees the previous file or this one); NaN / inf become null."""
    from fastpref.utils.atomic import atomic_file

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    with atomic_file(path, "w") as handle:
        json.dump(clean(summary), handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable end-of-training summary (summary.json holds the same numbers)."""
    def number(key, fmt):
        value = summary.get(key)
        return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)

    resumed = f", resumed from step {summary['resumed_from']}" if summary.get("resumed_from") is not None else ""
    lines = [f"[fastpref train] summary: {summary['steps']} steps ({summary.get('steps_this_run', 0)} in this run"
             f"{resumed}) in {number('wall_time_s', '.1f')} s (+ {number('setup_time_s', '.1f')} s loading), "
             f"{number('images_per_s', '.3g')} images/s"]
    parts = []
    for key, name, fmt in (("loss", "loss", ".4f"), ("implicit_accuracy", "implicit accuracy", ".3f"),
                           ("margin", "margin", ".4g")):
        if f"final_{key}" in summary:
            parts.append(f"{name}: final {number(f'final_{key}', fmt)}, mean {number(f'mean_{key}', fmt)}")
    if parts:
        lines.append("  " + " | ".join(parts) + " (mean over this run's updating steps)")
    lines.append(f"  non-finite steps skipped: {summary.get('nonfinite_total', 0)} in the run; "
                 f"{summary.get('skipped_this_run', 0)} steps of this run made no update")
    memory = [f"peak RSS {number('max_rss_gb', '.2f')} GiB"] if "max_rss_gb" in summary else []
    if "max_memory_gb" in summary:
        memory.insert(0, f"peak GPU memory {number('max_memory_gb', '.2f')} GiB")
    if memory:
        lines.append("  memory: " + ", ".join(memory))
    lines.append(f"  output: {summary.get('output_dir')} (metrics.jsonl, summary.json, checkpoints/)")
    return "\n".join(lines)


CURVES = (("loss", "loss"), ("implicit_accuracy", "implicit accuracy"), ("margin", "margin"))


def plot_training_curves(runs: dict[str, str | Path], path: str | Path) -> Path | None:
    """One PNG with loss, implicit accuracy and margin against the step for each run's metrics.jsonl (skipped
    steps are gaps). Returns None, saying why, when matplotlib (the `bench` extra) is missing."""
    try:
        import matplotlib
    except ImportError:
        print("[fastpref] training curves skipped: matplotlib is not installed (pip install 'fastpref[bench]')")
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from fastpref.utils.atomic import atomic_file

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.2), squeeze=False)
    for name, run_dir in runs.items():
        rows = read_metrics(run_dir)
        for ax, (key, _) in zip(axes[0], CURVES):
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=name, linewidth=1.2)
    for ax, (_, title) in zip(axes[0], CURVES):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path


def host_identity() -> dict[str, Any]:
    """Where a run ran, as far as its numbers depend on it: torch's version and intra-op thread count, the CPU model
    (Linux: /proc/cpuinfo's first "model name") and the CUDA device, if any."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
