"""`fastpref` on a user's mistake: one line `fastpref: error: ...`, exit status 2; the traceback only on request."""

import subprocess
import sys

import pytest

from fastpref.cli import main


def fastpref(*args, env=None):
    import os

    env = {**{k: v for k, v in os.environ.items() if k != "FASTPREF_DEBUG"}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastpref.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_missing_config_prints_one_line_and_exits_2(tmp_path):
    missing = tmp_path / "missing.yaml"
    proc = fastpref("train", "--config", str(missing))
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == f"fastpref: error: {missing}: cannot read config (No such file or directory)"
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("how", ["--debug", "FASTPREF_DEBUG=1"])
def test_debug_shows_the_traceback(tmp_path, how):
    missing = tmp_path / "missing.yaml"
    args, env = (["--debug"], None) if how == "--debug" else ([], {"FASTPREF_DEBUG": "1"})
    proc = fastpref("train", "--config", str(missing), *args, env=env)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_a_bad_key_names_the_file_and_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FASTPREF_DEBUG", raising=False)
    config = tmp_path / "recipe.yaml"
    config.write_text("data: {root: /nowhere}\nobjective: {name: rankdp}\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastpref: error: {config}: objective.name: 'rankdp' is not one of") and err.count("\n") == 1


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only the user's mistakes are shortened: an error of fastpref's own is raised as it is."""
    import fastpref.pipeline as pipeline

    monkeypatch.delenv("FASTPREF_DEBUG", raising=False)

    def broken(argv):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline, "train_cli", broken)
    with pytest.raises(ZeroDivisionError):
        main(["train", "--config", "x.yaml"])
