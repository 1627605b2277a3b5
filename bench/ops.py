"""Benchmark of the fused preference-loss ops (Diffusion-DPO objective: forward, backward, full step).

Variants (same semantics, fastpref/ops/reference.py):
    reference           eager oracle from the tests (sample_errors_reference + ranked_pair_loss_reference)
    reference_compiled  torch.compile of the same function
    paper               eager Diffusion-DPO as written in its training script (mse, mean, logsigmoid)
    paper_compiled      torch.compile of it
    triton              fastpref.ops.diffusion_dpo_loss(backend="triton")   (GPU)
    native              fastpref.ops.diffusion_dpo_loss(backend="native")   (CPU, when fastpref._C is built)

Reported per (mode, variant): median time and quartiles, bytes that must move at least (reads of
pred/target/ref_pred, write of grad_pred), achieved bandwidth, on GPU its fraction of a measured
device-to-device copy bandwidth (clone of a 1 GiB tensor) and the peak extra memory
(max_memory_allocated above what the inputs hold). Writes a CSV to bench/results/.

    python bench/ops.py                 # GPU: N=64 x 4x128x128 bf16; CPU: N=16 x 4x32x32 fp32
    python bench/ops.py --smoke         # seconds, for CI
    python bench/ops.py --objective spo # the online methods' ops: spo | grpo (pred = policy mean,
                                        # target = the sample, ref_pred = the reference mean);
                                        # "paper" is then the SPO / Flow-GRPO code's formula
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastpref.ops as ops  # noqa: E402
from common import RESULTS_DIR, stamp, synchronize, time_it, write_csv  # noqa: E402
from fastpref.ops import library  # noqa: E402
from fastpref.ops import reference as R  # noqa: E402

BETA = 2500.0
MODES = ("forward", "backward", "step")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def reference_dpo(pred, target, ref_pred):
    """The tests' oracle composed into Diffusion-DPO (winner-first pairs)."""
    n = pred.shape[0]
    e_pol, e_ref = R.sample_errors_reference(pred, target, ref_pred)
    scores = (torch.arange(n, device=pred.device) % 2 == 0).float()
    loss, _ = R.ranked_pair_loss_reference(
        e_pol - e_ref, scores, R.uniform_offsets(n, 2, pred.device), BETA, "sigmoid", "uniform"
    )
    return loss.mean()


def paper_dpo(pred, target, ref_pred):
    """Diffusion-DPO as in its training script, on the interleaved layout."""
    model_losses = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.dim())))
    with torch.no_grad():
        ref_losses = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(
            dim=list(range(1, pred.dim()))
        )
    model_diff = model_losses[0::2] - model_losses[1::2]
    ref_diff = ref_losses[0::2] - ref_losses[1::2]
    return -F.logsigmoid(-0.5 * (2 * BETA) * (model_diff - ref_diff)).mean()


def fused_dpo(backend):
    def loss_fn(pred, target, ref_pred):
        return ops.diffusion_dpo_loss(pred, target, ref_pred, beta=BETA, backend=backend).loss

    return loss_fn


# Online methods: a Gaussian step with std 0.5 per row; GRPO's old log-probs / advantages fixed.
STEP_STD = 0.5


def _grpo_inputs(pred):
    n = pred.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(1)
    old = (-0.5 - torch.rand(n, generator=gen)).to(pred.device)
    return old, torch.randn(n, generator=gen).to(pred.device)


def reference_spo(pred, target, ref_pred):
    return R.spo_loss_reference(pred, ref_pred, target, STEP_STD)[0]


def paper_spo(pred, target, ref_pred):
    """SPO's train_spo.py: log-densities elementwise (ddim_step_with_logprob), clamp, -log sigmoid."""
    def log_prob(mean):
        lp = -((target.float() - mean.float()) ** 2) / (2 * STEP_STD**2) - math.log(STEP_STD) - R.LOG_SQRT_2PI
        return lp.mean(dim=tuple(range(1, lp.ndim)))

    ratio = torch.clamp(torch.exp(log_prob(pred) - log_prob(ref_pred.detach())), 0.9, 1.1)
    return -torch.log(torch.sigmoid(10.0 * torch.log(ratio[0::2]) - 10.0 * torch.log(ratio[1::2]))).mean()


def fused_spo(backend):
    def loss_fn(pred, target, ref_pred):
        return ops.spo_loss(pred, ref_pred, target, STEP_STD, backend=backend).loss

    return loss_fn


