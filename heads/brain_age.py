"""Brain-age bias correction (regression towards the mean of age predictions).

Any age regressor over-predicts the young and under-predicts the old: predicted ≈ a * age + b with slope a < 1.
:class:`BrainAgeCorrection` estimates ``a, b`` on the TRAINING data only, from out-of-fold (inner cross-validated)
predictions so that the estimate is not flattered by in-sample fit, and then corrects any prediction without knowing
the true age: ``corrected = (predicted - b) / a`` (Cole et al. 2018, de Lange & Cole 2020). The variant that
subtracts ``a * age + b`` using the true age of test subjects is deliberately not offered: it leaks the target.
"""

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin, clone

from heads.grouping import fit_grouped, group_splits, n_groups, take

MIN_SLOPE = 1e-3    # a near-flat fitted slope means the regressor learned nothing; dividing by it would explode


class BrainAgeCorrection(RegressorMixin, BaseEstimator):
    """Wraps ``regressor``: ``fit(X [V, ...], age [V])``, ``predict(X) -> [V]`` bias-corrected predicted age.

    Fitted attributes: ``regressor_`` (refitted on all training data), ``slope_`` (``a``), ``intercept_`` (``b``)
    of ``predicted = a * age + b`` fitted to ``inner_cv``-fold out-of-fold predictions on the training data,
    ``inner_splits_`` those folds. With ``groups`` ``[V]`` (the subject of each volume) the folds keep a subject's
    volumes together and the regressor's own inner search gets the groups too: out-of-fold predictions of a subject
    whose other volumes were in training would be near-copies of in-sample fits, and the slope would be ~1.
    ``X`` is whatever ``regressor`` accepts (pooled features, or bags for :class:`heads.AttentionMILHead`).
    """

    def __init__(self, regressor, inner_cv: int = 5, random_state: int = 0):
        self.regressor = regressor
        self.inner_cv = inner_cv
        self.random_state = random_state

    def fit(self, X, y, groups=None):
        age = np.asarray(y, dtype=np.float64)
        groups = None if groups is None else np.asarray(groups)
        units = len(age) if groups is None else n_groups(groups)
        if units < 2:
            raise ValueError("the brain-age slope needs at least two training subjects")
        self.inner_splits_ = group_splits(min(self.inner_cv, units), self.random_state, len(age), groups=groups)
        out_of_fold = np.empty(len(age))
        for train, test in self.inner_splits_:
            inner = fit_grouped(clone(self.regressor), take(X, train), age[train],
                                None if groups is None else groups[train])
            out_of_fold[test] = inner.predict(take(X, test))
        slope, intercept = np.polyfit(age, out_of_fold, deg=1)
        if slope < MIN_SLOPE:
            raise ValueError(f"predicted age does not rise with true age on the training data (slope {slope:.3g}); "
                             f"the regressor has not learned age, so its bias cannot be corrected")
        self.slope_, self.intercept_ = float(slope), float(intercept)
        self.regressor_ = fit_grouped(clone(self.regressor), X, age, groups)
        return self

    def predict_uncorrected(self, X) -> np.ndarray:
        """``[V]`` predictions of the wrapped regressor, before bias correction."""
        return np.asarray(self.regressor_.predict(X), dtype=np.float64)

    def predict(self, X) -> np.ndarray:
        """``[V]`` corrected predicted age ``(predicted - intercept_) / slope_``; uses no true age."""
        return (self.predict_uncorrected(X) - self.intercept_) / self.slope_
