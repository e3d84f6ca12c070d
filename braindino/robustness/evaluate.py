"""Heads fitted on clean training volumes, scored on perturbed test volumes: metric and drop from clean, with CIs.

For every encoder and seed the endpoint's folds (the manifest's split, or subject-grouped CV — the probe's
protocol code) get one head each, fitted on the clean training part with the probe's own head code. Each condition
(perturbation, severity) then predicts every fold's test samples from that condition's features; the folds'
predictions are pooled in sample order, so a condition and the clean run are scored on the same samples and the
subject bootstrap is paired. Values are means over seeds; CIs are percentile intervals of the seed-mean over
subject-bootstrap resamples. ``drop`` is the change for the worse: clean − perturbed for metrics where higher is
better, perturbed − clean otherwise (so a positive drop always means the perturbation hurt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from braindino.probe import metrics as M
from braindino.probe.evaluate import BOOTSTRAP_SEED, quiet_expected_warnings
from braindino.probe.fitting import fit_head, make_head, predict_set, select


@dataclass
class FittedHeads:
    """``heads[(encoder, seed)]`` = [(Fold, fitted head, training positions)]."""

    heads: dict = field(default_factory=dict)


def fit_heads(table, plan, clean_inputs: dict, seeds: list[int]) -> FittedHeads:
    """One head per (encoder, seed, fold), fitted on that fold's clean training samples (the 100 % setting)."""
    from threadpoolctl import threadpool_limits

    fitted = FittedHeads()
    setting = plan.settings[0]
    with threadpool_limits(limits=1), quiet_expected_warnings():
        for name, inputs in clean_inputs.items():
            for seed in seeds:
                fitted.heads[(name, seed)] = [
                    (fold, fit_head(table.spec.task, make_head(table.spec.task, table.spec, seed), inputs, table.y,
                                    train), train)
                    for fold, train in zip(plan.folds[seed], plan.subsets[(setting.name, seed)])]
    return fitted


def predict_positions(table, fitted: FittedHeads, name: str, seed: int, clean_inputs, inputs,
                      positions: np.ndarray) -> dict:
    """Prediction set over sample ``positions`` (ascending; every one a test sample of some fold), ``inputs``
    holding those samples' inputs in the same order; ``clean_inputs`` give survival's training risks."""
    task = table.spec.task
    n_classes = len(table.classes) if table.classes else None
    where = {int(p): i for i, p in enumerate(positions)}
    parts, order = [], []
    with quiet_expected_warnings():
        for fold, head, train in fitted.heads[(name, seed)]:
            test = np.array([p for p in fold.test if int(p) in where], dtype=int)
            if len(test) == 0:
                continue
            parts.append(predict_set(task, head, select(inputs, np.array([where[int(p)] for p in test])), table.y,
                                     test, n_classes, select(clean_inputs, train)))
            order.append(test)
    order = np.concatenate(order)
    sort = np.argsort(order, kind="stable")
    return {key: np.concatenate([part[key] for part in parts])[sort] for key in parts[0]}


def subset(pred: dict, index: np.ndarray) -> dict:
    return {key: value[index] for key, value in pred.items()}


def score_condition(task: str, metric: str, preds: list[dict], clean: list[dict], groups: np.ndarray,
                    n_bootstrap: int, confidence: float) -> dict:
    """``preds`` / ``clean``: one prediction set per seed over the same samples (``groups`` [n]: their subjects) →
    dict(value, low, high, clean, clean_low, clean_high, drop, drop_low, drop_high, p_value, n_samples)."""
    higher_is_better = metric not in M.LOWER_IS_BETTER
    draws = M.cluster_bootstrap_indices(groups, n_bootstrap, BOOTSTRAP_SEED)
    with quiet_expected_warnings():
        value, low, high = _seed_mean_with_ci(task, metric, preds, draws, confidence)
        clean_value, clean_low, clean_high = _seed_mean_with_ci(task, metric, clean, draws, confidence)
        diff, diff_low, diff_high, p_value = M.paired_bootstrap(task, metric, preds, clean, draws, confidence)
    sign = -1.0 if higher_is_better else 1.0
    drop_bounds = sorted([sign * diff_low, sign * diff_high])
    return {"value": value, "low": low, "high": high, "clean": clean_value, "clean_low": clean_low,
            "clean_high": clean_high, "drop": sign * diff, "drop_low": drop_bounds[0], "drop_high": drop_bounds[1],
            "p_value": p_value, "n_samples": int(len(groups))}


def _seed_mean_with_ci(task: str, metric: str, preds: list[dict], draws, confidence: float) -> tuple:
    """(mean over seeds of ``metric``, percentile CI of that mean over ``draws``)."""
    point = float(np.mean([M.compute_metrics(task, p, None, [metric])[metric] for p in preds]))
    samples = np.array([np.mean([M.compute_metrics(task, p, index, [metric])[metric] for p in preds])
                        for index in draws])
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return point, float("nan"), float("nan")
    low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
    return point, float(low), float(high)
