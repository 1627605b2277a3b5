"""Mutation probes: apply each canonical deliberate bug to a temporary copy of the tree and run the tests that must
catch it; fail if any probe survives (its tests pass) or cannot be applied (its old text is gone: code moved).

    python -m tests.mutations              # every probe, 2 at a time
    python -m tests.mutations -k epoch -j 1 --keep
    python -m tests.mutations --list

The probes live in mutation_probes.py. Each copy is imported first (PYTHONPATH and the working directory are the
copy), so the copy's fastpref, with the copied C++ extension, is what the tests see, not the editable install; the
runner checks that before any probe runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# never copied: version control, environments, caches and outputs (the copy must not see other runs' state)
SKIP = (".git", ".venv*", ".cache", "runs", "outputs", "__pycache__", ".pytest_cache", "*.egg-info", "build")
# read-only data no probe edits: linked into each copy instead of copied (40 MB of shipped weights)
LINKED = ("fastpref/toy/weights",)


@dataclass(frozen=True)
class Edit:
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str


@dataclass(frozen=True)
class Probe:
    name: str
    bug: str  # what the deliberate bug is, in words
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest node ids (relative to the root) of which at least one must fail
    seconds: float = 30.0  # rough cost on a quiet 2-core CPU: the longest start first


def probe(name: str, bug: str, tests: list[str], *edits: tuple[str, str, str], seconds: float = 30.0) -> Probe:
    return Probe(name, bug, tuple(Edit(*e) for e in edits), tuple(tests), seconds)


@dataclass
class Result:
    probe: Probe
    status: str  # caught | survived | anchor | broken
    detail: str = ""
    seconds: float = 0.0
    output: str = field(default="", repr=False)


class AnchorError(RuntimeError):
    pass


def apply_edits(probe: Probe, root: Path) -> None:
    """Patch `root` in place; AnchorError naming the probe when an old text is missing or ambiguous."""
    for edit in probe.edits:
        path = root / edit.path
        if not path.is_file():
            raise AnchorError(f"probe {probe.name!r}: {edit.path} does not exist (moved? update "
                              f"tests/mutations/mutation_probes.py)")
        text = path.read_text()
        count = text.count(edit.old)
        if count != 1:
            where = "not found" if count == 0 else f"found {count} times (must be unique)"
            raise AnchorError(f"probe {probe.name!r}: its old text is {where} in {edit.path} (code moved? update "
                              f"tests/mutations/mutation_probes.py):\n{edit.old}")
        path.unlink()  # a fresh file, never written through a link to the source tree
        path.write_text(text.replace(edit.old, edit.new))


def check_anchors(probes: list[Probe], root: Path) -> list[Result]:
    """Every edit's old text, checked on the source tree before anything is copied."""
    bad = []
    for p in probes:
        for edit in p.edits:
            path = root / edit.path
            count = path.read_text().count(edit.old) if path.is_file() else -1
            if count != 1:
                where = {-1: f"{edit.path} does not exist", 0: f"old text not found in {edit.path}"}.get(
                    count, f"old text found {count} times in {edit.path}")
                bad.append(Result(p, "anchor", f"{where} (code moved? update tests/mutations/mutation_probes.py)"))
                break
    return bad


def copy_tree(root: Path, dst: Path) -> Path:
    linked = [Path(p) for p in LINKED if (root / p).is_dir()]

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = set(shutil.ignore_patterns(*SKIP)(directory, names))
        # any virtual environment, whatever its name: CI's .venv-lpips is 5.6 GB, two copies filled CI's disk
        skipped |= {n for n in names if (Path(directory) / n / "pyvenv.cfg").is_file()}
        rel = Path(directory).relative_to(root)
        return skipped | {n for n in names if rel / n in linked}

    shutil.copytree(root, dst, ignore=ignore, symlinks=True)
    for rel in linked:
        (dst / rel).symlink_to(root / rel, target_is_directory=True)
    return dst


def test_env(copy: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("PYTEST_ADDOPTS", None)
    return env


def check_imports_the_copy(root: Path, workdir: Path, package: str) -> None:
    """The copy's package (and its compiled extension, when the source tree has one) must be what imports."""
    copy = copy_tree(root, workdir / "import-check")
    code = f"import {package}, pathlib; print(pathlib.Path({package}.__file__).resolve())"
    native = list((root / package).glob("_C*.so")) if (root / package).is_dir() else []
    if native:
        code += f"; import {package}._C as c; print(pathlib.Path(c.__file__).resolve())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=copy, env=test_env(copy), capture_output=True,
                          text=True, timeout=300)
    paths = proc.stdout.split()
    if proc.returncode != 0 or not paths or not all(Path(p).is_relative_to(copy.resolve()) for p in paths):
        raise RuntimeError(f"a copy of the tree does not import its own {package} (got {paths or proc.stderr[-2000:]}):"
                           " the probes would test the editable install instead")
    shutil.rmtree(copy, ignore_errors=True)


