"""Lazy imports of optional dependencies, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# module name -> the setup.py extra that provides it
EXTRA_OF_MODULE = {
    "diffusers": "train",
    "transformers": "train",
    "peft": "train",
    "accelerate": "train",
    "safetensors": "train",
    "yaml": "train",
    "tqdm": "train",
    "nvidia.dali": "data",
    "deepspeed": "distributed",
    "torchao": "quant",
    "bitsandbytes": "quant",
    "ImageReward": "rewards",
    "triton": "triton",
    "matplotlib": "bench",
    "PIL": "train",
    "pyarrow": "data",
}


class MissingDependencyError(ImportError):
    pass


def require(module: str, purpose: str | None = None) -> ModuleType:
    """Import `module` or raise an ImportError that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRA_OF_MODULE.get(module, EXTRA_OF_MODULE.get(module.split(".")[0]))
        hint = f"pip install 'fastpref[{extra}]'" if extra else f"pip install {module}"
        what = f" (needed for {purpose})" if purpose else ""
        raise MissingDependencyError(
            f"fastpref: optional dependency '{module}' is not installed{what}; install it with {hint}"
        ) from err


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