def reference_grpo(pred, target, ref_pred):
    old, adv = _grpo_inputs(pred)
    return R.grpo_loss_reference(pred, ref_pred, target, STEP_STD, old, adv, 0.2, 0.04)[0]


def paper_grpo(pred, target, ref_pred):
    """Flow-GRPO's train_sd3.py step: elementwise log-density, clipped ratio, KL on the means."""
    old, adv = _grpo_inputs(pred)
    lp = -((target.float() - pred.float()) ** 2) / (2 * STEP_STD**2) - math.log(STEP_STD) - R.LOG_SQRT_2PI
    ratio = torch.exp(lp.mean(dim=tuple(range(1, lp.ndim))) - old)
    policy_loss = torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2)))
    kl = ((pred.float() - ref_pred.float()) ** 2).mean(dim=tuple(range(1, pred.ndim))) / (2 * STEP_STD**2)
    return policy_loss + 0.04 * kl.mean()


def fused_grpo(backend):
    def loss_fn(pred, target, ref_pred):
        old, adv = _grpo_inputs(pred)
        return ops.grpo_loss(pred, ref_pred, target, STEP_STD, old, adv, clip_range=0.2, kl_beta=0.04,
                             backend=backend).loss

    return loss_fn


OBJECTIVES = {
    "dpo": (reference_dpo, paper_dpo, fused_dpo),
    "spo": (reference_spo, paper_spo, fused_spo),
    "grpo": (reference_grpo, paper_grpo, fused_grpo),
}


def variants(device: torch.device, smoke: bool, objective: str = "dpo") -> tuple[dict, list[str]]:
    """name -> loss function, and notes on the variants left out."""
    reference_fn, paper_fn, fused = OBJECTIVES[objective]
    chosen, notes = {"reference": reference_fn, "paper": paper_fn}, []
    if smoke:
        notes.append("smoke: compiled variants skipped (a cold torch.compile takes ~20 s)")
    else:
        chosen["reference_compiled"] = torch.compile(reference_fn)
        chosen["paper_compiled"] = torch.compile(paper_fn)
    if device.type == "cuda" and not library.triton_unavailable_reason():
        chosen["triton"] = fused("triton")
    else:
        notes.append(
            "triton skipped: " + (library.triton_unavailable_reason() or "CPU (the interpreter is not a benchmark)")
        )
    if device.type == "cpu" and not library.native_unavailable_reason():
        chosen["native"] = fused("native")
    elif device.type == "cpu":
        notes.append(f"native skipped: {library.native_unavailable_reason()}")
    return chosen, notes


