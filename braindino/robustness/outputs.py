"""What a robustness run writes: ``robustness.csv`` (the table), ``robustness.md``, ``metrics.json``, one curve
``figures/robustness_<perturbation>.png`` per perturbation, ``errors.csv``; and the console line per encoder.

Table columns (``TABLE_COLUMNS``): encoder, perturbation, parameter, severity, metric, value, low, high (the
metric on the perturbed test volumes, mean over seeds, CI), clean, clean_low, clean_high (the same samples
unperturbed), drop, drop_low, drop_high (the change for the worse, see :mod:`.evaluate`), p_value (paired subject
bootstrap of perturbed vs clean), n_samples.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from braindino.atomic import atomic_path, atomic_write_json, atomic_write_text
from braindino.probe.formatting import format_p, interval, number, signed
from braindino.robustness.perturbations import PERTURBATIONS

TABLE_COLUMNS = ["encoder", "perturbation", "parameter", "severity", "metric", "value", "low", "high", "clean",
                 "clean_low", "clean_high", "drop", "drop_low", "drop_high", "p_value", "n_samples"]
ERROR_COLUMNS = ["path", "perturbation", "severity", "cause", "hint"]
FIGURE_DPI = 110


def write_table(path, rows: list[dict]) -> Path:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=TABLE_COLUMNS).to_csv(tmp, index=False)
    return Path(path)


def write_errors(path, errors: list[dict]) -> Path:
    with atomic_path(path) as tmp:
        pd.DataFrame(errors, columns=ERROR_COLUMNS).to_csv(tmp, index=False)
    return Path(path)


def write_markdown(path, rows: list[dict], header: dict, curves: dict[str, Path]) -> Path:
    """One table per perturbation: severity × encoder → metric [CI] and drop [CI]."""
    lines = [f"# Robustness: {header['endpoint']} ({header['task']})", "",
             f"Heads ({header['head']}, {header['pooling']} pooling) fitted on clean training volumes "
             f"({header['protocol']}), scored on perturbed test volumes; {header['metric']} (mean over seeds "
             f"{', '.join(map(str, header['seeds']))}, {header['confidence']:.0%} subject-bootstrap CIs, "
             f"{header['n_bootstrap']} resamples). Drop > 0: worse than clean.", ""]
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    for perturbation, part in table.groupby("perturbation", sort=False):
        spec = PERTURBATIONS[perturbation]
        lines += [f"## {perturbation}: {spec.description}", "",
                  f"| {spec.parameter} | encoder | {header['metric']} | CI | drop | CI | p |",
                  "|---:|---|---:|---|---:|---|---:|"]
        for _, row in part.iterrows():
            lines.append(f"| {row['severity']:g} | {row['encoder']} | {number(row['value'])} | "
                         f"{interval(row['low'], row['high'])} | {signed(row['drop'])} | "
                         f"{interval(row['drop_low'], row['drop_high'], with_sign=True)} | {format_p(row['p_value'])} |")
        lines.append("")
        if perturbation in curves:
            lines += [f"![{perturbation}]({Path(curves[perturbation]).relative_to(Path(path).parent)})", ""]
    atomic_write_text(path, "\n".join(lines))
    return Path(path)


def curve_figure(path, rows: list[dict], perturbation: str, metric: str) -> Path:
    """Metric vs severity for every encoder (CI band), the clean (identity) severity marked."""
    spec = PERTURBATIONS[perturbation]
    part = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    part = part[part["perturbation"] == perturbation]
    figure = Figure(figsize=(6.0, 4.0))
    ax = figure.add_subplot()
    encoders = list(dict.fromkeys(part["encoder"]))
    for order, encoder in enumerate(encoders):
        line = part[part["encoder"] == encoder].sort_values("severity")
        x = line["severity"].to_numpy(float)
        drawn = ax.plot(x, line["value"].to_numpy(float), marker="o", label=encoder,
                        zorder=3 + len(encoders) - order)[0]
        ax.fill_between(x, line["low"].to_numpy(float), line["high"].to_numpy(float), color=drawn.get_color(),
                        alpha=0.15)
    ax.axvline(spec.identity, color="grey", linestyle="--", linewidth=1, label="clean")
    ax.set_xlabel(f"{perturbation}: {spec.parameter}")
    ax.set_ylabel(f"{metric} (95% CI)")
    ax.set_title(f"Robustness to {perturbation.replace('_', ' ')}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=FIGURE_DPI)
    return Path(path)


def worst_drops(rows: list[dict]) -> dict[str, dict]:
    """{encoder: the row with its largest finite drop} (first such row on ties)."""
    worst = {}
    for row in rows:
        drop = row["drop"]
        if drop is None or not np.isfinite(drop):
            continue
        current = worst.get(row["encoder"])
        if current is None or drop > current["drop"]:
            worst[row["encoder"]] = row
    return worst


def console_line(encoder: str, row: dict | None, metric: str) -> str:
    if row is None:
        return f"robustness: {encoder}: no finite {metric} under any perturbation"
    return (f"robustness: {encoder}: clean {metric} {number(row['clean'])} "
            f"{interval(row['clean_low'], row['clean_high'])}; worst drop {signed(row['drop'])} "
            f"{interval(row['drop_low'], row['drop_high'], with_sign=True)} at {row['perturbation']} "
            f"{row['parameter']}={row['severity']:g} ({metric} {number(row['value'])})")


def write_metrics_json(path, header: dict, rows: list[dict], errors: list[dict]) -> Path:
    """``metrics.json``: the run's settings (``header``), ``results`` (the table rows), ``worst`` per encoder,
    ``errors``; NaN written as null."""
    def plain(value):
        if isinstance(value, (float, np.floating)):
            return float(value) if math.isfinite(value) else None
        if isinstance(value, np.integer):
            return int(value)
        return value
    results = [{key: plain(value) for key, value in row.items()} for row in rows]
    worst = {encoder: {key: plain(value) for key, value in row.items()} for encoder, row in worst_drops(rows).items()}
    atomic_write_json(path, {**header, "results": results, "worst": worst,
                             "errors": [{key: plain(value) for key, value in e.items()} for e in errors]})
    return Path(path)
