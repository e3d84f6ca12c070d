"""Pooling, linear heads (inner-CV penalty choice) and brain-age bias correction."""

import numpy as np
import pytest
from sklearn.dummy import DummyRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sksurv.metrics import concordance_index_censored

from heads import BrainAgeCorrection, SlicePooling, concordance, make_linear_head, make_survival_target
from heads.linear import FALLBACK_C, FALLBACK_COX_ALPHA, LOGISTIC_CS, inner_folds


def linear_data(rng, n=120, d=20):
    """``X`` [n, d] and a linear predictor ``[n]`` driven by the first three features."""
    X = rng.normal(size=(n, d))
    return X, X[:, 0] - X[:, 1] + 0.5 * X[:, 2]


def survival_data(rng, n=160, d=10):
    """Exponential event times with log hazard = linear predictor, independent exponential censoring."""
    X, risk = linear_data(rng, n, d)
    event_time, censor_time = rng.exponential(np.exp(-risk)), rng.exponential(2.0, size=n)
    return X, make_survival_target(event_time <= censor_time, np.minimum(event_time, censor_time)), risk


def test_pooling_matches_numpy_reductions_on_ragged_bags():
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(s, 5)).astype(np.float32) for s in (3, 7, 1)]
    expected_mean = np.stack([b.mean(0) for b in bags])
    expected_max = np.stack([b.max(0) for b in bags])
    np.testing.assert_array_equal(SlicePooling("mean").fit(bags).transform(bags), expected_mean)
    np.testing.assert_array_equal(SlicePooling("max").fit(bags).transform(bags), expected_max)
    meanmax = SlicePooling("meanmax").fit_transform(bags)
    np.testing.assert_array_equal(meanmax, np.concatenate([expected_mean, expected_max], axis=1))
    assert meanmax.shape == (3, 10) and meanmax.dtype == np.float32


@pytest.mark.parametrize("bags, message", [([], "no bags"), ([np.zeros((0, 4))], "at least one slice"),
                                           ([np.zeros((2, 4)), np.zeros((2, 5))], "different feature widths")])
def test_pooling_rejects_bad_bags(bags, message):
    with pytest.raises(ValueError, match=message):
        SlicePooling().fit(bags)


def test_pooling_rejects_unknown_method_and_width_change():
    with pytest.raises(ValueError, match="method must be one of"):
        SlicePooling("median").fit([np.zeros((2, 3))])
    pooling = SlicePooling().fit([np.zeros((2, 3))])
    with pytest.raises(ValueError, match="fitted on 3"):
        pooling.transform([np.zeros((2, 4))])


def test_logistic_head_picks_C_like_an_explicit_grid_search_and_refits_on_all_data():
    rng = np.random.default_rng(1)
    X, score = linear_data(rng, n=200)
    y = np.where(score + 0.3 * rng.normal(size=len(score)) > 0, "lesion", "healthy")
    head = make_linear_head("classification", inner_cv=4, random_state=3).fit(X[:80], y[:80])

    scaled = StandardScaler().fit(X[:80])
    folds = StratifiedKFold(4, shuffle=True, random_state=3)
    search = GridSearchCV(LogisticRegression(max_iter=2000), {"C": list(LOGISTIC_CS)}, cv=folds,
                          scoring="neg_log_loss").fit(scaled.transform(X[:80]), y[:80])
    assert head[-1].C_ == search.best_params_["C"]
    reference = LogisticRegression(C=head[-1].C_, max_iter=10000, tol=1e-10).fit(scaled.transform(X[:80]), y[:80])
    np.testing.assert_allclose(head.predict_proba(X[80:]), reference.predict_proba(scaled.transform(X[80:])),
                               atol=1e-6)
    assert list(head.classes_) == ["healthy", "lesion"]
    assert head.score(X[80:], y[80:]) > 0.8
    assert "LogisticRegressionInnerCV" in repr(head)


def test_inner_folds_follow_the_smallest_class_and_fall_back_when_a_class_is_single():
    assert len(inner_folds(np.array([0] * 10 + [1] * 3), 5, 0)) == 3
    assert len(inner_folds(np.array([0] * 10 + [1] * 30), 5, 0)) == 5
    assert inner_folds(np.array([0] * 10 + [1]), 5, 0) is None
    rng = np.random.default_rng(2)
    X = rng.normal(size=(12, 4))
    y = np.array([0] * 11 + [1])
    head = make_linear_head("classification").fit(X, y)
    assert head[-1].C_ == FALLBACK_C
    assert head.predict_proba(X).shape == (12, 2)
    with pytest.raises(ValueError, match="two classes"):
        make_linear_head("classification").fit(X, np.zeros(12))


