"""Endpoint metrics, subject-bootstrap CIs and paired bootstrap tests.

Classification and MAE are computed with numpy from class counts and ranks (the bootstrap evaluates them thousands of
times per cell, and scikit-learn's input handling took ~8 ms a call); tests hold them equal to scikit-learn's
(macro F1 over scikit-learn's default label set: the classes present in the truth or the prediction).
The C-index and log-rank test are scikit-survival's, Pearson's r is scipy's.

A *prediction set* is a dict of per-sample arrays, one row per test sample (a subject, or one volume of a subject
with the volume unit; index ``i`` = sample ``i``):

- classification: ``y_true`` [n] int class codes 0..C-1, ``prob`` [n, C] float (rows sum to 1)
- regression:     ``y_true`` [n] float, ``y_pred`` [n] float
- survival:       ``time`` [n] float > 0, ``event`` [n] bool, ``risk`` [n] float (higher = earlier event),
                  ``high_risk`` [n] bool (risk above the TRAINING-set median risk)
- segmentation:   ``dice`` [n, L] float, per-subject Dice of each foreground label (NaN where the label is absent
                  from both the true and the predicted mask); ``labels`` [L] int

Optional in every task: ``fold`` [n] int, the CV fold whose head predicted the sample. Rank metrics (AUC, C-index)
are then computed within each fold and averaged over the folds: five heads fitted on different training folds put
their scores on different scales, and ranking pooled scores across them biases AUC and C-index towards 0.5.

Bootstrap resamples subjects with replacement, each drawn subject bringing all its samples (a cluster bootstrap;
``cluster_bootstrap_indices``); the same seeded draws serve every encoder, so tests are paired. A resample where a
metric is undefined (e.g. one class only) is left out of that metric's interval, and counted: ``score_with_ci``
returns the number of valid resamples per metric. These intervals are CONDITIONAL on the fitted heads: they show
how much the score would move with other test subjects, not with other training subjects.
"""

import warnings

import numpy as np
import sklearn
from numpy.linalg import LinAlgError
from scipy.stats import pearsonr, rankdata
from sklearn.metrics import f1_score
from sksurv.compare import compare_survival
from sksurv.exceptions import NoComparablePairException
from sksurv.metrics import concordance_index_censored

METRICS = {
    "classification": ("balanced_accuracy", "auc", "f1_macro"),
    "regression": ("mae", "pearson_r"),
    "survival": ("c_index", "logrank_p"),
}
HEADLINE = {"classification": "balanced_accuracy", "regression": "mae", "survival": "c_index",
            "segmentation": "dice_mean"}
LOWER_IS_BETTER = {"mae", "logrank_p"}
NOT_BOOTSTRAPPED = {"logrank_p"}          # a p-value has no confidence interval


def metric_names(task: str, labels=()) -> list[str]:
    """Metric names of a task in report order; segmentation: dice_mean then dice_<label> per foreground label."""
    if task == "segmentation":
        return ["dice_mean"] + [f"dice_{label}" for label in labels]
    return list(METRICS[task])


def compute_metrics(task: str, pred: dict, index: np.ndarray | None = None, names=None) -> dict[str, float]:
    """Metrics ``names`` (default: all of ``task``) on the subjects ``index`` [m] (all when None) of a prediction
    set; NaN where a metric is undefined on those subjects."""
    subset = pred if index is None else {key: (value if key == "labels" else value[index])
                                         for key, value in pred.items()}
    if task == "segmentation":
        values = _segmentation(subset["dice"], subset["labels"])
        return values if names is None else {name: values[name] for name in names}
    if task not in METRICS:
        raise ValueError(f"unknown task {task!r}")
    return {name: float(_METRIC_FUNCTIONS[name](subset)) for name in (names or METRICS[task])}


def dice_per_label(true_mask: np.ndarray, pred_mask: np.ndarray, labels) -> np.ndarray:
    """Dice of each label [L] between two integer masks of one shape (sklearn F1 over voxels; NaN if absent in both)."""
    return np.asarray(f1_score(true_mask.ravel(), pred_mask.ravel(), labels=list(labels), average=None,
                               zero_division=np.nan), dtype=float)