def run_probe(p: Probe, root: Path, workdir: Path, timeout: float = 900.0) -> Result:
    start = time.perf_counter()
    copy = workdir / p.name
    try:
        copy_tree(root, copy)
        apply_edits(p, copy)
    except AnchorError as err:
        return Result(p, "anchor", str(err), time.perf_counter() - start)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rfE", *p.tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=test_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result(p, "broken", f"its tests ran past {timeout:.0f} s", time.perf_counter() - start)
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    seconds = time.perf_counter() - start
    if proc.returncode == 1:  # pytest: some tests failed or errored
        failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
        if failed:
            reason = next((line.strip() for line in proc.stdout.splitlines() if line.startswith("E ")), "")
            return Result(p, "caught", f"{failed[0]}  [{reason[:160]}]" if reason else failed[0], seconds, output)
        # only errors in fixtures / setup: as likely the environment as the bug, so never counted as a catch
        return Result(p, "broken", "no test failed, only setup errors (the environment? fix the probe or its tests)",
                      seconds, output)
    if proc.returncode == 0:
        return Result(p, "survived", "every listed test passed with the bug in place", seconds, output)
    # 2: interrupted / collection error, 3: internal error, 4: usage (e.g. unknown node id), 5: nothing collected
    return Result(p, "broken", f"pytest exit code {proc.returncode} (not a test failure: fix the probe)", seconds,
                  output)


def say(message: str) -> None:
    print(message, flush=True)  # CI logs: each probe's line as it finishes


def run_probes(probes: list[Probe], root: Path = REPO, jobs: int = 2, keep: bool = False,
               package: str = "fastpref", log=say) -> list[Result]:
    bad = check_anchors(probes, root)
    if bad:
        return bad  # loud and early: nothing is run while the list is stale
    workdir = Path(tempfile.mkdtemp(prefix="fastpref-mutations-"))
    try:
        check_imports_the_copy(root, workdir, package)
        results = []
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            ordered = sorted(probes, key=lambda p: -p.seconds)
            for result in pool.map(lambda p: run_probe(p, root, workdir), ordered):
                log(f"[mutations] {result.status:8s} {result.seconds:6.1f}s  {result.probe.name}: {result.detail}")
                if not keep:
                    shutil.rmtree(workdir / result.probe.name, ignore_errors=True)
                results.append(result)
        return results
    finally:
        if keep:
            log(f"[mutations] copies kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(results: list[Result], log=say) -> int:
    """0 when every probe was caught; else names each one that was not, with its tests' output."""
    failed = [r for r in results if r.status != "caught"]
    for r in failed:
        log(f"\n[mutations] PROBE {r.probe.name!r} {r.status.upper()}: {r.detail}\n  bug: {r.probe.bug}\n"
            f"  tests: {' '.join(r.probe.tests)}")
        if r.output:
            log(r.output)
    caught = len(results) - len(failed)
    log(f"[mutations] {caught}/{len(results)} probes caught" + ("" if not failed else
        f"; NOT caught: {', '.join(r.probe.name for r in failed)}"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mutation_probes import PROBES

    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="select", default="", help="only probes whose name contains this")
    parser.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("FASTPREF_MUTATION_JOBS", "2")))
    parser.add_argument("--keep", action="store_true", help="keep the patched copies")
    parser.add_argument("--list", action="store_true", help="list the probes and exit")
    parser.add_argument("--baseline", action="store_true",
                        help="first run every probe's tests on an unpatched copy: they must pass (CI runs the suite "
                             "before the probes, so it skips this)")
    args = parser.parse_args(argv)
    names = [p.name for p in PROBES]
    if len(set(names)) != len(names):
        raise SystemExit(f"duplicate probe names in mutation_probes.py: {sorted(n for n in names if names.count(n) > 1)}")
    probes = [p for p in PROBES if args.select in p.name]
    if args.list:
        for p in probes:
            print(f"{p.name}: {p.bug}\n    {' '.join(p.tests)}")
        return 0
    if not probes:
        raise SystemExit(f"no probe matches -k {args.select!r}")
    start = time.perf_counter()
    if args.baseline:
        tests = tuple(dict.fromkeys(t for p in probes for t in p.tests))
        unpatched = Probe("baseline (no patch)", "none", (), tests)
        with tempfile.TemporaryDirectory(prefix="fastpref-mutations-") as workdir:
            result = run_probe(unpatched, REPO, Path(workdir))
        if result.status != "survived":  # "survived" = every test passed
            say(result.output)
            raise SystemExit(f"[mutations] the probes' tests do not pass on the unpatched tree ({result.detail}): "
                             "a catch would prove nothing")
        say(f"[mutations] baseline: the probes' tests pass unpatched ({result.seconds:.0f} s)")
    code = report(run_probes(probes, jobs=args.jobs, keep=args.keep))
    print(f"[mutations] {time.perf_counter() - start:.0f} s with {args.jobs} jobs")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