def test_multiclass_probabilities_sum_to_one():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 6))
    y = np.array(["a", "b", "c"])[np.argmax(X[:, :3], axis=1)]
    probabilities = make_linear_head("classification").fit(X, y).predict_proba(X)
    assert probabilities.shape == (60, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)


def test_ridge_head_chooses_alpha_and_matches_sklearn_ridge():
    rng = np.random.default_rng(4)
    X, target = linear_data(rng)
    y = 50 + 10 * target + rng.normal(size=len(target))
    head = make_linear_head("regression").fit(X[:80], y[:80])
    scaled = StandardScaler().fit(X[:80])
    reference = Ridge(alpha=head[-1].alpha_).fit(scaled.transform(X[:80]), y[:80])
    np.testing.assert_allclose(head.predict(X[80:]), reference.predict(scaled.transform(X[80:])), rtol=1e-8)
    assert head.score(X[80:], y[80:]) > 0.9


def test_cox_head_ranks_held_out_risk_and_scores_with_sksurv_concordance():
    rng = np.random.default_rng(5)
    X, y, _ = survival_data(rng)
    head = make_linear_head("survival").fit(X[:110], y[:110])
    risk = head.predict(X[110:])
    expected = concordance_index_censored(y["event"][110:], y["time"][110:], risk)[0]
    assert head.score(X[110:], y[110:]) == pytest.approx(expected, abs=1e-12)
    assert expected > 0.7


def test_cox_head_without_censoring_and_with_too_few_events():
    rng = np.random.default_rng(6)
    X, y, risk = survival_data(rng, n=40)
    all_events = make_survival_target(np.ones(40, bool), y["time"])
    assert make_linear_head("survival").fit(X, all_events)[-1].alpha_ > 0
    one_event = make_survival_target(np.arange(40) == 0, y["time"])
    assert make_linear_head("survival").fit(X, one_event)[-1].alpha_ == FALLBACK_COX_ALPHA
    with pytest.raises(ValueError, match="at least one event"):
        make_linear_head("survival").fit(X, make_survival_target(np.zeros(40, bool), y["time"]))


def test_concordance_is_one_half_without_comparable_pairs():
    assert concordance(make_survival_target([True, False], [5.0, 1.0]), [1.0, 2.0]) == 0.5
    assert concordance(make_survival_target([False, False], [1.0, 2.0]), [1.0, 2.0]) == 0.5
    assert concordance(make_survival_target([True, False], [1.0, 5.0]), [2.0, 1.0]) == 1.0


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="task must be one of"):
        make_linear_head("ranking")


def attenuated_age_data(rng, n):
    """One noisy age feature: least squares on it has the regression-dilution slope var(age) / (var(age) + var(noise))
    = 300 / (300 + 300) = 0.5, i.e. predicted ≈ 0.5 * age + 25 (over-predicts the young, under-predicts the old)."""
    age = rng.uniform(20, 80, size=n)
    return (age + rng.normal(scale=np.sqrt(300.0), size=n))[:, None], age


def gap_slope(age, predicted):
    """Slope of the brain-age gap (predicted - age) against age."""
    return np.polyfit(age, predicted - age, 1)[0]


def test_brain_age_correction_removes_regression_to_the_mean_on_held_out_data():
    rng = np.random.default_rng(7)
    X_train, age_train = attenuated_age_data(rng, 2000)
    X_test, age_test = attenuated_age_data(rng, 2000)
    corrected = BrainAgeCorrection(LinearRegression()).fit(X_train, age_train)
    assert corrected.slope_ == pytest.approx(0.5, abs=0.05)
    assert corrected.intercept_ == pytest.approx(25.0, abs=3.0)

    raw = corrected.predict_uncorrected(X_test)
    np.testing.assert_allclose(raw, LinearRegression().fit(X_train, age_train).predict(X_test))
    assert gap_slope(age_test, raw) == pytest.approx(-0.5, abs=0.05)
    assert abs(gap_slope(age_test, corrected.predict(X_test))) < 0.1
    np.testing.assert_allclose(corrected.predict(X_test), (raw - corrected.intercept_) / corrected.slope_)


