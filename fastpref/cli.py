"""The one `fastpref` command. Subcommands import their stage lazily, so `fastpref --help` is instant.

A mistake of the user's (a bad config value, a missing or corrupt file, a setting this machine refuses, a missing
extra) prints one line `fastpref: error: ...` and exits 2; `--debug` (anywhere on the line) or FASTPREF_DEBUG=1
shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, function, help). Each function takes the parsed argparse namespace.
SUBCOMMANDS = {
    "demo": ("fastpref.demo", "main", "run the main job on the embedded tiny default (the README's first command)"),
    "eval": ("fastpref.eval.minigeneval", "cli", "MiniGenEval of a pipeline on the held-out toy prompts"),
    "synth": ("fastpref.data.synth", "cli", "generate K images per prompt with several generator models"),
    "label": ("fastpref.data.label", "cli", "score images with a reward ensemble and rank them"),
    "cache": ("fastpref.data.cache", "cli", "cache VAE latents, text embeddings and reference errors"),
    "import": ("fastpref.data.importers", "cli", "import Pick-a-Pic parquet or a folder/JSONL dataset"),
    "train": ("fastpref.pipeline", "train_cli", "train with a preference objective from a YAML recipe"),
    "run": ("fastpref.pipeline", "cli", "synth -> label -> cache -> train -> eval from one recipe"),
    "study": ("fastpref.study", "cli", "a grid of run variants x training seeds, sharing identical stages"),
    "env": ("fastpref.env_report", "main", "print device, versions and optional components"),
    "spm": ("fastpref.rewards.spm_train", "cli", "train a step-aware preference model (SPO): spm train --config"),
}


# (module, class name): the errors a user makes and fixes without reading code; looked up in sys.modules, so that
# the check imports nothing (a class whose module the command never imported cannot have been raised)
USER_ERRORS = (("fastpref.config", "ConfigError"), ("fastpref.train.checkpoint", "CheckpointError"),
               ("fastpref.train.speed", "UnsupportedSpeedOption"), ("fastpref.data.shards", "ShardError"),
               ("fastpref.utils.imports", "MissingDependencyError"))


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return True
    classes = [getattr(sys.modules.get(module), name, None) for module, name in USER_ERRORS]
    return isinstance(err, tuple(c for c in classes if isinstance(c, type)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("FASTPREF_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    from fastpref import _quiet

    _quiet.install(model_libraries=bool(argv) and argv[0] not in ("env", "-h", "--help"))
    try:
        return _run(argv)
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the message's layout
        print(f"fastpref: error: {message}", file=sys.stderr)
        return 2


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastpref", description="Fast preference alignment for diffusion models",
                                     epilog="--debug (or FASTPREF_DEBUG=1): a traceback instead of a one-line error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        parser.error(f"unknown command {command!r}; choose from {', '.join(SUBCOMMANDS)}")
    module_name, function_name, _ = SUBCOMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("fastpref"):
            print(f"fastpref {command}: not available in this version ({err.name} is missing)", file=sys.stderr)
            return 2
        raise
    function = getattr(module, function_name)
    result = function() if command == "env" else function(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
