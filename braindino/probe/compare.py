"""Seed aggregates with their intervals, model-vs-baseline tests and Holm's multiplicity adjustment.

Under CV the test of model vs a baseline is Nadeau & Bengio's corrected resampled t over the seeds × folds per-fold
differences of the headline metric (``stats.corrected_resampled_t``): each fold's heads are refitted, so the test
sees the training variability that a bootstrap of one pooled prediction vector does not (that bootstrap said
"significant" for 21 % of cohorts with two equally good encoders). Under a fixed split there is one fit per seed;
the paired subject bootstrap there is conditional on the fitted heads, and the results say so.
"""

import numpy as np
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from braindino.probe import metrics as M
from braindino.probe.results import Aggregate, Comparison, EndpointResult
from braindino.probe.stats import corrected_resampled_t, holm

INTERVALS = {
    "cv": {"scores": "95 % percentile bootstrap over test subjects of one seed's pooled CV predictions: conditional "
                     "on that seed's fitted heads (other test subjects, not other training subjects)",
           "aggregates": "95 % corrected resampled t interval (Nadeau–Bengio) of the seed mean over the seeds × "
                         "folds values: accounts for refitting the heads on other training subjects",
           "comparisons": "corrected resampled t (Nadeau–Bengio) over the seeds × folds differences, two-sided; "
                          "verdicts use Holm-adjusted p-values"},
    "split": {"scores": "95 % percentile bootstrap over the test subjects: conditional on this seed's fitted heads",
              "aggregates": "95 % subject bootstrap of the seed mean: conditional on the fitted heads (a fixed "
                            "split has one training set; other training subjects could move it further)",
              "comparisons": "paired subject bootstrap over the test subjects, two-sided: conditional on the fitted "
                             "heads (it asks whether these heads differ on new subjects, not whether the encoders "
                             "would with other training subjects); verdicts use Holm-adjusted p-values"},
}


def judged_p(comparison: Comparison, over_run: bool = False) -> float | None:
    """The p-value a verdict is judged on: Holm-adjusted over the run's headline comparisons (``over_run``, where
    the comparison has one), else over the endpoint's comparisons, else unadjusted; None when undefined."""
    candidates = (comparison.p_holm_run, comparison.p_holm, comparison.p_value) if over_run else \
        (comparison.p_holm, comparison.p_value)
    p = next((v for v in candidates if v is not None), None)
    return p if p is not None and np.isfinite(p) else None


def verdict(comparison: Comparison, higher_is_better: bool, alpha: float, over_run: bool = False) -> str:
    """"better" / "worse" (the model vs the comparison's baseline, significant at ``alpha`` on
    :func:`judged_p`), "no significant difference", or "not testable" (p or the difference undefined)."""
    p = judged_p(comparison, over_run)
    if p is None or comparison.difference is None or not np.isfinite(comparison.difference):
        return "not testable"
    gain = comparison.difference if higher_is_better else -comparison.difference
    if p < alpha and gain != 0:
        return "better" if gain > 0 else "worse"
    return "no significant difference"


def fold_values(task: str, pred: dict, fold_names: np.ndarray, names) -> dict[str, list[float]]:
    """{metric: [K]} each metric on each fold's test samples (folds in name order; one entry for a split)."""
    out = {name: [] for name in names}
    for fold in sorted(set(fold_names.tolist())):
        index = np.flatnonzero(fold_names == fold)
        values = M.compute_metrics(task, {k: v for k, v in pred.items() if k != "fold"}, index, list(names))
        for name in names:
            out[name].append(values[name])
    return out


def held_out_ratio(folds, subsets, subjects: np.ndarray) -> float:
    """Mean over folds of (test subjects / training subjects used), the Nadeau–Bengio correction's n2/n1."""
    return float(np.mean([len(set(subjects[f.test].tolist())) / max(1, len(set(subjects[s].tolist())))
                          for f, s in zip(folds, subsets)]))


