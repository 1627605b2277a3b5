"""docs/results/record.py on a `fastpref run` report: the json (with a DRaFT run's trade-off section), the
markdown with its linked images copied beside it under the result's name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def record(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("record_results", ROOT / "docs" / "results" / "record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path / "results")
    (tmp_path / "results").mkdir()
    return module


def fake_run(run_dir: Path, images=("grid.png", "tradeoff.png")) -> Path:
    run_dir.mkdir()
    report = {"config": {"output_dir": str(run_dir)}, "seconds": {"eval": 1.0},
              "eval": {"base": {"overall": 0.5}}, "tradeoff": {"base": "base", "models": {}}}
    (run_dir / "report.json").write_text(json.dumps(report))
    links = "\n".join(f"![{image}]({image})" for image in images)
    (run_dir / "report.md").write_text(f"# fastpref run\n\n{links}\n")
    return run_dir


def test_a_run_report_is_recorded_with_its_markdown_images_and_tradeoff(record, tmp_path):
    run = fake_run(tmp_path / "toy-draftp")
    for image in ("grid.png", "tradeoff.png"):
        (run / image).write_bytes(image.encode())
    out = record.record(run, commit="abc123")
    saved = json.loads(out.read_text())
    assert out.name == "toy-draftp.json" and saved["commit"] == "abc123"
    assert saved["tradeoff"] == {"base": "base", "models": {}} and saved["recipe"] == "configs/toy-draftp.yaml"
    results = tmp_path / "results"
    markdown = (results / "toy-draftp.md").read_text()
    assert "](toy-draftp-grid.png)" in markdown and "](toy-draftp-tradeoff.png)" in markdown
    assert "](grid.png)" not in markdown
    assert (results / "toy-draftp-tradeoff.png").read_bytes() == b"tradeoff.png"
    assert not (results / "toy-draftp-training.png").exists()  # not linked, not copied


def test_a_linked_image_that_is_missing_is_named(record, tmp_path):
    run = fake_run(tmp_path / "toy-draftp", images=("tradeoff.png",))
    with pytest.raises(SystemExit, match="links tradeoff.png, which .* does not hold"):
        record.record(run, commit="abc123")


def fake_study(study_dir: Path) -> Path:
    study_dir.mkdir()
    (study_dir / "report.json").write_text(json.dumps({"variants": {"base": {}}, "claims": [], "seeds": [0]}))
    (study_dir / "report.md").write_text("# fastpref study\n\n![MiniGenEval per variant](scores.png)\n")
    (study_dir / "scores.png").write_bytes(b"png")
    return study_dir


def test_a_study_is_recorded_under_its_study_file_or_with_the_study_file_and_overrides_it_ran_with(record, tmp_path):
    saved = json.loads(record.record(fake_study(tmp_path / "study-oracle"), commit="abc").read_text())
    assert saved["study"] == "configs/studies/oracle.yaml" and "overrides" not in saved
    assert saved["command"] == "fastpref study configs/studies/oracle.yaml"
    assert "](oracle-scores.png)" in (tmp_path / "results" / "oracle.md").read_text()
    out = record.record(fake_study(tmp_path / "study-oracle-train"), commit="abc",
                        recipe="configs/studies/oracle.yaml", overrides=["overrides.eval.split=train"])
    saved = json.loads(out.read_text())
    assert out.name == "oracle-train.json" and saved["study"] == "configs/studies/oracle.yaml"
    assert saved["overrides"] == ["overrides.eval.split=train"]
    assert saved["command"] == "fastpref study configs/studies/oracle.yaml overrides.eval.split=train"


def test_a_record_of_another_command_is_not_replaced(record, tmp_path):
    """A study whose directory name matches an earlier record of another command (another study file, or the same
    one with overrides) would overwrite a result the README quotes: refused, naming both commands."""
    record.record(fake_study(tmp_path / "study-oracle-x"), commit="abc", recipe="configs/studies/oracle.yaml",
                  overrides=["eval.noise=per_prompt"])
    with pytest.raises(SystemExit, match=r"records `fastpref study configs/studies/oracle.yaml eval.noise=per_prompt`, "
                                         r"not `fastpref study configs/studies/oracle-x.yaml`"):
        record.record(fake_study(tmp_path / "study-oracle-x-again", ), name="oracle-x", commit="abc")
    again = record.record(tmp_path / "study-oracle-x", commit="def", recipe="configs/studies/oracle.yaml",
                          overrides=["eval.noise=per_prompt"])  # the same command re-records
    assert json.loads(again.read_text())["commit"] == "def"
    record.FORCE = True
    assert json.loads(record.record(tmp_path / "study-oracle-x-again", name="oracle-x").read_text())["command"] == (
        "fastpref study configs/studies/oracle-x.yaml")
