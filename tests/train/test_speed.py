"""The trainer's speed switches (fastpref.train.speed): each takes effect, keeps the step's math, refuses clearly
where the hardware or install cannot run it, and they combine.

Equivalence checks run the first step of a full fine-tune with the sft objective (plain MSE on the best image of
each group), so the loss and every gradient depend directly on the denoiser's output.
"""

import importlib.util
import math
import sys

import pytest
import torch
from torch import nn

from fastpref.train.loop import Trainer, train
from fastpref.train.speed import (
    GradScaler,
    SpeedConfig,
    UnsupportedSpeedOption,
    build_optimizer,
    check_speed_support,
    compile_regions,
    convert_linear_to_fp8,
    set_attention_backend,
)
from helpers.train import make_config

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run in the GPU job)")
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed: pip install 'fastpref[quant]'")
needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes is not installed: pip install 'fastpref[quant]'")


def make_trainer(ds, out, **overrides):
    settings = {"mode": "full", "objective.name": "sft", **overrides}
    return Trainer(make_config(ds, out, **settings))


def first_step(trainer):
    """Loss and gradients (by parameter name) of the trainer's first batch."""
    epoch, batch = next(trainer.batches())
    with trainer.attention:
        out = trainer.step_fn.forward(batch, epoch)
        out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in trainer.bundle.denoiser.named_parameters()
             if p.grad is not None}
    return out.loss.detach(), grads


def assert_gradients_close(grads, expected, rel_tol):
    """Whole-gradient check: ||g - g_ref|| <= rel_tol * ||g_ref|| over all parameters, same parameter set."""
    assert grads.keys() == expected.keys()
    diff = torch.cat([(grads[k].double() - expected[k].double()).flatten() for k in expected]).norm()
    norm = torch.cat([expected[k].double().flatten() for k in expected]).norm()
    assert norm > 0
    assert diff <= rel_tol * norm, f"relative gradient difference {float(diff / norm):.3g} > {rel_tol}"


