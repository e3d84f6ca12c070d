"""Write a probe run's files (``predictions.csv``, ``metrics.json``, ``attention/<endpoint>.csv``) and its console
lines.

Column layout of ``predictions.csv``: see :mod:`braindino.probe.results`.
"""

import json
import math

import numpy as np
import pandas as pd

from braindino.atomic import atomic_path, atomic_write_text
from braindino.probe.results import EndpointResult, ProbeResults

FIXED_COLUMNS = ["endpoint", "encoder", "setting", "kind", "amount", "seed", "subject", "sample", "split",
                 "y_true"]


def prediction_rows(table, cells: list[dict]) -> list[dict]:
    """One dict per (cell, test sample) of one endpoint (``cells`` from evaluate / segmentation)."""
    task, classes = table.spec.task, table.classes
    rows = []
    for cell in cells:
        pred, setting = cell["pred"], cell["setting"]
        for j, (position, split) in enumerate(zip(cell["positions"], cell["fold_names"])):
            row = {"endpoint": table.spec.name, "encoder": cell["encoder"], "setting": setting.name,
                   "kind": setting.kind, "amount": setting.amount, "seed": cell["seed"],
                   "subject": table.subjects[position], "sample": table.samples[position], "split": split}
            if task == "classification":
                row["y_true"] = classes[pred["y_true"][j]]
                row["y_pred"] = classes[int(np.argmax(pred["prob"][j]))]
                row.update({f"prob_{c}": float(p) for c, p in zip(classes, pred["prob"][j])})
            elif task == "regression":
                row.update(y_true=float(pred["y_true"][j]), y_pred=float(pred["y_pred"][j]))
            elif task == "survival":
                row.update(y_true=float(pred["time"][j]), time=float(pred["time"][j]),
                           event=int(pred["event"][j]), risk=float(pred["risk"][j]),
                           risk_group="high" if pred["high_risk"][j] else "low")
            else:
                row.update(y_true=str(table.y["mask"][position]), mask=cell["mask_files"][j])
                row.update({f"dice_{label}": float(d) for label, d in zip(pred["labels"], pred["dice"][j])})
            rows.append(row)
    return rows


def write_predictions(path, rows: list[dict]) -> None:
    """Atomically write predictions.csv (fixed columns first, then task columns in first-seen order)."""
    table = pd.DataFrame(rows)
    columns = FIXED_COLUMNS + [c for c in table.columns if c not in FIXED_COLUMNS]
    with atomic_path(path) as tmp:
        table.reindex(columns=columns).to_csv(tmp, index=False)


def write_attention(path, table, cell: dict, slices: list[tuple]) -> None:
    """Atomically write one MIL cell's attention: a row per (test sample, slice) with sample, subject, sequence, z,
    weight (a sample's weights sum to 1). ``slices[i]`` = (sequence [S_i], z [S_i]) of table sample ``i``'s bag."""
    frames = []
    for position, weights in zip(cell["positions"], cell["attention"]):
        sequence, z = slices[position]
        frames.append(pd.DataFrame({"sample": table.samples[position], "subject": table.subjects[position],
                                    "sequence": sequence, "z": np.asarray(z, dtype=int),
                                    "weight": np.asarray(weights, dtype=float)}))
    with atomic_path(path) as tmp:
        pd.concat(frames, ignore_index=True).to_csv(tmp, index=False)


def write_metrics(path, results: ProbeResults) -> None:
    """Atomically write metrics.json (NaN → null so the file is strict JSON)."""
    atomic_write_text(path, json.dumps(_finite(results.to_dict()), indent=2, sort_keys=False) + "\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def headline_lines(endpoint: EndpointResult, seeds: list[int]) -> list[str]:
    """One console line per encoder: the headline metric at the largest fraction, seed-mean ± std and the CI of
    the first seed; then the paired test vs each baseline."""
    fractions = [s for s in endpoint.scores if s.kind == "fraction"]
    if not fractions:
        return []
    amount = max(s.amount for s in fractions)
    setting = next(s.setting for s in fractions if s.amount == amount)
    metric = endpoint.headline
    lines = []
    for encoder in dict.fromkeys(s.encoder for s in endpoint.scores):
        agg = endpoint.aggregate(encoder, setting, metric)
        first = endpoint.score(encoder, setting, seeds[0]).metrics[metric]
        ci = f" [{_num(first.low)}, {_num(first.high)}]" if first.low is not None else ""
        lines.append(f"{endpoint.name} · {encoder} @ {setting}: {metric} {_num(agg.mean)} ± {_num(agg.std)} "
                     f"over {agg.n_seeds} seed(s); seed {seeds[0]}: {_num(first.value)}{ci}")
    for comparison in endpoint.comparisons:
        if comparison.setting == setting:
            holm = "" if comparison.p_holm is None else f", Holm {_num(comparison.p_holm)}"
            lines.append(f"{endpoint.name} · {comparison.model} − {comparison.baseline} @ {setting}: "
                         f"{metric} {_num(comparison.difference, signed=True)} [{_num(comparison.low)}, "
                         f"{_num(comparison.high)}], {comparison.method} p = {_num(comparison.p_value)}{holm}")
    return lines


def _num(value, signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"
