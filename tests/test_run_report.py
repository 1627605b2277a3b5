"""fastpref run's report: per-seed scores and the gain over the base against its seed-to-seed spread."""

import json

import numpy as np
import pytest

from fastpref.pipeline import improvement_lines, write_report


def _result(overall, seeds):
    return {"overall": overall, "per_category": {"colors": overall}, "num_images": 8, "seed_scores": seeds,
            "seed_spread": float(np.std(seeds, ddof=1))}


def test_gain_is_compared_with_the_base_seed_spread(tmp_path):
    results = {"base": _result(0.50, [0.45, 0.55]), "rankdpo": _result(0.60, [0.58, 0.62]),
               "dpo": _result(0.52, [0.50, 0.54]), "sft": _result(0.40, [0.38, 0.42])}
    lines = improvement_lines(results)
    assert lines[0].startswith("Seed-to-seed spread of the base: 7.1 points")
    assert "- rankdpo: +10.0 points over the base (better than the base by more than the seed spread)" in lines
    assert "- dpo: +2.0 points over the base (within the seed spread)" in lines
    assert "- sft: -10.0 points over the base (worse than the base by more than the seed spread)" in lines
    write_report(tmp_path, {"eval": results, "seconds": {"train": 1.0}})
    text = (tmp_path / "report.md").read_text()
    assert "| rankdpo | **60.0** | 58.0, 62.0 | 60.0 |" in text and "better than the base by more" in text
    assert json.loads((tmp_path / "report.json").read_text())["eval"]["base"]["seed_scores"] == [0.45, 0.55]


def test_no_base_or_no_seed_scores_gives_no_verdict():
    assert improvement_lines({"rankdpo": _result(0.6, [0.6])}) == []
    assert improvement_lines({"base": {"overall": 0.5, "per_category": {}}}) == []


def test_training_curves_plot_every_run_and_the_report_links_them(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs the 'bench' extra (matplotlib)")
    from PIL import Image

    from fastpref.train.metrics import plot_training_curves

    runs = {}
    for name, slope in (("rankdpo", 0.01), ("dpo", 0.02)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "loss": 0.69 - slope * s, "implicit_accuracy": 0.5 + slope * s, "margin": slope * s}
                for s in range(1, 11)]
        rows[4]["loss"] = float("nan")  # a skipped step is a gap, not an error
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        runs[name] = run
    path = plot_training_curves(runs, tmp_path / "training.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 2 * image.height  # three panels side by side
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels.std(axis=(0, 1)) > 10).all()  # drawn, not blank
    write_report(tmp_path, {"seconds": {"train": 1.0}})
    assert "![training curves: loss, implicit accuracy, margin](training.png)" in (tmp_path / "report.md").read_text()
