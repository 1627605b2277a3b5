"""Record a `fastpref run` report as a committed result that the README's numbers are checked against.

    fastpref run configs/toy-rankdpo.yaml                 # writes runs/toy-rankdpo/report.json
    python docs/results/record.py runs/toy-rankdpo        # -> docs/results/toy-rankdpo.{json,md} + its PNGs
    fastpref study configs/studies/rankdpo-ablations.yaml   # writes runs/study-rankdpo-ablations/report.json
    python docs/results/record.py runs/study-rankdpo-ablations   # -> docs/results/rankdpo-ablations.{json,md,png}

tests/test_readme_results.py fails when a number the README quotes differs from the recorded one, or when the
recipe's settings differ from the ones the recorded run used: change the recipe or the code that moves a number,
rerun, record, and update the README in the same commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def commit_of(repo: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def record_study(study_dir: Path, report: dict, name: str, commit: str | None, study: str | None = None,
                 overrides: list[str] | None = None) -> Path:
    """A `fastpref study` report: its json (+ command and commit), its markdown and its bar chart. study: the study
    file when it is not configs/studies/<name>.yaml, run with command-line overrides (e.g. another eval split)."""
    study = study or f"configs/studies/{name}.yaml"
    result = {"study": study, "command": " ".join(["fastpref", "study", study, *map(shlex.quote, overrides or [])]),
              **({"overrides": list(overrides)} if overrides else {}),
              "commit": commit or commit_of(HERE.parents[1]), "recorded": datetime.date.today().isoformat(),
              **report}
    out = refuse_to_replace_another(name, result["command"])
    out.write_text(json.dumps(result, indent=2) + "\n")
    markdown = (study_dir / "report.md").read_text().replace("](scores.png)", f"]({name}-scores.png)")
    (HERE / f"{name}.md").write_text(markdown)
    shutil.copyfile(study_dir / "scores.png", HERE / f"{name}-scores.png")
    return out


FORCE = False  # --force: replace a record made by another command


def refuse_to_replace_another(name: str, command: str) -> Path:
    """The record's path; refused when it holds a result of another command (a study recorded under the name of
    another one, say), which the README may quote: rerunning the same command re-records it."""
    out = HERE / f"{name}.json"
    if out.is_file() and not FORCE:
        before = json.loads(out.read_text()).get("command")
        if before != command:
            raise SystemExit(f"{out} records `{before}`, not `{command}`: choose another --name, or --force to "
                             "replace it")
    return out


def record(run_dir: Path, name: str | None = None, commit: str | None = None, recipe: str | None = None,
           overrides: list[str] | None = None) -> Path:
    report = json.loads((run_dir / "report.json").read_text())
    if "claims" in report and "variants" in report:
        return record_study(run_dir, report, name or run_dir.name.removeprefix("study-"), commit, recipe, overrides)
    if "eval" not in report:
        raise SystemExit(f"{run_dir / 'report.json'}: no 'eval' section (was the run's eval stage skipped?)")
    name = name or run_dir.name
    recipe = recipe or f"configs/{name}.yaml"
    result = {
        "recipe": recipe,
        "command": " ".join(["fastpref", "run", recipe, *map(shlex.quote, overrides or [])]),
        "overrides": list(overrides or []),
        "commit": commit or commit_of(HERE.parents[1]),
        "recorded": datetime.date.today().isoformat(),
        "config": report["config"],
        "seconds": report.get("seconds", {}),
        "eval": report["eval"],
    }
    if "tradeoff" in report:  # a DRaFT recipe's reward-diversity trade-off (fastpref.eval.tradeoff)
        result["tradeoff"] = report["tradeoff"]
    out = refuse_to_replace_another(name, result["command"])
    out.write_text(json.dumps(result, indent=2) + "\n")
    copy_markdown(run_dir, name)
    return out


# the images a `fastpref run` report links (report.md), recorded as <name>-<image>
RUN_IMAGES = ("grid.png", "training.png", "tradeoff.png")


def copy_markdown(run_dir: Path, name: str) -> Path | None:
    """The run's report.md as <name>.md, with the images it links copied beside it as <name>-<image>."""
    source = run_dir / "report.md"
    if not source.is_file():
        return None
    markdown = source.read_text()
    for image in RUN_IMAGES:
        if f"]({image})" in markdown:
            if not (run_dir / image).is_file():
                raise SystemExit(f"{source} links {image}, which {run_dir} does not hold")
            shutil.copyfile(run_dir / image, HERE / f"{name}-{image}")
            markdown = markdown.replace(f"]({image})", f"]({name}-{image})")
    out = HERE / f"{name}.md"
    out.write_text(markdown)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a `fastpref run` output_dir (holds report.json)")
    parser.add_argument("--name", help="result name (default: the run directory's name, e.g. toy-rankdpo)")
    parser.add_argument("--commit", help="the commit the run was made from (default: this checkout's HEAD)")
    parser.add_argument("--recipe", help="the recipe the run used, when it is not configs/<name>.yaml (a sweep); "
                                         "for a study, its study file when not configs/studies/<name>.yaml")
    parser.add_argument("--overrides", nargs="*", default=[], help="the run's command-line overrides, as given")
    parser.add_argument("--force", action="store_true", help="replace a record made by another command")
    args = parser.parse_args()
    global FORCE
    FORCE = args.force
    print(f"wrote {record(args.run_dir, args.name, args.commit, args.recipe, args.overrides)}")


if __name__ == "__main__":
    main()