def bootstrap_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples, n] subject indices drawn with replacement (seeded: the same draws for every encoder)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def cluster_bootstrap_indices(groups, n_resamples: int, seed: int) -> list[np.ndarray]:
    """B resamples of sample positions: each draws the G subjects (``groups`` [n], the subject of each sample) with
    replacement and takes every sample of each drawn subject (in position order) → list of B int arrays, each of
    length Σ over drawn subjects of their sample counts. Subjects are numbered by first appearance, so with one
    sample per subject in subject order the draws equal ``bootstrap_indices(n, B, seed)`` exactly."""
    _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=int)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    cluster = rank[inverse.ravel()]                                   # [n] subject number by first appearance
    members = np.argsort(cluster, kind="stable")                      # positions grouped by subject
    sizes = np.bincount(cluster, minlength=len(first))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    picks = bootstrap_indices(len(first), n_resamples, seed)          # [B, G] drawn subject numbers
    draws = []
    for row in picks:
        lengths = sizes[row]
        offsets = np.repeat(starts[row] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        draws.append(members[np.arange(lengths.sum()) + offsets])
    return draws


def score_with_ci(task: str, pred: dict, draws, confidence: float = 0.95) -> dict[str, tuple]:
    """{metric: (value, low, high, n_valid)}: point estimate on all samples and percentile bootstrap CI over
    ``draws`` ([B, n] or a list of B index arrays); ``n_valid`` resamples had the metric defined (the CI is theirs);
    low/high are None (and n_valid 0) for metrics without a CI (logrank_p) or when every resample was undefined."""
    point = compute_metrics(task, pred)
    names = [name for name in point if name not in NOT_BOOTSTRAPPED]
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):   # inputs checked once above
        samples = np.array([list(compute_metrics(task, pred, index, names).values()) for index in draws])
    samples = samples.reshape(len(draws), len(names))
    result = {name: (point[name], None, None, 0) for name in point}
    for column, name in enumerate(names):
        values = samples[:, column]
        values = values[np.isfinite(values)]
        if len(values):
            low, high = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
            result[name] = (point[name], float(low), float(high), int(len(values)))
    return result


