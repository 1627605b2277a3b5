"""FASTPREF_REQUIRE_NATIVE=1 (set by .ci/run): native ops that are off are an error, not a skip of every native test."""

import os
import subprocess
import sys

import pytest

PROBE = "from fastpref.ops import library; print(library.available_backends('cpu'))"


def run(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("FASTPREF_NO_NATIVE", "FASTPREF_REQUIRE_NATIVE")}
    return subprocess.run([sys.executable, "-c", PROBE], env={**full, **env}, capture_output=True, text=True,
                          timeout=300)


def test_off_without_the_flag_falls_back():
    proc = run(FASTPREF_NO_NATIVE="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "native" not in proc.stdout and "reference" in proc.stdout


def test_off_with_the_flag_is_an_error_that_says_why():
    # FASTPREF_NO_NATIVE stands in for a failed build: both leave load_native_library() with a reason
    proc = run(FASTPREF_NO_NATIVE="1", FASTPREF_REQUIRE_NATIVE="1")
    assert proc.returncode != 0
    assert "FASTPREF_REQUIRE_NATIVE is set but the native C++ ops are off" in proc.stderr
    assert "FASTPREF_NO_NATIVE" in proc.stderr  # the reason


def test_the_flag_is_silent_when_the_ops_load():
    from fastpref.ops import native

    if native.load_native_library():
        pytest.skip(f"native ops unavailable here: {native.load_native_library()}")
    proc = run(FASTPREF_REQUIRE_NATIVE="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "native" in proc.stdout
