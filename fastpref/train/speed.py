"""Speed switches: regional torch.compile, FP8 linear layers, 8-bit AdamW, gradient checkpointing, attention
backend, channels-last, bf16/fp16 autocast (fp16 with dynamic loss scaling). Each refuses with a clear message
where the hardware or install cannot do it: `check_speed_support` before any model is loaded, and each switch again
where it is applied.

    speed:
      compile: true              # torch.compile of the denoiser's repeated blocks (regional compilation)
      fp8: true                  # torchao Float8Linear for the eligible nn.Linear layers (CUDA cc >= 8.9)
      optimizer: adamw8bit       # bitsandbytes AdamW8bit (8-bit optimizer state)
      gradient_checkpointing: true
      attention: flash           # PyTorch SDPA backend: sdpa (let PyTorch pick) / flash / efficient / cudnn / math,
                                 # or xformers (CUDA only)
      channels_last: true
      mixed_precision: bf16      # no / bf16 / fp16 autocast; fp16 trains with dynamic loss scaling
                                 # (torch.amp.GradScaler, or DeepSpeed's fp16 block under ZeRO: see parallel.py)
      fused_loss: true           # false forces loss_backend=reference

The switches change speed and memory, not the math: the tests check that each gives the loss and gradients of the
plain fp32 run (to float rounding for checkpointing, channels-last, attention kernels and compile; loosely for bf16
and FP8, whose rounding is coarser).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fastpref.utils.imports import require

# Repeated blocks of the denoisers we support: compiling each block (not the whole model) keeps compile time
# short and the graphs identical across blocks, so inductor reuses them.
REGIONAL_BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")
REGIONAL_SINGLE_BLOCKS = ("mid_block",)

AttentionName = Literal["sdpa", "flash", "efficient", "cudnn", "math", "xformers"]
# attention backends that are PyTorch SDPA kernels, by the name used in the config
SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                "math": "MATH"}
# measured with torch 2.13+cpu: only the math and the flash-style kernel exist on CPU
SDPA_KERNELS_ON_CPU = ("flash", "math")
# SDPA flash / cuDNN kernels take fp16 / bf16 inputs only and need an Ampere or newer GPU
HALF_PRECISION_SDPA_KERNELS = ("flash", "cudnn")
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores


@dataclass
class SpeedConfig:
    compile: bool = False
    # torch.compile mode / backend for the compiled blocks; eager (dynamo capture only) and aot_eager (+ the
    # backward graph) generate no code: they tell a tracing problem from an inductor one, and keep tests fast
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    fp8: bool = False
    # auto: torchao's H100 size heuristic (small matmuls are faster in bf16); all: every Linear with dims % 16 == 0
    fp8_layers: Literal["auto", "all"] = "auto"
    # adafactor: transformers' Adafactor with the Diffusion-DPO SDXL settings (see build_optimizer)
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    gradient_checkpointing: bool = False
    attention: AttentionName = "sdpa"
    channels_last: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    fused_loss: bool = True


class UnsupportedSpeedOption(RuntimeError):
    pass


# --------------------------------------------------------------------------- support checks


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < FP8_MIN_CAPABILITY:
            return False, (f"FP8 matmuls need compute capability >= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} "
                           f"(Ada/Hopper); this GPU is {major}.{minor}")
        return True, ""
    if device.type == "cpu":
        return True, ""  # torch._scaled_mm has a CPU kernel: slow, but it lets the FP8 path be tested here
    return False, f"FP8 training is not supported on device type {device.type}"


def attention_unsupported_reason(backend: str, device: torch.device, half_precision: bool) -> str | None:
    """Why `backend` cannot run on `device` (None: it can). `half_precision`: attention inputs are fp16 / bf16."""
    if backend == "sdpa":
        return None
    if backend == "xformers":
        if device.type != "cuda":
            return "xformers has no CPU kernels; use attention: sdpa on CPU"
        return None
    if backend not in SDPA_KERNELS:
        return f"unknown attention backend {backend!r} (expected sdpa, xformers or one of {sorted(SDPA_KERNELS)})"
    if device.type == "cpu":
        if backend not in SDPA_KERNELS_ON_CPU:
            return f"PyTorch has no CPU kernel for SDPA backend {backend!r}; on CPU use sdpa, flash or math"
        return None
    if device.type != "cuda":
        return f"attention backend {backend!r} is not supported on device type {device.type}"
    if backend in HALF_PRECISION_SDPA_KERNELS:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the SDPA {backend} kernel needs compute capability >= 8.0; this GPU is {major}.{minor}"
        if not half_precision:
            return (f"the SDPA {backend} kernel takes fp16 / bf16 inputs only; set mixed_precision: bf16 or "
                    "model.dtype: bfloat16, or use attention: efficient / sdpa")
    return None


def check_speed_support(cfg: SpeedConfig, device: torch.device, weight_dtype: torch.dtype = torch.float32) -> None:
    """Refuse, before any model is loaded, every switch this device / install cannot run; one error lists all."""
    problems = []
    if cfg.fp8:
        ok, why = fp8_supported(device)
        if not ok:
            problems.append(f"speed.fp8: {why}")
        problems += _missing("torchao.float8", "speed.fp8 (FP8 training)")
        if ok and device.type == "cuda" and not cfg.compile:
            warnings.warn("speed.fp8 without speed.compile: torchao's FP8 casts are only fused (and faster than "
                          "bf16) under torch.compile", stacklevel=2)
    if cfg.optimizer == "adamw8bit":
        problems += _missing("bitsandbytes", "speed.optimizer=adamw8bit")
    try:
        autocast_dtype(device, cfg.mixed_precision)
    except UnsupportedSpeedOption as err:
        problems.append(str(err))
    half = cfg.mixed_precision != "no" or weight_dtype in (torch.float16, torch.bfloat16)
    why = attention_unsupported_reason(cfg.attention, device, half)
    if why:
        problems.append(f"speed.attention={cfg.attention}: {why}")
    elif cfg.attention == "xformers":
        problems += _missing("xformers", "speed.attention=xformers")
    if problems:
        raise UnsupportedSpeedOption("; ".join(problems))


def _missing(module: str, purpose: str) -> list[str]:
    try:
        require(module, purpose)
    except ImportError as err:
        return [str(err)]
    return []


# --------------------------------------------------------------------------- the switches


def compile_regions(denoiser: nn.Module, mode: str = "default", backend: str = "inductor") -> int:
    """Compile the denoiser's repeated blocks in place; returns how many were compiled.

    Blocks are compiled lazily (at their first call), so modules swapped in before the first forward (FP8 linears,
    attention processors) are what gets traced. A LoRA reference run with the adapters off traces a second graph
    per block (the adapters' on/off flag is a guard).
    """
    blocks = [block for name in REGIONAL_BLOCK_LISTS for block in getattr(denoiser, name, None) or []]
    blocks += [block for name in REGIONAL_SINGLE_BLOCKS if (block := getattr(denoiser, name, None)) is not None]
    if not blocks:
        raise UnsupportedSpeedOption(
            f"speed.compile: found no blocks to compile in {type(denoiser).__name__} "
            f"(looked for {REGIONAL_BLOCK_LISTS + REGIONAL_SINGLE_BLOCKS})"
        )
    for block in blocks:
        block.compile(mode=mode, backend=backend)
    return len(blocks)


def convert_linear_to_fp8(denoiser: nn.Module, device: torch.device, layers: str = "auto") -> int:
    """Swap eligible nn.Linear layers for torchao Float8Linear (dynamic tensorwise scaling); returns how many.

    LoRA factors stay in high precision (rank-sized dims, and FP8 would quantise the very weights being trained);
    a LoRA layer's frozen base weight is converted. `layers`: "auto" keeps torchao's size heuristic (measured on
    H100: below it the casts cost more than the FP8 matmul saves), "all" converts every Linear whose dims are
    multiples of 16 (the FP8 matmul's requirement).
    """
    ok, why = fp8_supported(device)
    if not ok:
        raise UnsupportedSpeedOption(f"speed.fp8: {why}")
    float8 = require("torchao.float8", "speed.fp8 (FP8 training)")
    if layers == "auto":
        from torchao.float8.float8_linear_utils import _auto_filter_for_recipe

        size_filter = _auto_filter_for_recipe("tensorwise", filter_fqns=[])
    elif layers == "all":
        def size_filter(module: nn.Module, fqn: str) -> bool:
            return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
    else:
        raise ValueError(f"speed.fp8_layers must be 'auto' or 'all', got {layers!r}")
    converted = []

    def eligible(module: nn.Module, fqn: str) -> bool:
        if "lora_" in fqn or not size_filter(module, fqn):
            return False
        converted.append(fqn)
        return True

    float8.convert_to_float8_training(denoiser, module_filter_fn=eligible)
    return len(converted)


def build_optimizer(params, kind: str, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """torch AdamW, or bitsandbytes AdamW8bit: 8-bit blockwise-quantised moments for tensors of >= 4096 elements
    (bitsandbytes' min_8bit_size; smaller ones, e.g. most LoRA factors, keep 32-bit moments)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check train.mode (lora/full) and the LoRA target modules")
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if kind == "adamw8bit":
        bnb = require("bitsandbytes", "speed.optimizer=adamw8bit")
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if kind == "adafactor":
        # SalesforceAIResearch/DiffusionDPO train.py with --sdxl: transformers.Adafactor(lr, weight_decay,
        # clip_threshold=1.0, scale_parameter=False, relative_step=False), i.e. a fixed lr, no momentum (beta1 None)
        transformers = require("transformers", "speed.optimizer=adafactor")
        return transformers.optimization.Adafactor(params, lr=lr, weight_decay=weight_decay, clip_threshold=1.0,
                                                   scale_parameter=False, relative_step=False, warmup_init=False,
                                                   beta1=None)
    raise ValueError(f"speed.optimizer must be 'adamw', 'adamw8bit' or 'adafactor', got {kind!r}")


def build_lr_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    """diffusers' get_scheduler: "constant" is its constant_with_warmup (lr x step / warmup until warmup_steps, so
    the first update runs at lr 0 when there is a warm-up), "linear" and "cosine" decay to 0 at total_steps after the
    same warm-up. A LambdaLR, so its state (the step) is what a checkpoint keeps."""
    from diffusers.optimization import get_scheduler

    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"lr_scheduler must be 'constant', 'linear' or 'cosine', got {schedule!r}")
    return get_scheduler("constant_with_warmup" if schedule == "constant" else schedule, optimizer,
                         num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def is_adafactor(optimizer) -> bool:
    """Whether `optimizer` is transformers' Adafactor (speed.optimizer: adafactor), without importing transformers."""
    return any(cls.__name__ == "Adafactor" and cls.__module__.startswith("transformers.")
               for cls in type(optimizer).__mro__)


def init_adafactor_state_on_dtensors(optimizer) -> None:
    """transformers' Adafactor creates a matrix's factored second moments at its first step as plain tensors
    (`torch.zeros(shape).to(grad)`), which FSDP2's DTensor parameters refuse to be added to. Created here first, as
    the DTensors that its own means of the sharded gradient give (a mean over the sharded dim made the replicated
    value), its step keeps them; every later op is its own, on DTensors, which sum across ranks where the whole
    tensor counts (the column means, the update's RMS that clip_threshold compares), as one process computes it."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    def replicated_where_pending(tensor):
        placements = [Replicate() if isinstance(p, Partial) else p for p in tensor.placements]
        return tensor.redistribute(tensor.device_mesh, placements)

    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor) or optimizer.state[param]:
                continue
            factored, use_first_moment = optimizer._get_options(group, param.shape)
            zeros = torch.zeros_like(param, dtype=torch.float32)  # the state's dtype: Adafactor's float32 grad
            state: dict = {"step": 0, "RMS": 0}
            if use_first_moment:
                state["exp_avg"] = zeros.clone()
            if factored:
                state["exp_avg_sq_row"] = replicated_where_pending(zeros.mean(dim=-1))
                state["exp_avg_sq_col"] = replicated_where_pending(zeros.mean(dim=-2))
            else:
                state["exp_avg_sq"] = zeros.clone()
            optimizer.state[param] = state


class SDPAKernel(contextlib.AbstractContextManager):
    """Restricts scaled_dot_product_attention to one kernel while active. Unlike torch's `sdpa_kernel` (a
    one-shot generator context) it can be entered again at every step."""

    def __init__(self, backend: str):
        from torch.nn.attention import SDPBackend

        self.kernel = getattr(SDPBackend, SDPA_KERNELS[backend])
        self._active: list[contextlib.AbstractContextManager] = []

    def __enter__(self):
        from torch.nn.attention import sdpa_kernel

        context = sdpa_kernel([self.kernel])
        context.__enter__()
        self._active.append(context)
        return self

    def __exit__(self, *exc):
        return self._active.pop().__exit__(*exc)


def set_attention_backend(denoiser: nn.Module, backend: str, device: torch.device,
                          mixed_precision: str | None = None) -> contextlib.AbstractContextManager:
    """Configure attention; returns a reusable context manager to wrap forward and backward passes in.

    The denoisers' attention processors call F.scaled_dot_product_attention, so an SDPA kernel is chosen with a
    context; xformers replaces the processors. `mixed_precision` (speed.mixed_precision) lets the half-precision
    kernels be refused up front in an fp32 run; None skips that check.
    """
    weights_half = next(denoiser.parameters()).dtype in (torch.float16, torch.bfloat16)
    half = mixed_precision is None or mixed_precision != "no" or weights_half
    why = attention_unsupported_reason(backend, device, half)
    if why:
        raise UnsupportedSpeedOption(f"speed.attention={backend}: {why}")
    if backend == "xformers":
        require("xformers", "speed.attention=xformers")
        denoiser.enable_xformers_memory_efficient_attention()
        return contextlib.nullcontext()
    if backend == "sdpa":
        return contextlib.nullcontext()
    return SDPAKernel(backend)


@functools.lru_cache(maxsize=None)
def _fp16_amp_on_cpu() -> bool:
    """Whether this torch runs fp16 autocast and a GradScaler on CPU (torch 2.13 does; older ones warn that the
    dtype is unsupported and silently run fp32, or have no CPU GradScaler)."""
    try:
        torch.amp.GradScaler("cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type="cpu", dtype=torch.float16):
                out = torch.nn.functional.linear(torch.ones(1, 2), torch.ones(2, 2))
        return out.dtype == torch.float16
    except Exception:  # noqa: BLE001 - any failure means: not supported here
        return False


def fp16_unsupported_reason(device: torch.device) -> str | None:
    """Why fp16 autocast with dynamic loss scaling cannot run on `device` (None: it can)."""
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if _fp16_amp_on_cpu() else (
            f"torch {torch.__version__} has no fp16 autocast or GradScaler on CPU")
    return f"fp16 autocast with loss scaling is not supported on device type {device.type}"


def autocast_dtype(device: torch.device, mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype of speed.mixed_precision on `device` (None: no autocast); refuses what cannot run."""
    if mixed_precision == "no":
        return None
    if mixed_precision not in ("bf16", "fp16"):
        raise ValueError(f"speed.mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
    if mixed_precision == "fp16" and (why := fp16_unsupported_reason(device)):
        raise UnsupportedSpeedOption(f"speed.mixed_precision=fp16: {why}; allowed values here: no, bf16")
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


class GradScaler(torch.amp.GradScaler):
    """torch's dynamic loss scaler (init scale 2**16, x0.5 on overflow, x2 after 2000 clean steps), which also
    unscales fp16 gradients, i.e. fp16 trainable weights (model.dtype: float16). torch's own refuses those ("Attempting
    to unscale FP16 gradients": its recipe keeps fp32 master weights, as speed.mixed_precision=fp16 does); unscaling
    them in place is the same check-and-divide kernel, with fp16's range for the result."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


def make_grad_scaler(device: torch.device) -> GradScaler:
    """The loss scaler of an fp16 run on `device` (refuses a device where fp16 cannot run, naming the key)."""
    if why := fp16_unsupported_reason(device):
        raise UnsupportedSpeedOption(f"speed.mixed_precision=fp16 (or model.dtype=float16): {why}; allowed values "
                                     "here: no, bf16")
    return GradScaler(device.type)


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """Autocast for the forward passes (weights and optimizer state stay in their own dtype).

    fp16 needs loss scaling, which the Parallel object of the run does (fastpref.train.parallel): backward scales
    the loss, clipping unscales, overflowing steps are skipped and the scale adapts.
    """
    dtype = autocast_dtype(device, mixed_precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def apply_model_speedups(denoiser: nn.Module, cfg: SpeedConfig, device: torch.device) -> dict[str, int | bool]:
    """Apply the switches that change the module itself; returns what was done, for the run summary.

    Order matters: FP8 swaps modules before compile traces them.
    """
    done: dict[str, int | bool] = {}
    if cfg.gradient_checkpointing:
        if not getattr(denoiser, "_supports_gradient_checkpointing", False):
            raise UnsupportedSpeedOption(
                f"speed.gradient_checkpointing: {type(denoiser).__name__} does not support it")
        denoiser.enable_gradient_checkpointing()
        done["gradient_checkpointing"] = True
    if cfg.channels_last:
        # conv outputs follow the weights' layout, so the activations become NHWC after the first conv
        denoiser.to(memory_format=torch.channels_last)
        done["channels_last"] = True
    if cfg.fp8:
        done["fp8_linears"] = convert_linear_to_fp8(denoiser, device, cfg.fp8_layers)
        if done["fp8_linears"] == 0:
            warnings.warn(f"speed.fp8: no Linear layer of {type(denoiser).__name__} passed the speed.fp8_layers="
                          f"{cfg.fp8_layers} filter; the run is not FP8 (speed.fp8_layers=all converts them all)",
                          stacklevel=2)
    if cfg.compile:
        done["compiled_blocks"] = compile_regions(denoiser, cfg.compile_mode, cfg.compile_backend)
    return done
