"""bench/step.py's report: ratios to the baseline and to the full configuration, the CSV (with device and
versions), the Markdown table with its notes and GPU-days, and the plot."""

from __future__ import annotations

import os
from pathlib import Path

import gpu_days
from common import write_csv
from step_runners import PHASES


def add_ratios(rows: list[dict]) -> None:
    """fastpref / baseline at the same images per step: pairs/s for DPO; images/s for RankDPO (no public baseline)."""
    baselines = {(r["arch"], r["mode"]): r for r in rows if r["system"] == "baseline" and r["status"] == "ok"}
    headline_fastpref = {(r["arch"], r["objective"], r["mode"]): r for r in rows
                         if r["section"] == "headline" and r["system"] == "fastpref" and r["status"] == "ok"}
    for row in rows:
        row["vs_baseline"] = ""
        row["vs_fastpref"] = ""
        base = baselines.get((row["arch"], row["mode"]))
        if row["status"] == "ok" and base is not None and row["system"] == "fastpref":
            row["vs_baseline"] = round(row["images_per_s"] / base["images_per_s"], 3)
        ref = headline_fastpref.get((row["arch"], row["objective"], row["mode"]))
        if row["status"] == "ok" and ref is not None and row["section"] == "ablation":
            row["vs_fastpref"] = round(row["images_per_s"] / ref["images_per_s"], 3)


def fmt(value, digits=3):
    if value in ("", None):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown(rows, env, settings, arch_notes, speed_note, estimates) -> str:
    lines = [f"# fastpref step benchmark ({settings.tag})", ""]
    lines.append(f"- device: {env['device']}; torch {env['torch']}, diffusers {env.get('diffusers', '?')}, "
                 f"transformers {env.get('transformers', '?')}, peft {env.get('peft', '?')}")
    lines.append(f"- peak used for MFU/HFU: {settings.peak_source}")
    if hasattr(os, "getloadavg"):
        # on a shared machine the load says how far the absolute times can be trusted (ratios: side by side)
        lines.append("- machine load when written (1 / 5 / 15-min averages): "
                     + " / ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores")
    lines.append(f"- timing: {settings.warmup} warm-up, median of {settings.steps} steps; phases from "
                 f"{settings.phase_steps} further steps with a device sync at each phase edge")
    lines.extend(f"- {note}" for note in arch_notes + [speed_note])
    lines.append("")
    header = ("| arch | section | variant | objective | mode | img/step | step ms | pairs/s | img/s | data | encode "
              "| reference | policy f+b | optimizer | comm | peak GiB | MFU | HFU | x baseline | x fastpref | status |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        phases = [fmt(r.get(f"{p}_ms")) for p in PHASES]
        lines.append("| " + " | ".join([
            r["shape"], r["section"], r["variant"], r["objective"], r["mode"], str(r["images_per_step"]),
            fmt(r.get("step_ms")), fmt(r.get("pairs_per_s")), fmt(r.get("images_per_s")), *phases,
            fmt(r.get("peak_mem_GiB")), fmt(r.get("MFU"), 2), fmt(r.get("HFU"), 2), fmt(r.get("vs_baseline")),
            fmt(r.get("vs_fastpref")), r["status"]]) + " |")
    lines.append("")
    lines.append("Phases are milliseconds per step. 'x baseline': fastpref images/s over the public Diffusion-DPO "
                 "step's at the same images per step (pairs/s ratio for DPO). 'x fastpref': an ablation row's "
                 "images/s over the full fastpref configuration.")
    if estimates:
        lines += ["", "## GPU-days of the published SDXL recipes at the measured speed", "",
                  gpu_days.markdown(estimates)]
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, title: str) -> None:
    from fastpref.utils.imports import require

    matplotlib = require("matplotlib", "the benchmark plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["status"] == "ok"]
    if not measured:
        return
    labels = [f"{r['arch']} {r['objective']}/{r['mode']}\n{r['variant']}" for r in measured]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.45 * len(measured) + 2), sharey=True)
    y = range(len(measured))
    colors = ["tab:orange" if r["system"] == "baseline" else ("tab:blue" if r["section"] == "headline" else "tab:gray")
              for r in measured]
    ax1.barh(list(y), [r["images_per_s"] for r in measured], color=colors)
    ax1.set_xlabel("images / s (higher is better)")
    ax1.set_yticks(list(y), labels, fontsize=7)
    ax1.invert_yaxis()
    left = [0.0] * len(measured)
    for phase in PHASES:
        values = [r[f"{phase}_ms"] for r in measured]
        ax2.barh(list(y), values, left=left, label=phase)
        left = [a + b for a, b in zip(left, values)]
    ax2.set_xlabel("ms per step, by phase")
    ax2.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows, env, settings, arch_notes, speed_note, estimates) -> dict[str, Path]:
    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"step-{settings.tag}.csv", "md": out / f"step-{settings.tag}.md",
             "png": out / f"step-{settings.tag}.png"}
    write_csv(paths["csv"], [{**row, "peak_source": settings.peak_source, "speed_config": row.get("speed_config", "")}
                             for row in rows], env)
    paths["md"].write_text(markdown(rows, env, settings, arch_notes, speed_note, estimates))
    plot(rows, paths["png"], f"fastpref step vs public Diffusion-DPO step — {env['device']}")
    return paths


def print_table(rows) -> None:
    header = (f"{'arch':24} {'variant':36} {'obj/mode':13} {'img':>4} {'step ms':>9} {'img/s':>8} {'MFU':>7} "
              f"{'x base':>7} {'x fp':>6}  status")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['shape'][:24]:24} {r['variant'][:36]:36} {r['objective'] + '/' + r['mode']:13} "
              f"{r['images_per_step']:>4} {fmt(r.get('step_ms')):>9} {fmt(r.get('images_per_s')):>8} "
              f"{fmt(r.get('MFU'), 2):>7} {fmt(r.get('vs_baseline')):>7} {fmt(r.get('vs_fastpref')):>6}  "
              f"{r['status'] if r['status'] != 'ok' else ''}")