def copy_bandwidth_gbps(device, warmup: int, iters: int) -> float | None:
    """Device-to-device copy bandwidth of torch clone (read + write) of a 1 GiB tensor."""
    if device.type != "cuda":
        return None
    big = torch.empty(2**30 // 2, dtype=torch.bfloat16, device=device)
    ms = statistics.median(time_it(lambda: big.clone(), device, warmup, iters))
    del big
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def mode_callable(mode, loss_fn, pred, target, ref_pred):
    if mode == "forward":
        return lambda: loss_fn(pred, target, ref_pred)
    if mode == "step":
        return lambda: torch.autograd.grad(loss_fn(pred, target, ref_pred), pred)
    loss = loss_fn(pred, target, ref_pred)
    return lambda: torch.autograd.grad(loss, pred, retain_graph=True)


def minimum_bytes(mode, tensor_bytes, objective="dpo"):
    """Reads of pred/target/ref_pred in the forward; reads of pred/target + write of grad in the backward
    (GRPO's backward also reads ref_pred: its KL gradient is pred - ref_pred)."""
    backward = 4 if objective == "grpo" else 3
    return {"forward": 3, "backward": backward, "step": 3 + backward}[mode] * tensor_bytes


def run(args) -> Path:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if args.smoke:
        n, shape, dtype_name, warmup, iters = 4, (4, 8, 8), args.dtype or "fp32", 1, 3
    else:
        n = args.n or (64 if on_gpu else 16)
        shape = tuple(args.shape) if args.shape else ((4, 128, 128) if on_gpu else (4, 32, 32))
        dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
        warmup, iters = args.warmup, args.iters
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cpu").manual_seed(0)
    target = torch.randn(n, *shape, generator=gen).to(device=device, dtype=dtype)
    pred = (target.float() + 0.1 * torch.randn(n, *shape, generator=gen).to(device)).to(dtype).requires_grad_()
    ref_pred = (pred.detach().float() + 0.01 * torch.randn(n, *shape, generator=gen).to(device)).to(dtype)
    tensor_bytes = pred.numel() * pred.element_size()

    chosen, notes = variants(device, args.smoke, args.objective)
    if args.variants:
        chosen = {name: fn for name, fn in chosen.items() if name in args.variants}
    copy_gbps = copy_bandwidth_gbps(device, warmup, iters)
    device_name = torch.cuda.get_device_name(device) if on_gpu else (platform.processor() or platform.machine())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if not on_gpu:
        notes.append("peak memory: n/a on CPU (no allocator statistics)")

    rows = []
    for mode in MODES:
        baseline_ms = None
        for name, loss_fn in chosen.items():
            fn = mode_callable(mode, loss_fn, pred, target, ref_pred)
            if on_gpu:
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                allocated_before = torch.cuda.memory_allocated(device)
            times = time_it(fn, device, warmup, iters)
            extra_mb = (
                (torch.cuda.max_memory_allocated(device) - allocated_before) / 2**20 if on_gpu else None
            )
            median = statistics.median(times)
            q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median, median, median]
            gbps = minimum_bytes(mode, tensor_bytes, args.objective) / (median * 1e-3) / 1e9
            if name == "reference":
                baseline_ms = median
            rows.append(
                {
                    "date": datetime.date.today().isoformat(),
                    "device": device_name,
                    "torch": torch.__version__,
                    "triton": triton_version,
                    "objective": args.objective,
                    "mode": mode,
                    "variant": name,
                    "n": n,
                    "shape": "x".join(map(str, shape)),
                    "dtype": dtype_name,
                    "median_ms": round(median, 4),
                    "p25_ms": round(q[0], 4),
                    "p75_ms": round(q[2], 4),
                    "min_ms": round(min(times), 4),
                    "min_bytes_moved": minimum_bytes(mode, tensor_bytes, args.objective),
                    "achieved_GBps": float(f"{gbps:.4g}"),
                    "copy_GBps": round(copy_gbps, 1) if copy_gbps else "",
                    "fraction_of_copy_bw": float(f"{gbps / copy_gbps:.3g}") if copy_gbps else "",
                    "speedup_vs_reference": round(baseline_ms / median, 2) if baseline_ms else "",
                    "extra_peak_MiB": round(extra_mb, 2) if extra_mb is not None else "",
                    "iters": iters,
                }
            )

    out_dir = Path(args.out) if args.out else RESULTS_DIR
    objective = "" if args.objective == "dpo" else f"{args.objective}-"
    path = out_dir / f"ops-{objective}{device.type}-{'smoke-' if args.smoke else ''}{stamp()}.csv"
    # unprefixed columns (device, torch, triton, ...), as the earlier ops CSVs have them
    write_csv(path, rows, prefix="")

    print(f"device: {device_name} | torch {torch.__version__} | triton {triton_version} | "
          f"N={n} x {'x'.join(map(str, shape))} {dtype_name}" + (f" | copy {copy_gbps:.0f} GB/s" if copy_gbps else ""))
    header = f"{'mode':9} {'variant':19} {'median ms':>10} {'p25-p75 ms':>17} {'GB/s':>8} {'of copy':>8} {'vs ref':>7} {'extra MiB':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['mode']:9} {row['variant']:19} {row['median_ms']:>10.4f} "
              f"{row['p25_ms']:>8.4f}-{row['p75_ms']:<8.4f} {row['achieved_GBps']:>8.1f} "
              f"{str(row['fraction_of_copy_bw']):>8} {str(row['speedup_vs_reference']):>7} {str(row['extra_peak_MiB']):>10}")
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {path}")
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--n", type=int, help="number of samples N (pairs: even)")
    parser.add_argument("--shape", type=int, nargs="+", help="per-sample shape, e.g. 4 128 128")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--variants", nargs="+", help="subset of variants to run")
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="dpo",
                        help="dpo (default), or the online methods' spo / grpo ops")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, few iterations, no compile")
    parser.add_argument("--out", help=f"output folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    if args.n is not None and args.n % 2:
        parser.error(f"--n must be even (winner/loser pairs), got {args.n}")
    return args


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(parse_args())
