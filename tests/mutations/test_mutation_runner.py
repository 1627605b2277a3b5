"""The mutation runner on a throw-away package: a caught probe passes, a surviving one and a stale anchor fail
loudly and by name, and the probes run against the copy, never the source tree."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mutation_runner import check_anchors, copy_tree, probe, report, run_probes  # noqa: E402

MODULE = "def add(a, b):\n    return a + b\n\n\ndef unused(a):\n    return a * 2\n"
TESTS = "from toypkg.mod import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "repo"
    (root / "toypkg").mkdir(parents=True)
    (root / "toypkg/__init__.py").write_text("")
    (root / "toypkg/mod.py").write_text(MODULE)
    (root / "tests").mkdir()
    (root / "tests/test_mod.py").write_text(TESTS)
    (root / "pytest.ini").write_text("[pytest]\n")
    return root


def run(tree, probes):
    lines = []
    results = run_probes(probes, root=tree, jobs=2, package="toypkg", log=lines.append)
    return results, report(results, log=lines.append), "\n".join(lines)


@pytest.mark.slow  # starts a few pytest processes: ~30-50 s on the shared 2-core CPU
def test_a_caught_probe_passes_and_a_surviving_one_fails_by_name(tree):
    caught = probe("minus", "add subtracts", ["tests/test_mod.py::test_add"], ("toypkg/mod.py", "a + b", "a - b"))
    survivor = probe("untested", "unused doubles wrongly", ["tests/test_mod.py"], ("toypkg/mod.py", "a * 2", "a * 3"))
    results, code, log = run(tree, [caught, survivor])
    assert {r.probe.name: r.status for r in results} == {"minus": "caught", "untested": "survived"}
    assert code == 1
    assert "PROBE 'untested' SURVIVED" in log and "NOT caught: untested" in log
    assert (tree / "toypkg/mod.py").read_text() == MODULE  # the source tree is never patched
    _, code, _ = run(tree, [caught])
    assert code == 0


@pytest.mark.slow  # starts a few pytest processes: ~30-50 s on the shared 2-core CPU
def test_a_stale_anchor_fails_before_anything_runs_naming_the_probe(tree):
    moved = probe("moved", "anchor gone", ["tests/test_mod.py"], ("toypkg/mod.py", "return a+b", "return a-b"))
    twice = probe("twice", "ambiguous", ["tests/test_mod.py"], ("toypkg/mod.py", "return", "return -"))
    missing = probe("gone", "file gone", ["tests/test_mod.py"], ("toypkg/old.py", "x", "y"))
    assert [r.status for r in check_anchors([moved, twice, missing], tree)] == ["anchor"] * 3
    results, code, log = run(tree, [moved])
    assert code == 1 and [r.status for r in results] == ["anchor"]
    assert "PROBE 'moved' ANCHOR" in log and "old text not found in toypkg/mod.py" in log


@pytest.mark.slow  # starts a few pytest processes: ~30-50 s on the shared 2-core CPU
def test_a_probe_whose_tests_cannot_run_is_broken_not_caught(tree):
    wrong_id = probe("typo", "node id does not exist", ["tests/test_mod.py::test_nothing"],
                     ("toypkg/mod.py", "a + b", "a - b"))
    syntax = probe("syntax", "patch breaks the import", ["tests/test_mod.py"], ("toypkg/mod.py", "a + b", "a +"))
    fixture = probe("fixture", "only a fixture breaks", ["tests/test_fixture.py"], ("toypkg/mod.py", "a * 2", "a / 0"))
    (tree / "tests/test_fixture.py").write_text(
        "import pytest\nfrom toypkg.mod import unused\n\n\n@pytest.fixture\ndef two():\n    return unused(1)\n\n\n"
        "def test_two(two):\n    assert two == 2\n")
    results, code, _ = run(tree, [wrong_id, syntax, fixture])
    assert [r.status for r in results] == ["broken"] * 3 and code == 1


def test_the_repository_probes_are_at_least_12_with_unique_names_and_current_anchors():
    from mutation_probes import PROBES
    from mutation_runner import REPO

    assert len(PROBES) >= 12
    assert len({p.name for p in PROBES}) == len(PROBES)
    stale = check_anchors(PROBES, REPO)
    assert not stale, "\n".join(f"{r.probe.name}: {r.detail}" for r in stale)
    for p in PROBES:
        for node in p.tests:
            assert (REPO / node.split("::")[0]).is_file(), f"probe {p.name}: no test file {node}"


def test_a_copy_leaves_out_every_virtual_environment_whatever_its_name(tree, tmp_path):
    for venv in (".venv", ".venv-lpips", "side-env"):
        (tree / venv / "lib").mkdir(parents=True)
        (tree / venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
        (tree / venv / "lib/big.bin").write_bytes(b"0" * 1024)
    (tree / "toypkg/env").mkdir()  # a package folder that is not a venv stays
    (tree / "toypkg/env/__init__.py").write_text("")
    copy = copy_tree(tree, tmp_path / "copy")
    assert not any((copy / venv).exists() for venv in (".venv", ".venv-lpips", "side-env"))
    assert (copy / "toypkg/mod.py").read_text() == MODULE and (copy / "toypkg/env/__init__.py").is_file()