def paired_bootstrap(task: str, metric: str, model_preds: list[dict], baseline_preds: list[dict],
                     draws, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Paired test of model vs baseline on the same samples: (difference, low, high, p_value).

    ``model_preds`` / ``baseline_preds``: one prediction set per seed, all over the same samples in the same order.
    The difference is the seed-mean of metric(model) − metric(baseline); each resample of ``draws`` ([B, n] or a
    list of B index arrays, see ``cluster_bootstrap_indices``) is applied to every seed. p is two-sided: 2 × the
    smaller share of resampled differences on either side of 0 (with the +1 correction of a permutation-style
    estimate), capped at 1.
    """
    def difference(index):
        diffs = [compute_metrics(task, m, index, [metric])[metric] - compute_metrics(task, b, index, [metric])[metric]
                 for m, b in zip(model_preds, baseline_preds)]
        return float(np.mean(diffs))

    observed = difference(None)
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        samples = np.array([difference(index) for index in draws])
    samples = samples[np.isfinite(samples)]
    if not np.isfinite(observed) or len(samples) == 0:
        return observed, float("nan"), float("nan"), float("nan")
    low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
    below = (1 + np.sum(samples <= 0)) / (len(samples) + 1)
    above = (1 + np.sum(samples >= 0)) / (len(samples) + 1)
    return observed, float(low), float(high), float(min(1.0, 2 * min(below, above)))


def _class_counts(pred: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class ``[C]``: true samples, predicted samples (argmax of ``prob``), correctly predicted samples."""
    n_classes = pred["prob"].shape[1]
    y_true, y_pred = pred["y_true"], pred["prob"].argmax(axis=1)
    return (np.bincount(y_true, minlength=n_classes), np.bincount(y_pred, minlength=n_classes),
            np.bincount(y_true[y_pred == y_true], minlength=n_classes))


def _balanced_accuracy(pred: dict) -> float:
    """Mean recall over the classes present in ``y_true`` (sklearn's ``balanced_accuracy_score``)."""
    support, _predicted, correct = _class_counts(pred)
    present = support > 0
    return float(np.mean(correct[present] / support[present]))


def _within_folds(metric, pred: dict) -> float:
    """``metric`` on each CV fold's samples (``pred["fold"]``), averaged over the folds where it is defined; the
    metric on all samples when there is no fold key or a single fold. NaN when no fold has it defined."""
    fold = pred.get("fold")
    if fold is None or len(fold) == 0 or np.all(fold == fold[0]):
        return metric(pred)
    values = [metric({key: value[fold == k] for key, value in pred.items() if key != "labels"})
              for k in np.unique(fold)]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _auc(pred: dict) -> float:
    """ROC AUC within folds (see ``_within_folds``) of ``_pooled_auc``."""
    return _within_folds(_pooled_auc, pred)


def _pooled_auc(pred: dict) -> float:
    """ROC AUC (binary: of class 1; more classes: one-vs-rest macro mean), as the Mann-Whitney statistic with tied
    scores counted one half, which is sklearn's ``roc_auc_score``; NaN when a class is absent from ``y_true``."""
    y_true, prob = pred["y_true"], pred["prob"]
    n_classes = prob.shape[1]
    if len(np.unique(y_true)) < n_classes:
        return float("nan")                      # one-vs-rest AUC undefined for a class absent from the subjects
    classes = [1] if n_classes == 2 else range(n_classes)
    return float(np.mean([_mann_whitney_auc(y_true == k, prob[:, k]) for k in classes]))


def _mann_whitney_auc(positive: np.ndarray, score: np.ndarray) -> float:
    n_positive = int(positive.sum())
    n_negative = len(positive) - n_positive
    rank_sum = rankdata(score)[positive].sum()
    return (rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)


def _f1_macro(pred: dict) -> float:
    """Mean of F1 = 2 TP / (2 TP + FP + FN) over the classes present in ``y_true`` or predicted: sklearn's
    ``f1_score(average="macro")`` with its default label set (a class absent from both is not counted, so a
    perfect classifier scores 1 on a resample that lacks a class)."""
    support, predicted, correct = _class_counts(pred)
    present = support + predicted > 0
    return float(np.mean(2 * correct[present] / (support + predicted)[present]))


def _mae(pred: dict) -> float:
    return float(np.mean(np.abs(pred["y_true"] - pred["y_pred"])))


def _pearson_r(pred: dict) -> float:
    y_true, y_pred = pred["y_true"], pred["y_pred"]
    if len(y_true) < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0:
        return float("nan")
    return pearsonr(y_true, y_pred)[0]


def _c_index(pred: dict) -> float:
    """Harrell's C-index within folds (see ``_within_folds``)."""
    return _within_folds(_pooled_c_index, pred)


def _pooled_c_index(pred: dict) -> float:
    event = pred["event"].astype(bool)
    if not event.any() or len(event) < 2:
        return float("nan")                      # all censored: no comparable pair
    try:
        return concordance_index_censored(event, pred["time"], pred["risk"])[0]
    except NoComparablePairException:
        return float("nan")


def _logrank_p(pred: dict) -> float:
    event, high = pred["event"].astype(bool), pred["high_risk"].astype(bool)
    if not event.any() or high.all() or not high.any():
        return float("nan")                      # one risk group only, or no event
    structured = np.array(list(zip(event, pred["time"])), dtype=[("event", bool), ("time", float)])
    try:
        return compare_survival(structured, high.astype(int))[1]
    except LinAlgError:                          # zero log-rank variance (e.g. the only event at the last time):
        return float("nan")                      # no test statistic exists


_METRIC_FUNCTIONS = {"balanced_accuracy": _balanced_accuracy, "auc": _auc, "f1_macro": _f1_macro, "mae": _mae,
                     "pearson_r": _pearson_r, "c_index": _c_index, "logrank_p": _logrank_p}


def _segmentation(dice: np.ndarray, labels) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # a label absent in every chosen subject: NaN
        per_label = np.nanmean(dice, axis=0) if len(dice) else np.full(len(labels), np.nan)
        result = {"dice_mean": float(np.nanmean(per_label)) if np.isfinite(per_label).any() else float("nan")}
    result.update({f"dice_{label}": float(value) for label, value in zip(labels, per_label)})
    return result