@pytest.fixture(scope="module")
def fp32_first_step(cached_dataset, tmp_path_factory):
    """The plain fp32 / sdpa / eager first step that every switch is compared to (on one thread, like the tests:
    the reduction order must match for the tight tolerances)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return first_step(make_trainer(cached_dataset, tmp_path_factory.mktemp("fp32")))
    finally:
        torch.set_num_threads(threads)


def trainable_snapshot(trainer):
    return {k: v.detach().float().clone() for k, v in trainer.bundle.denoiser.named_parameters() if v.requires_grad}


# --------------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_recomputes_blocks_and_keeps_gradients(cached_dataset, tmp_path, fp32_first_step):
    trainer = make_trainer(cached_dataset, tmp_path, **{"speed.gradient_checkpointing": True})
    unet = trainer.bundle.denoiser
    assert trainer.speedups == {"gradient_checkpointing": True} and unet.is_gradient_checkpointing
    resnet = unet.down_blocks[0].resnets[0]
    calls = []
    # a pre-hook: torch's checkpoint stops the recomputation once it has the saved tensors, before the block returns
    resnet.register_forward_pre_hook(lambda *_: calls.append(1))
    loss, grads = first_step(trainer)
    assert len(calls) == 2  # the forward, then its recomputation during backward
    torch.testing.assert_close(loss, fp32_first_step[0], rtol=1e-6, atol=0)
    assert_gradients_close(grads, fp32_first_step[1], rel_tol=1e-5)


# --------------------------------------------------------------------------- channels-last


def test_channels_last_converts_weights_and_keeps_the_step(cached_dataset, tmp_path, fp32_first_step):
    trainer = make_trainer(cached_dataset, tmp_path, **{"speed.channels_last": True})
    assert trainer.speedups == {"channels_last": True}
    conv_weights = [p for p in trainer.bundle.denoiser.parameters() if p.ndim == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    assert not all(p.is_contiguous() for p in conv_weights)  # 1x1 convs are both; the 3x3 ones must not be
    loss, grads = first_step(trainer)
    torch.testing.assert_close(loss, fp32_first_step[0], rtol=1e-5, atol=0)
    assert_gradients_close(grads, fp32_first_step[1], rel_tol=1e-4)
    trainer.optimizer_step(trainer.batches())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)  # AdamW kept the layout


# --------------------------------------------------------------------------- mixed precision


def test_bf16_autocast_runs_the_denoiser_in_bf16_close_to_fp32(cached_dataset, tmp_path, fp32_first_step):
    trainer = make_trainer(cached_dataset, tmp_path, **{"speed.mixed_precision": "bf16"})
    # bf16 keeps 8 mantissa bits; measured: 6e-4 relative on the loss, 3e-2 on the gradients of this tiny net
    assert_autocast_step_close_to_fp32(trainer, torch.bfloat16, fp32_first_step, loss_rtol=5e-3, grad_rel_tol=0.1)


def assert_autocast_step_close_to_fp32(trainer, dtype, fp32_first_step, loss_rtol, grad_rel_tol):
    """The denoiser computes in `dtype`, weights and gradients stay fp32, and the step is close to the fp32 one."""
    output_dtypes = []
    trainer.bundle.denoiser.conv_out.register_forward_hook(lambda m, i, out: output_dtypes.append(out.dtype))
    loss, grads = first_step(trainer)
    assert output_dtypes == [dtype]
    assert all(g.dtype == torch.float32 for g in grads.values())  # fp32 master weights and gradients
    torch.testing.assert_close(loss, fp32_first_step[0], rtol=loss_rtol, atol=0)
    assert_gradients_close(grads, fp32_first_step[1], rel_tol=grad_rel_tol)


def test_bf16_live_reference_runs_in_the_same_precision(cached_dataset, tmp_path):
    """At step 0 the LoRA policy is the reference; a live reference under the same autocast gives the zero margin
    exactly (loss = log 2), whatever the rounding of bf16."""
    trainer = Trainer(make_config(cached_dataset, tmp_path, **{"objective.name": "dpo", "reference": "adapters_off",
                                                                "speed.mixed_precision": "bf16"}))
    loss, _ = first_step(trainer)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_fp16_autocast_runs_the_denoiser_in_fp16_close_to_fp32_with_a_loss_scaler(cached_dataset, tmp_path,
                                                                                  fp32_first_step):
    """torch 2.13 has fp16 CPU autocast and a CPU GradScaler; where torch has not, fp16 is refused naming the key
    (test_grad_scaler.py, with the scaler's own tests)."""
    trainer = make_trainer(cached_dataset, tmp_path, **{"speed.mixed_precision": "fp16"})
    assert isinstance(trainer.parallel.scaler, GradScaler)
    # fp16 keeps 11 mantissa bits; measured: 2e-7 relative on the loss, 3.5e-3 on the gradients of this tiny net
    assert_autocast_step_close_to_fp32(trainer, torch.float16, fp32_first_step, loss_rtol=1e-4, grad_rel_tol=0.02)


# --------------------------------------------------------------------------- attention backends


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_sdpa_kernels_available_on_cpu_match_default_sdpa(cached_dataset, tmp_path, fp32_first_step, backend):
    trainer = make_trainer(cached_dataset, tmp_path, **{"speed.attention": backend})
    for _ in range(2):  # the context is entered at every step
        with trainer.attention:
            assert torch.backends.cuda.math_sdp_enabled() == (backend == "math")
            assert torch.backends.cuda.flash_sdp_enabled() == (backend == "flash")
    assert torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()  # restored
    loss, grads = first_step(trainer)
    # different kernels round differently (the math kernel materialises the attention matrix)
    torch.testing.assert_close(loss, fp32_first_step[0], rtol=1e-5, atol=0)
    assert_gradients_close(grads, fp32_first_step[1], rel_tol=1e-4)
    metrics, _ = trainer.optimizer_step(trainer.batches())
    assert math.isfinite(metrics["loss"])


@pytest.mark.parametrize(
    "backend, needle",
    [
        ("xformers", "xformers has no CPU kernels"),
        ("efficient", "no CPU kernel for SDPA backend 'efficient'"),
        ("cudnn", "no CPU kernel for SDPA backend 'cudnn'"),
    ],
)
def test_attention_backends_without_cpu_kernels_are_refused_before_loading(tmp_path, backend, needle):
    cfg = make_config({"root": str(tmp_path / "never-read"), "model": "unused"}, tmp_path,
                      **{"speed.attention": backend, "device": "cpu"})
    with pytest.raises(UnsupportedSpeedOption, match=f"speed.attention={backend}: .*{needle}"):
        Trainer(cfg)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend cuda:0 has the given compute capability (the checks only ask torch.cuda for it)."""
    def set_capability(major, minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    return set_capability


def test_half_precision_sdpa_kernels_need_ampere_and_fp16_or_bf16(fake_gpu):
    fake_gpu(9, 0)
    check_speed_support(SpeedConfig(attention="flash", mixed_precision="bf16"), CUDA)
    check_speed_support(SpeedConfig(attention="cudnn"), CUDA, weight_dtype=torch.bfloat16)
    check_speed_support(SpeedConfig(attention="efficient"), CUDA)  # fp32 is fine for the efficient kernel
    with pytest.raises(UnsupportedSpeedOption, match="flash kernel takes fp16 / bf16 inputs only"):
        check_speed_support(SpeedConfig(attention="flash"), CUDA)
    fp32_module = nn.Linear(16, 16)
    with pytest.raises(UnsupportedSpeedOption, match="speed.attention=flash: .* fp16 / bf16 inputs only"):
        set_attention_backend(fp32_module, "flash", CUDA, mixed_precision="no")
    assert set_attention_backend(fp32_module, "flash", CUDA, mixed_precision="bf16") is not None
    fake_gpu(7, 5)
    with pytest.raises(UnsupportedSpeedOption, match=r"needs compute capability >= 8.0; this GPU is 7.5"):
        check_speed_support(SpeedConfig(attention="flash", mixed_precision="fp16"), CUDA)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_missing_xformers_on_a_gpu_says_how_to_install_it(fake_gpu):
    fake_gpu(9, 0)
    with pytest.raises(UnsupportedSpeedOption, match="optional dependency 'xformers' is not installed"):
        check_speed_support(SpeedConfig(attention="xformers"), CUDA)


# --------------------------------------------------------------------------- FP8


@needs_torchao
def test_fp8_swaps_linears_for_float8_and_trains(cached_dataset, tmp_path, fp32_first_step):
    from torchao.float8.float8_linear import Float8Linear

    trainer = make_trainer(cached_dataset, tmp_path, **{"speed.fp8": True, "speed.fp8_layers": "all"})
    unet = trainer.bundle.denoiser
    fp8 = {name for name, m in unet.named_modules() if isinstance(m, Float8Linear)}
    plain = [m for m in unet.modules() if type(m) is nn.Linear]
    assert len(fp8) == trainer.speedups["fp8_linears"] > 0
    assert all(m.in_features % 16 or m.out_features % 16 for m in plain)  # only the ineligible ones stay
    loss, grads = first_step(trainer)
    # e4m3 forward / e5m2 gradients keep 3 / 2 mantissa bits; measured: 8e-4 relative on the loss, 5.5e-2 on
    # the gradients
    torch.testing.assert_close(loss, fp32_first_step[0], rtol=1e-2, atol=0)
    assert_gradients_close(grads, fp32_first_step[1], rel_tol=0.2)
    before = trainable_snapshot(trainer)
    trainer.optimizer_step(trainer.batches())
    after = dict(unet.named_parameters())
    changed = {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], after[k].detach().float())}
    assert fp8 <= changed  # every FP8 layer's weight (or bias) was updated


@needs_torchao
def test_fp8_keeps_lora_factors_in_high_precision(cached_dataset, tmp_path):
    from torchao.float8.float8_linear import Float8Linear

    trainer = Trainer(make_config(cached_dataset, tmp_path, **{"speed.fp8": True, "speed.fp8_layers": "all"}))
    modules = dict(trainer.bundle.denoiser.named_modules())
    lora = {name: m for name, m in modules.items() if ".lora_A." in name or ".lora_B." in name}
    assert lora and not any(isinstance(m, Float8Linear) for m in lora.values())
    bases = {name for name in modules if name.endswith("to_q.base_layer")}
    assert bases and all(isinstance(modules[name], Float8Linear) for name in bases)
    metrics, _ = trainer.optimizer_step(trainer.batches())
    assert math.isfinite(metrics["loss"])


@needs_torchao
def test_fp8_auto_layers_skip_matmuls_too_small_to_gain(cached_dataset, tmp_path):
    """torchao's size heuristic (H100 timings) converts none of the tiny test model's 16-32 wide layers."""
    with pytest.warns(UserWarning, match="no Linear layer of UNet2DConditionModel passed the speed.fp8_layers=auto"):
        trainer = make_trainer(cached_dataset, tmp_path, **{"speed.fp8": True})
    assert trainer.speedups["fp8_linears"] == 0


@needs_torchao
def test_fp8_is_refused_below_compute_capability_8_9(fake_gpu):
    fake_gpu(8, 6)
    with pytest.raises(UnsupportedSpeedOption, match=r"speed.fp8: FP8 matmuls need compute capability >= 8.9 "
                                                     r"\(Ada/Hopper\); this GPU is 8.6"):
        check_speed_support(SpeedConfig(fp8=True, compile=True), CUDA)
    with pytest.raises(UnsupportedSpeedOption, match="this GPU is 8.6"):
        convert_linear_to_fp8(nn.Sequential(nn.Linear(16, 16)), CUDA)
    fake_gpu(9, 0)
    check_speed_support(SpeedConfig(fp8=True, compile=True), CUDA)
    with pytest.warns(UserWarning, match="only fused .* under torch.compile"):
        check_speed_support(SpeedConfig(fp8=True), CUDA)


# --------------------------------------------------------------------------- 8-bit AdamW


@needs_bitsandbytes
def test_adamw8bit_keeps_8bit_moments_and_trains(cached_dataset, tmp_path):
    import bitsandbytes as bnb

    trainer = make_trainer(cached_dataset, tmp_path, **{"speed.optimizer": "adamw8bit"})
    assert isinstance(trainer.optimizer, bnb.optim.AdamW8bit)
    before = trainable_snapshot(trainer)
    trainer.optimizer_step(trainer.batches())
    params = dict(trainer.bundle.denoiser.named_parameters())
    large = [k for k in before if params[k].numel() >= 4096]  # bitsandbytes' min_8bit_size
    assert large
    for key in large:
        state = trainer.optimizer.state[params[key]]
        assert state["state1"].dtype == state["state2"].dtype == torch.uint8, key
        assert not torch.equal(before[key], params[key].detach()), key
    small = next(k for k in before if params[k].numel() < 4096)
    assert trainer.optimizer.state[params[small]]["state1"].dtype == torch.float32


# --------------------------------------------------------------------------- fused loss


def test_fused_loss_off_equals_on(cached_dataset, tmp_path):
    from fastpref.ops.library import resolve_backend

    if resolve_backend("auto", CPU) == "reference":
        pytest.skip("no fused CPU loss built here (native ops missing): on and off would be the same code")
    results = {}
    for fused in (True, False):
        trainer = make_trainer(cached_dataset, tmp_path / str(fused), **{
            "objective.name": "rankdpo", "loss_backend": "auto", "speed.fused_loss": fused})
        assert trainer.step_fn.loss_backend == ("auto" if fused else "reference")
        # away from policy == reference: there every margin is beta (2500) x the difference of two equal errors,
        # i.e. float32 rounding that each backend's reduction order makes differently, and the loss and gradient
        # are cancellations of it (measured on an AMD EPYC: 0.69316 vs 0.69329, gradients 6% apart)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in trainer.bundle.denoiser.parameters():
                parameter.add_(1e-2 * parameter.abs().mean() * torch.randn(parameter.shape, generator=generator))
        results[fused] = first_step(trainer)
    # beta (2500) x float32 rounding of the per-sample errors (~1e-7 relative), which the fused and the reference
    # reductions sum in different orders, moves the margins by ~3e-4: the loss agrees to ~1e-4 relative, not better
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-3, atol=1e-6)
    assert_gradients_close(results[True][1], results[False][1], rel_tol=1e-3)


# --------------------------------------------------------------------------- missing packages


@pytest.mark.parametrize(
    "module, speed, needle",
    [
        ("bitsandbytes", {"optimizer": "adamw8bit"}, "speed.optimizer=adamw8bit"),
        ("torchao.float8", {"fp8": True, "compile": True}, r"speed.fp8 \(FP8 training\)"),
    ],
)
def test_a_missing_optional_package_names_the_extra(monkeypatch, module, speed, needle):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(UnsupportedSpeedOption, match=rf"'{module}' is not installed \(needed for {needle}\); "
                                                    r"install it with pip install 'fastpref\[quant\]'"):
        check_speed_support(SpeedConfig(**speed), CPU)


def test_adamw8bit_without_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"fastpref\[quant\]"):
        build_optimizer([nn.Parameter(torch.zeros(2))], "adamw8bit", lr=1e-3, weight_decay=0.0)


# --------------------------------------------------------------------------- compile


def test_regional_compile_traces_every_block_and_keeps_the_step(cached_dataset, tmp_path, fp32_first_step):
    """The trainer's compile path on the real CrossAttn blocks, captured by dynamo and run as FX graphs (the eager
    backend: no AOTAutograd, no code generation, so it stays fast; inductor and the backward graphs are the next
    test, and the GPU job compiles this whole model)."""
    torch._dynamo.reset()
    trainer = make_trainer(cached_dataset, tmp_path, **{"speed.compile": True, "speed.compile_backend": "eager"})
    unet = trainer.bundle.denoiser
    blocks = [*unet.down_blocks, *unet.up_blocks, unet.mid_block]
    assert trainer.speedups == {"compiled_blocks": len(blocks)}
    assert all(block._compiled_call_impl is not None for block in blocks)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    loss, grads = first_step(trainer)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= frames_before + len(blocks)  # all were traced
    torch.testing.assert_close(loss, fp32_first_step[0], rtol=1e-5, atol=0)
    assert_gradients_close(grads, fp32_first_step[1], rel_tol=1e-4)


@pytest.mark.slow
def test_inductor_regional_compile_matches_eager():
    """Inductor code for two small ResNet regions (~50 s cold on 2 cores, seconds with a warm
    TORCHINDUCTOR_CACHE_DIR): the compiled UNet's loss and gradients equal eager's to float rounding."""
    from diffusers import UNet2DConditionModel

    def build():
        torch.manual_seed(0)
        return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, down_block_types=("DownBlock2D",),
                                    up_block_types=("UpBlock2D",), mid_block_type=None, block_out_channels=(16,),
                                    layers_per_block=1, cross_attention_dim=16, norm_num_groups=8)

    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 5, 16, generator=generator)
    timesteps = torch.tensor([10, 700])

    def loss_and_grads(unet):
        loss = unet(latents, timesteps, encoder_hidden_states=context).sample.square().mean()
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in unet.named_parameters()}

    torch._dynamo.reset()
    eager = loss_and_grads(build())
    compiled_unet = build()
    assert compile_regions(compiled_unet) == 2
    compiled = loss_and_grads(compiled_unet)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=0)
    assert_gradients_close(compiled[1], eager[1], rel_tol=1e-5)


# --------------------------------------------------------------------------- combined


@needs_torchao
@needs_bitsandbytes
def test_fp8_adamw8bit_and_checkpointing_train_together(cached_dataset, tmp_path):
    from fastpref.train.metrics import read_metrics

    cfg = make_config(cached_dataset, tmp_path, max_steps=2, **{
        "mode": "full", "objective.name": "rankdpo", "speed.fp8": True, "speed.fp8_layers": "all",
        "speed.optimizer": "adamw8bit", "speed.gradient_checkpointing": True, "speed.channels_last": True,
        "speed.mixed_precision": "bf16", "speed.attention": "math"})
    summary = train(cfg)
    assert summary["speedups"]["fp8_linears"] > 0
    assert summary["speedups"]["gradient_checkpointing"] and summary["speedups"]["channels_last"]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    # the 8-bit optimizer state round-trips through the checkpoint
    resumed = Trainer(cfg)
    resumed.load_checkpoint(tmp_path / "checkpoints" / "step-000002")
    assert any(s["state1"].dtype == torch.uint8 for s in resumed.optimizer.state.values())


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn", "math"])
def test_sdpa_kernels_on_gpu_match_default_sdpa(cached_dataset, tmp_path, backend):
    base = first_step(make_trainer(cached_dataset, tmp_path / "sdpa", **{"speed.mixed_precision": "bf16"}))
    trainer = make_trainer(cached_dataset, tmp_path / backend, **{"speed.attention": backend,
                                                                  "speed.mixed_precision": "bf16"})
    loss, grads = first_step(trainer)
    torch.testing.assert_close(loss, base[0], rtol=2e-2, atol=0)
    assert_gradients_close(grads, base[1], rel_tol=0.1)


@pytest.mark.gpu
@needs_cuda
@needs_torchao
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs compute capability >= 8.9")
def test_fp8_with_compile_on_gpu_trains_close_to_bf16(cached_dataset, tmp_path):
    base = first_step(make_trainer(cached_dataset, tmp_path / "bf16", **{"speed.mixed_precision": "bf16"}))
    torch._dynamo.reset()
    trainer = make_trainer(cached_dataset, tmp_path / "fp8", **{
        "speed.mixed_precision": "bf16", "speed.fp8": True, "speed.fp8_layers": "all", "speed.compile": True})
    loss, grads = first_step(trainer)
    torch.testing.assert_close(loss, base[0], rtol=0.1, atol=0)
    assert_gradients_close(grads, base[1], rel_tol=0.5)


@pytest.mark.gpu
@needs_cuda
@needs_bitsandbytes
def test_fp16_autocast_and_adamw8bit_run_on_gpu(cached_dataset, tmp_path):
    trainer = make_trainer(cached_dataset, tmp_path, **{"speed.mixed_precision": "fp16",
                                                         "speed.optimizer": "adamw8bit"})
    metrics, _ = trainer.optimizer_step(trainer.batches())
    assert math.isfinite(metrics["loss"])