def test_brain_age_correction_is_fitted_on_training_data_only():
    rng = np.random.default_rng(8)
    X_train, age_train = attenuated_age_data(rng, 300)
    corrected = BrainAgeCorrection(LinearRegression()).fit(X_train, age_train)
    slope, intercept = corrected.slope_, corrected.intercept_
    X_old, _ = attenuated_age_data(rng, 50)
    corrected.predict(X_old + 40.0)
    assert (corrected.slope_, corrected.intercept_) == (slope, intercept)


def test_brain_age_correction_refuses_a_regressor_that_learned_nothing():
    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match="has not learned age"):
        BrainAgeCorrection(DummyRegressor()).fit(rng.normal(size=(100, 1)), rng.uniform(20, 80, size=100))


def test_cox_head_on_two_or_three_training_volumes_uses_the_fixed_penalty():
    from heads import make_linear_head
    from heads.targets import make_survival_target

    rng = np.random.default_rng(0)
    for n in (2, 3):
        X = rng.normal(size=(n, 6))
        y = make_survival_target(np.ones(n, dtype=bool), np.arange(1.0, n + 1))
        head = make_linear_head("survival").fit(X, y)
        assert head[-1].alpha_ == FALLBACK_COX_ALPHA and head.predict(X).shape == (n,)


def test_heads_fitted_in_the_training_rows_span_equal_the_models_fitted_on_all_features():
    """More features than volumes (D = 300, V = 40), as in every probe: the logistic and Cox heads fit in the span of
    the training rows; the same penalty on all 300 features must give the same predictions, and coef_ must be that
    model in the standardised features."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    rng = np.random.default_rng(7)
    X, score = linear_data(rng, n=60, d=300)
    X[:, 5] = X[:, 4]                                         # a rank-deficient block, as max-pooled features have
    y = np.digitize(score + 0.3 * rng.normal(size=60), [-1.0, 1.0])          # three classes
    head = make_linear_head("classification", inner_cv=3).fit(X[:40], y[:40])
    scaled = StandardScaler().fit(X[:40])
    reference = LogisticRegression(C=head[-1].C_, max_iter=10000, tol=1e-10).fit(scaled.transform(X[:40]), y[:40])
    np.testing.assert_allclose(head.predict_proba(X[40:]), reference.predict_proba(scaled.transform(X[40:])),
                               atol=1e-5)
    np.testing.assert_allclose(head[-1].decision_function(scaled.transform(X[40:])),
                               scaled.transform(X[40:]) @ head[-1].coef_.T + head[-1].intercept_, atol=1e-9)
    assert head[-1].coef_.shape == (3, 300) and head[-1].basis_.shape == (300, 39)

    survival = make_survival_target(rng.random(60) < 0.7, np.exp(-score + 0.3 * rng.normal(size=60)))
    cox = make_linear_head("survival", inner_cv=3).fit(X[:40], survival[:40])
    reference = CoxPHSurvivalAnalysis(alpha=cox[-1].alpha_, tol=1e-12, n_iter=1000).fit(
        scaled.transform(X[:40]), survival[:40])
    np.testing.assert_allclose(cox.predict(X[40:]), reference.predict(scaled.transform(X[40:])), atol=1e-4)
    np.testing.assert_allclose(cox[-1].coef_, reference.coef_, atol=1e-5)


def test_heads_on_constant_features_predict_from_the_intercept():
    """Constant features standardise to zeros (no row span at all): the heads still fit, on the labels alone."""
    y = np.array([0, 0, 0, 1] * 5)
    head = make_linear_head("classification", inner_cv=3).fit(np.ones((20, 6)), y)
    np.testing.assert_allclose(head.predict_proba(np.ones((2, 6)))[:, 1], 0.25, atol=1e-3)
    assert head[-1].coef_.shape == (1, 6) and not head[-1].coef_.any()
    survival = make_survival_target(np.arange(20) % 3 > 0, np.arange(1.0, 21.0))
    cox = make_linear_head("survival", inner_cv=3).fit(np.ones((20, 6)), survival)
    assert not cox[-1].coef_.any() and np.ptp(cox.predict(np.ones((3, 6)))) == 0
