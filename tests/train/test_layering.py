"""The training loop sits below the recipe layer: importing it pulls in neither the run pipeline nor the CLI."""

import dataclasses
import subprocess
import sys


def test_importing_the_loop_imports_neither_the_pipeline_nor_the_cli():
    probe = ("import sys, fastpref.train.loop; "
             "print(sorted(m for m in ('fastpref.pipeline', 'fastpref.cli', 'fastpref.study', 'fastpref.demo') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_recipe_keys_are_the_run_configs_fields():
    from fastpref.pipeline import RUN_KEYS, RunConfig

    assert RUN_KEYS == tuple(f.name for f in dataclasses.fields(RunConfig)) and "train" in RUN_KEYS


def test_fastpref_train_is_dispatched_to_the_recipe_layer():
    from fastpref.cli import SUBCOMMANDS

    assert SUBCOMMANDS["train"][:2] == ("fastpref.pipeline", "train_cli")