def aggregate(result: EndpointResult, encoder_names: list[str], seeds: list[int], by_cell: dict | None = None,
              draws=None, confidence: float = 0.95) -> list[Aggregate]:
    """Mean ± std (ddof 0) over seeds of every metric, per encoder and setting (NaN seeds left out), with the
    interval of the seed mean: CV → corrected resampled t over the seeds × folds values; split → bootstrap
    ``draws`` of the seed mean of ``by_cell`` predictions. p-value metrics get no mean (they are not averaged)."""
    items = []
    for encoder in encoder_names:
        for setting in result.settings:
            scores = [result.score(encoder, setting, seed) for seed in seeds]
            for metric in result.metrics:
                values = np.array([s.metrics[metric].value for s in scores], dtype=float)
                values = values[np.isfinite(values)]
                if metric in M.NOT_BOOTSTRAPPED or not len(values):
                    items.append(Aggregate(encoder, setting, metric, float("nan"), float("nan"), int(len(values))))
                    continue
                low = high = None
                if result.protocol == "cv" and scores[0].fold_metrics:
                    per_fold = np.concatenate([s.fold_metrics[metric] for s in scores])
                    ratio = float(np.mean([s.test_train_ratio for s in scores]))
                    _, low, high, _, _ = corrected_resampled_t(per_fold, ratio, confidence)
                elif by_cell is not None and draws is not None:
                    low, high = _seed_mean_interval(result.task, metric, [by_cell[(encoder, setting, s)]
                                                                          for s in seeds], draws, confidence)
                items.append(Aggregate(encoder, setting, metric, float(values.mean()), float(values.std()),
                                       int(len(values)), _finite_or_none(low), _finite_or_none(high)))
    return items


def _seed_mean_interval(task, metric, preds, draws, confidence):
    samples = np.array([np.mean([M.compute_metrics(task, p, index, [metric])[metric] for p in preds])
                        for index in draws])
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return None, None
    low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def _finite_or_none(value):
    return None if value is None or not np.isfinite(value) else float(value)


def compare(task: str, result: EndpointResult, encoders: list[dict], seeds: list[int], by_cell: dict,
            groups: np.ndarray, n_bootstrap: int, confidence: float, workers: int,
            bootstrap_seed: int) -> list[Comparison]:
    """The model (``encoders[0]``) vs each baseline, per setting, on the headline metric; p-values Holm-adjusted
    over the endpoint's comparisons (``p_holm``). CV: corrected resampled t over the scores' per-fold values;
    split: paired subject bootstrap of ``by_cell`` predictions (``groups`` [m]: the subject of each sample)."""
    model = encoders[0]["name"]
    metric = result.headline
    pairs = [(setting, baseline["name"]) for setting in result.settings for baseline in encoders[1:]]
    n_subjects = len(set(groups.tolist()))

    def corrected(setting, baseline):
        model_scores = [result.score(model, setting, seed) for seed in seeds]
        base_scores = [result.score(baseline, setting, seed) for seed in seeds]
        differences = np.concatenate([np.subtract(m.fold_metrics[metric], b.fold_metrics[metric])
                                      for m, b in zip(model_scores, base_scores)])
        ratio = float(np.mean([s.test_train_ratio for s in model_scores]))
        diff, low, high, p, n_folds = corrected_resampled_t(differences, ratio, confidence)
        return Comparison(metric, setting, model, baseline, diff, low, high, p, n_subjects, 0,
                          method="corrected resampled t", n_folds=n_folds)

    def bootstrap(setting, baseline):
        with threadpool_limits(limits=1):
            draws = M.cluster_bootstrap_indices(groups, n_bootstrap, bootstrap_seed)
            diff, low, high, p = M.paired_bootstrap(task, metric, [by_cell[(model, setting, s)] for s in seeds],
                                                    [by_cell[(baseline, setting, s)] for s in seeds], draws,
                                                    confidence)
        return Comparison(metric, setting, model, baseline, diff, low, high, p, n_subjects, n_bootstrap,
                          method="paired subject bootstrap", n_folds=1)

    cv = result.protocol == "cv" and all(result.score(model, s, seeds[0]).fold_metrics for s in result.settings)
    if cv:
        comparisons = [corrected(setting, baseline) for setting, baseline in pairs]
    else:
        comparisons = list(Parallel(n_jobs=workers)(delayed(bootstrap)(s, b) for s, b in pairs))
    for comparison, adjusted in zip(comparisons, holm([c.p_value for c in comparisons])):
        comparison.p_holm = _finite_or_none(adjusted)
    return comparisons


def headline_settings(endpoint: EndpointResult) -> list[str]:
    """The settings the summary reports: the smallest and the largest training fraction (one if equal); the first
    and last setting when no fraction was run."""
    amounts = {s.setting: s.amount for s in endpoint.scores if s.kind == "fraction"}
    ordered = sorted(amounts, key=amounts.get) or endpoint.settings
    return list(dict.fromkeys([ordered[0], ordered[-1]])) if ordered else []


def adjust_run(endpoints: list[EndpointResult]) -> None:
    """Holm over the run's headline comparisons (every endpoint's ``headline_settings`` × baselines) → each such
    comparison's ``p_holm_run``; the others keep None."""
    family = [c for e in endpoints for c in e.comparisons if c.setting in headline_settings(e)]
    for comparison, adjusted in zip(family, holm([c.p_value for c in family])):
        comparison.p_holm_run = _finite_or_none(adjusted)
