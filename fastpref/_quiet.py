"""The one place that silences known-harmless notices of other libraries.

diffusers and transformers import torchao and bitsandbytes whenever they are installed (their quantizer
integrations), whether or not a run uses them, and those packages log at import about kernels this machine
cannot or need not load (a CPU torch has no CUDA kernels for them; an offline hub has no kernel downloads).
fastpref's own use of them is lazy (fastpref/train/speed.py imports them only when the config turns FP8 or
8-bit AdamW on) and reports its own errors, so these lines say nothing the user can act on: each is dropped by
an exact logger name and message pattern below, and everything else from those loggers still prints.
FASTPREF_VERBOSE_IMPORTS=1 turns the filter off.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys

# (logger name, message pattern, why it is harmless)
KNOWN_NOTICES = (
    ("torchao", r"^Failed to load .*torchao/_C\w*\.\S+:",
     "torchao's optional compiled kernels built for another Python/CUDA; its pure-PyTorch paths still work"),
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile",
     "torchao registers its enums the pre-2.12 way at import"),
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community",
     "an optional hub kernel for 4-bit CPU matmuls, which fastpref never uses"),
    ("kernels._internals.hf_hub", r"^Skipping publisher trust check for 'kernels-community/",
     "the same optional hub kernel, looked up while the hub is offline"),
    ("diffusers.quantizers.torchao.torchao_quantizer", r"^Unable to import `torchao` Tensor objects",
     "only matters when loading a torchao-quantized checkpoint"),
    ("diffusers.models.modeling_utils", r"^There are modules in \w+ that should be kept in float32: \[\]\.",
     "the list is empty: no module of that model needs float32, so casting it with to() loses nothing"),
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back to `\w+Pil`",
     "the reward models' image processors have a PIL backend, which fastpref's inputs use"),
)
# Progress in a log file (stderr not a terminal): a line every this many seconds, not one per update.
LOG_PROGRESS_INTERVAL_S = 5


class _DropKnown(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_installed = False


def install(model_libraries: bool = True) -> None:
    """Attach the filters and quiet the model libraries' loading bars (idempotent); the CLI calls it first.

    model_libraries: also turn off diffusers' / transformers' per-component loading bars (sub-second bars
    that fill a log with dozens of lines per pipeline load); importing diffusers' logging costs a second,
    so commands that load no model (`fastpref env`) pass False.
    """
    global _installed
    if os.environ.get("FASTPREF_VERBOSE_IMPORTS", "") not in ("", "0"):
        return
    if not _installed:
        _installed = True
        for name, pattern, _why in KNOWN_NOTICES:
            # A filter on the logger itself: it sees exactly the records that logger emits.
            logging.getLogger(name).addFilter(_DropKnown(pattern))
        if not sys.stderr.isatty():
            # tqdm reads its defaults from TQDM_* (tqdm >= 4.66); fastpref's own bars follow it too.
            os.environ.setdefault("TQDM_MININTERVAL", str(LOG_PROGRESS_INTERVAL_S))
    if model_libraries:
        # Their own switches, not HF_HUB_DISABLE_PROGRESS_BARS: a real model's download keeps its progress bar.
        for library in ("diffusers", "transformers"):
            if importlib.util.find_spec(library) is not None:
                importlib.import_module(f"{library}.utils.logging").disable_progress_bar()
