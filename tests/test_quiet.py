"""fastpref/_quiet.py: known-harmless import notices of optional libraries are dropped, and nothing else."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import pytest

from fastpref import _quiet

SAMPLES = {
    "torchao": "Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load",
    "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                           "torch.compile as an opaque value type.",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: Version 1 ...",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
                                 "because Hugging Face Hub is in offline mode.",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects. This may affect",
    "diffusers.models.modeling_utils": "There are modules in AutoencoderKL that should be kept in float32: []. "
                                       "Casting directly with `to()` can lead to inconsistent results",
    "transformers.utils.import_utils": "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                                       "`CLIPImageProcessorPil` for backward compatibility.",
}


def test_each_known_notice_is_dropped_and_other_messages_of_its_logger_pass(monkeypatch):
    assert set(SAMPLES) == {name for name, _, _ in _quiet.KNOWN_NOTICES}
    monkeypatch.delenv("FASTPREF_VERBOSE_IMPORTS", raising=False)
    monkeypatch.setattr(_quiet, "_installed", False)
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append((record.name, record.getMessage()))

    handler = Collect()
    loggers = [logging.getLogger(name) for name in SAMPLES]
    saved = [list(logger.filters) for logger in loggers]
    try:
        _quiet.install(model_libraries=False)
        for logger in loggers:
            logger.addHandler(handler)
        for name, message in SAMPLES.items():
            logging.getLogger(name).warning(message)
            logging.getLogger(name).warning("something else went wrong: " + name)
        logging.getLogger("diffusers.models.modeling_utils").warning(
            "There are modules in UNet that should be kept in float32: ['conv_in']. Casting directly ...")
    finally:
        for logger, filters in zip(loggers, saved):
            logger.removeHandler(handler)
            logger.filters[:] = filters
    expected = [(name, "something else went wrong: " + name) for name in SAMPLES]
    assert seen[:-1] == expected and "['conv_in']" in seen[-1][1]  # a non-empty list is news: it prints


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")
def test_importing_the_model_libraries_is_quiet_after_install():
    code = ("import sys; from fastpref import _quiet\n"
            "if sys.argv[1] == 'quiet': _quiet.install()\n"
            "import diffusers, transformers; diffusers.UNet2DConditionModel; transformers.CLIPImageProcessor\n"
            "import os; print('TQDM_MININTERVAL=' + os.environ.get('TQDM_MININTERVAL', ''))")
    env = {k: v for k, v in os.environ.items() if k != "FASTPREF_VERBOSE_IMPORTS"}
    runs = {mode: subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env,
                                 timeout=300, stdin=subprocess.DEVNULL) for mode in ("loud", "quiet")}
    for run in runs.values():
        assert run.returncode == 0, run.stderr[-3000:]
    notices = ("Failed to load", "Enum subclass", "Unable to import `torchao`", "requires torchvision",
               "Skipping publisher trust")
    assert not [n for n in notices if n in runs["quiet"].stderr], runs["quiet"].stderr
    if importlib.util.find_spec("torchao") is not None:  # the filter had something to drop
        assert any(n in runs["loud"].stderr for n in notices), runs["loud"].stderr
    assert "TQDM_MININTERVAL=5" in runs["quiet"].stdout  # stderr is a pipe here, not a terminal
