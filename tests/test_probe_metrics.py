"""Probe metrics agree with scikit-learn / scikit-survival; bootstrap CIs and paired tests behave."""

import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import balanced_accuracy_score, f1_score, mean_absolute_error, roc_auc_score
from sksurv.compare import compare_survival
from sksurv.metrics import concordance_index_censored
from sksurv.util import Surv

from braindino.probe import metrics as M


def classification_set(n, seed=0, signal=0.0, n_classes=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + signal * np.eye(n_classes)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return {"y_true": y, "prob": prob}


def sklearn_classification(y, prob):
    labels = list(range(prob.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # sklearn warns about a class absent from y_true
        balanced = balanced_accuracy_score(y, prob.argmax(1))
    auc = (roc_auc_score(y, prob[:, 1]) if prob.shape[1] == 2 else
           roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=labels))
    f1 = f1_score(y, prob.argmax(1), average="macro")           # sklearn's default label set
    return {"balanced_accuracy": balanced, "auc": auc, "f1_macro": f1}


@pytest.mark.parametrize("n_classes", [2, 3, 4])
def test_classification_metrics_equal_sklearn_on_bootstrap_resamples(n_classes):
    """Every resample the bootstrap draws (repeated subjects, tied scores, a class never predicted or, for balanced
    accuracy and F1, never true) gives sklearn's values."""
    rng = np.random.default_rng(n_classes)
    prototypes = rng.dirichlet(np.ones(n_classes), size=2 * n_classes)          # few distinct rows: tied scores
    prototypes[:, -1] = prototypes.min(axis=1) / 2                               # the last class is never predicted
    prototypes /= prototypes.sum(axis=1, keepdims=True)
    y = rng.integers(0, n_classes, 40)
    pred = {"y_true": y, "prob": prototypes[(y + rng.integers(0, 2, 40) * n_classes) % (2 * n_classes)]}
    for index in M.bootstrap_indices(40, 200, seed=1):
        got = M.compute_metrics("classification", pred, index)
        expected = sklearn_classification(pred["y_true"][index], pred["prob"][index])
        np.testing.assert_allclose([got["balanced_accuracy"], got["f1_macro"]],
                                   [expected["balanced_accuracy"], expected["f1_macro"]], rtol=1e-12)
        if len(np.unique(pred["y_true"][index])) == n_classes:
            assert got["auc"] == pytest.approx(expected["auc"], rel=1e-12)
    for rows in ([0, 2, 1, 2, 0], [0, 1, 1, 0, 0]):       # class 2 never true; then neither true nor predicted
        rare = {"y_true": np.array([0, 0, 1, 1, 0]), "prob": np.eye(3)[rows]}
        got = M.compute_metrics("classification", rare)
        expected = sklearn_classification(rare["y_true"], rare["prob"])
        assert (got["balanced_accuracy"], got["f1_macro"]) == pytest.approx(
            (expected["balanced_accuracy"], expected["f1_macro"]), rel=1e-12)


def test_regression_and_survival_metrics_equal_reference():
    rng = np.random.default_rng(0)
    y, p = rng.normal(size=30), rng.normal(size=30)
    got = M.compute_metrics("regression", {"y_true": y, "y_pred": p})
    assert got["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-12)
    assert got["pearson_r"] == pearsonr(y, p)[0]
    time, event, risk = rng.uniform(1, 20, 40), rng.random(40) < 0.6, rng.normal(size=40)
    high = risk > 0.1
    got = M.compute_metrics("survival", {"time": time, "event": event, "risk": risk, "high_risk": high})
    assert got["c_index"] == concordance_index_censored(event, time, risk)[0]
    assert got["logrank_p"] == compare_survival(Surv.from_arrays(event, time), high.astype(int))[1]


def test_dice_is_sklearn_f1_per_label():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 3, (6, 5, 4)), rng.integers(0, 3, (6, 5, 4))
    dice = M.dice_per_label(truth, pred, [1, 2])
    np.testing.assert_array_equal(dice, f1_score(truth.ravel(), pred.ravel(), labels=[1, 2], average=None))
    a = np.zeros((4, 4, 4), int); a[:2] = 1
    assert M.dice_per_label(a, a, [1])[0] == 1.0
    assert np.isnan(M.dice_per_label(a, a, [2])[0])       # label absent from both: undefined


def test_ci_contains_point_and_shrinks_with_n():
    widths = []
    for n in (40, 400):
        pred = classification_set(n, signal=1.5)
        ci = M.score_with_ci("classification", pred, M.bootstrap_indices(n, 300, 0))
        for value, low, high, n_valid in ci.values():
            assert n_valid == 300
            assert low <= value <= high
        widths.append(ci["balanced_accuracy"][2] - ci["balanced_accuracy"][1])
    assert widths[1] < widths[0] / 2            # ~1/sqrt(n): a 10x larger cohort gives a ~3x narrower interval


def test_logrank_has_no_ci():
    rng = np.random.default_rng(1)
    risk = rng.normal(size=30)
    pred = {"time": rng.uniform(1, 9, 30), "event": rng.random(30) < 0.7, "risk": risk, "high_risk": risk > 0}
    value, low, high, n_valid = M.score_with_ci("survival", pred, M.bootstrap_indices(30, 50, 0))["logrank_p"]
    assert np.isfinite(value) and low is None and high is None and n_valid == 0


def test_paired_bootstrap_small_p_for_better_model_large_for_identical():
    n = 120
    good, bad = classification_set(n, seed=3, signal=4.0), classification_set(n, seed=3, signal=0.0)
    draws = M.bootstrap_indices(n, 500, 0)
    diff, low, high, p = M.paired_bootstrap("classification", "balanced_accuracy", [good], [bad], draws)
    assert diff > 0.3 and low > 0 and p < 0.01
    diff, low, high, p = M.paired_bootstrap("classification", "balanced_accuracy", [good, bad], [good, bad], draws)
    assert diff == 0 and p == 1.0


def test_paired_bootstrap_lower_is_better_sign():
    rng = np.random.default_rng(0)
    y = rng.normal(size=80)
    close, far = {"y_true": y, "y_pred": y + 0.1 * rng.normal(size=80)}, {"y_true": y, "y_pred": rng.normal(size=80)}
    diff, _, high, p = M.paired_bootstrap("regression", "mae", [close], [far], M.bootstrap_indices(80, 300, 1))
    assert diff < 0 and high < 0 and p < 0.01


def test_undefined_metrics_are_nan_not_errors():
    pred = {"y_true": np.array([0, 0, 0]), "prob": np.array([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])}
    assert np.isnan(M.compute_metrics("classification", pred)["auc"])
    censored = {"time": np.ones(4), "event": np.zeros(4, bool), "risk": np.arange(4.0),
                "high_risk": np.array([0, 0, 1, 1], bool)}
    assert np.isnan(M.compute_metrics("survival", censored)["c_index"])


@pytest.mark.parametrize("task", ["classification", "regression", "survival"])
def test_metric_names_match_compute(task):
    preds = {"classification": classification_set(20),
             "regression": {"y_true": np.arange(5.0), "y_pred": np.arange(5.0) ** 2},
             "survival": {"time": np.arange(1.0, 7), "event": np.array([1, 0, 1, 1, 0, 1], bool),
                          "risk": -np.arange(6.0), "high_risk": np.arange(6) < 3}}
    assert list(M.compute_metrics(task, preds[task])) == M.metric_names(task)


def test_logrank_with_zero_variance_is_nan_not_a_crash():
    """sksurv's compare_survival raises LinAlgError (singular matrix) here: the only event is the last time."""
    pred = {"time": np.array([42.0, 20.0]), "event": np.array([1, 0], bool), "risk": np.array([0.0, 1.0]),
            "high_risk": np.array([0, 1], bool)}
    with pytest.raises(np.linalg.LinAlgError):
        compare_survival(Surv.from_arrays(pred["event"], pred["time"]), pred["high_risk"].astype(int))
    got = M.compute_metrics("survival", pred)
    assert np.isnan(got["logrank_p"]) and np.isnan(got["c_index"])          # no comparable pair either


def test_macro_f1_of_a_perfect_classifier_is_one_when_a_class_is_absent():
    pred = {"y_true": np.array([0, 1, 0, 1]), "prob": np.eye(3)[[0, 1, 0, 1]]}     # class 2 neither true nor predicted
    assert M.compute_metrics("classification", pred)["f1_macro"] == 1.0
    assert f1_score(pred["y_true"], pred["prob"].argmax(1), average="macro") == 1.0


def test_rank_metrics_are_computed_within_folds_and_averaged():
    """Two folds whose heads score on different scales: pooled ranking mixes them, within-fold ranking does not."""
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 20)
    fold = np.repeat([0, 1], 20)
    score = 2.0 * y + rng.normal(0, 0.5, 40) + 3.0 * fold              # fold 1 scores on a higher scale
    prob = np.c_[1 - 1 / (1 + np.exp(-score)), 1 / (1 + np.exp(-score))]
    pred = {"y_true": y, "prob": prob, "fold": fold}
    expected = np.mean([roc_auc_score(y[fold == k], prob[fold == k, 1]) for k in (0, 1)])
    got = M.compute_metrics("classification", pred)["auc"]
    assert got == pytest.approx(expected, rel=1e-12) and got > roc_auc_score(y, prob[:, 1]) + 0.1
    time, event = rng.uniform(1, 20, 40), rng.random(40) < 0.7
    risk = -time / 10 + rng.normal(0, 0.3, 40) + 5.0 * fold * rng.random(40)
    survival = {"time": time, "event": event, "risk": risk, "high_risk": risk > 0, "fold": fold}
    expected = np.mean([concordance_index_censored(event[fold == k], time[fold == k], risk[fold == k])[0]
                        for k in (0, 1)])
    assert M.compute_metrics("survival", survival)["c_index"] == pytest.approx(expected, rel=1e-12)
    assert M.compute_metrics("classification", {**pred, "fold": np.zeros(40, int)})["auc"] == \
        pytest.approx(roc_auc_score(y, prob[:, 1]), rel=1e-12)


def test_valid_resamples_are_counted():
    """A rare class: resamples without it have no AUC; the count says how many the interval rests on."""
    y = np.array([0] * 18 + [1] * 2)
    pred = {"y_true": y, "prob": np.c_[1 - y * 0.8 - 0.1, y * 0.8 + 0.1]}
    draws = M.bootstrap_indices(20, 400, 0)
    got = M.score_with_ci("classification", pred, draws)
    expected = sum(len(np.unique(y[index])) == 2 for index in draws)
    assert got["auc"][3] == expected < 400 and got["balanced_accuracy"][3] == 400
