"""Linear heads on pooled features ``[V, D]``: standardisation + a penalised linear model whose penalty is chosen by
inner cross-validation on the training data only (nothing of a test fold is ever seen).

Probes have far more features than training volumes (D = 384-1,536 for a few dozen volumes), so the logistic and Cox
heads fit in the span of the training rows (:func:`row_space_basis`): an L2-penalised linear model's weights lie in
that span, so fitting the ``r <= V`` coordinates there is the same model as fitting all D features, D / r times
cheaper for every inner-CV fit. ``coef_`` is reported in the D standardised features.

Every head's ``fit`` takes optional ``groups`` ``[V]`` (the subject of each volume): inner folds then keep a
subject's volumes together (see :mod:`heads.grouping`); the inner splits used are kept in ``inner_splits_``.
"""

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge, RidgeCV
from sklearn.metrics import log_loss, make_scorer
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxPHSurvivalAnalysis

from heads.grouping import group_splits, n_groups
from heads.targets import check_task, survival_arrays, survival_scorer

LOGISTIC_CS = tuple(np.logspace(-4, 2, 13))      # inverse L2 strength on standardised features
RIDGE_ALPHAS = tuple(np.logspace(-2, 5, 15))
COX_ALPHAS = tuple(np.logspace(-1, 4, 11))       # ridge penalty on the (summed) Cox log partial likelihood
# Newton-CG: on separable training data (most probes: D >> V) L-BFGS needs thousands of iterations at large C; Newton
# steps in the r <= V row-space coordinates need a few dozen (10-20x faster on the demo's probes, same solutions).
LOGISTIC_SOLVER = "newton-cg"
LOGISTIC_TOL = 1e-9                         # Newton-CG gradient tolerance (1e-6 left 4e-3 in probabilities at C = 100)
FALLBACK_C = 1.0                            # used when a class (or the events) is too rare for inner folds
FALLBACK_COX_ALPHA = 10.0
COX_MAX_ITER = 500                          # Newton steps of the Cox fit (sksurv's 100 can stop short at small alpha)


def make_linear_head(task: str, inner_cv: int = 5, random_state: int = 0) -> Pipeline:
    """A ``StandardScaler`` + linear model pipeline for ``task``; ``fit(X [V, D], y)``, ``predict(X) -> [V]``.

    - classification: :class:`LogisticRegressionInnerCV` (``C`` by stratified inner CV on log loss; ``predict_proba``)
    - regression: :class:`RidgeInnerCV` (``alpha`` by leave-one-out CV, leave-subjects-out with ``groups``)
    - survival: :class:`CoxPHInnerCV` (ridge ``alpha`` by inner CV on the C-index); ``predict`` → risk score
    """
    check_task(task)
    if task == "classification":
        model = LogisticRegressionInnerCV(inner_cv=inner_cv, random_state=random_state)
    elif task == "regression":
        model = RidgeInnerCV(inner_cv=inner_cv, random_state=random_state)
    else:
        model = CoxPHInnerCV(inner_cv=inner_cv, random_state=random_state)
    return make_pipeline(StandardScaler(), model)


def inner_folds(labels: np.ndarray, inner_cv: int, random_state: int, groups=None) -> list | None:
    """Stratified inner (train, test) index pairs over class labels ``labels`` ``[V]``, or None if impossible.

    The number of folds is ``min(inner_cv, smallest class count)`` — counted in subjects when ``groups`` ``[V]``
    is given, and then folds are grouped by subject — so every fold holds every class; with a class of one member
    (subject) no stratified split exists and the caller falls back to a fixed penalty.
    """
    labels = np.asarray(labels)
    sizes = [n_groups(groups, labels == c) if groups is not None else int((labels == c).sum())
             for c in np.unique(labels)]
    n_splits = min(inner_cv, min(sizes))
    if n_splits < 2:
        return None
    return group_splits(n_splits, random_state, len(labels), labels=labels, groups=groups)


def row_space_basis(X: np.ndarray) -> np.ndarray:
    """Orthonormal basis ``[D, r]`` of the span of the rows of ``X`` ``[V, D]`` (``r`` = numerical rank).

    For a loss of ``X w + b`` plus ``λ‖w‖²``, any part of ``w`` orthogonal to the rows leaves ``X w`` unchanged
    and only adds penalty, so the minimiser is ``w = B a`` with ``a`` minimising the same objective on ``X B`` [V, r]
    (``‖B a‖ = ‖a‖``). The same holds for every subset of the rows (inner CV folds): their span lies inside.
    """
    X = np.asarray(X, dtype=np.float64)
    _, singular, vt = np.linalg.svd(X, full_matrices=False)
    if singular.size == 0 or singular[0] == 0:      # all-zero rows (e.g. constant features, standardised): the
        return np.eye(X.shape[1], 1)                # model is its intercept; one zero coordinate keeps sklearn fitting
    rank = int((singular > singular[0] * max(X.shape) * np.finfo(np.float64).eps).sum())
    return vt[:rank].T


def in_basis(X, basis: np.ndarray) -> np.ndarray:
    """Coordinates ``[V, r]`` of features ``X`` ``[V, D]`` in an orthonormal ``basis`` ``[D, r]``."""
    return np.asarray(X, dtype=np.float64) @ basis


class LogisticRegressionInnerCV(ClassifierMixin, BaseEstimator):
    """L2 logistic regression on ``[V, D]`` with ``C`` chosen from ``Cs`` by stratified inner CV (log loss).

    Fitted attributes: ``C_`` (chosen), ``basis_`` ``[D, r]`` (:func:`row_space_basis` of the training rows),
    ``estimator_`` (LogisticRegression refitted on all data, in those r coordinates), ``coef_`` ``[K, D]`` and
    ``intercept_`` (the same model in the D features), ``classes_``.
    """

    def __init__(self, Cs=LOGISTIC_CS, inner_cv: int = 5, random_state: int = 0, max_iter: int = 2000):
        self.Cs = Cs
        self.inner_cv = inner_cv
        self.random_state = random_state
        self.max_iter = max_iter

    def fit(self, X, y, groups=None):
        y = np.asarray(y)
        if np.unique(y).size < 2:
            raise ValueError("classification needs at least two classes in the training data")
        self.basis_ = row_space_basis(X)
        Z = in_basis(X, self.basis_)
        model = LogisticRegression(solver=LOGISTIC_SOLVER, tol=LOGISTIC_TOL, max_iter=self.max_iter)
        folds = self.inner_splits_ = inner_folds(y, self.inner_cv, self.random_state, groups)
        if folds is None:
            self.C_ = FALLBACK_C
            self.estimator_ = model.set_params(C=FALLBACK_C).fit(Z, y)
        else:
            # log loss over every training class, so an inner test part lacking a class (possible when folds are
            # grouped by subject) is still scored instead of failing
            scorer = make_scorer(log_loss, greater_is_better=False, response_method="predict_proba",
                                 labels=np.unique(y))
            search = GridSearchCV(model, {"C": list(self.Cs)}, cv=folds, scoring=scorer).fit(Z, y)
            self.C_ = float(search.best_params_["C"])
            self.estimator_ = search.best_estimator_
        self.classes_ = self.estimator_.classes_
        self.coef_ = self.estimator_.coef_ @ self.basis_.T           # [K, D] (K = 1 for two classes)
        self.intercept_ = self.estimator_.intercept_
        self.n_features_in_ = self.basis_.shape[0]
        return self

    def predict(self, X) -> np.ndarray:
        return self.estimator_.predict(in_basis(X, self.basis_))

    def predict_proba(self, X) -> np.ndarray:
        """``[V, n_classes]`` class probabilities, columns in ``classes_`` order."""
        return self.estimator_.predict_proba(in_basis(X, self.basis_))

    def decision_function(self, X) -> np.ndarray:
        return self.estimator_.decision_function(in_basis(X, self.basis_))


class RidgeInnerCV(RegressorMixin, BaseEstimator):
    """Ridge regression on ``[V, D]`` with ``alpha`` from ``alphas``: efficient leave-one-out (``RidgeCV``) when
    every volume is its own subject, else mean squared error over ``min(inner_cv, subjects)`` subject-grouped
    folds. Fitted: ``alpha_``, ``coef_`` ``[D]``, ``intercept_``, ``inner_splits_`` (None for leave-one-out)."""

    def __init__(self, alphas=RIDGE_ALPHAS, inner_cv: int = 5, random_state: int = 0):
        self.alphas = alphas
        self.inner_cv = inner_cv
        self.random_state = random_state

    def fit(self, X, y, groups=None):
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if groups is None or n_groups(groups) == len(y):
            self.inner_splits_ = None
            model = RidgeCV(alphas=self.alphas).fit(X, y)
            self.alpha_ = float(model.alpha_)
        else:
            self.inner_splits_ = group_splits(min(self.inner_cv, n_groups(groups)), self.random_state, len(y),
                                              groups=groups) if n_groups(groups) >= 2 else None
            if self.inner_splits_ is None:
                self.alpha_ = float(np.median(self.alphas))
            else:
                search = GridSearchCV(Ridge(), {"alpha": list(self.alphas)}, cv=self.inner_splits_,
                                      scoring="neg_mean_squared_error", refit=False).fit(X, y)
                self.alpha_ = float(search.best_params_["alpha"])
            model = Ridge(alpha=self.alpha_).fit(X, y)
        self.coef_, self.intercept_ = model.coef_, model.intercept_
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.coef_ + self.intercept_


class CoxPHInnerCV(BaseEstimator):
    """Ridge-penalised Cox model (scikit-survival, Breslow ties) with ``alpha`` from ``alphas`` chosen by inner CV
    on the C-index (folds: see ``_folds``). ``predict(X [V, D]) -> [V]`` risk (higher = earlier event).

    Fitted attributes: ``alpha_`` (chosen), ``basis_`` ``[D, r]`` (:func:`row_space_basis`), ``estimator_``
    (CoxPHSurvivalAnalysis refitted on all data, in those r coordinates), ``coef_`` ``[D]`` (in the D features),
    ``converged_`` (False when the final fit stopped at ``n_iter`` Newton steps), ``inner_splits_``.
    """

    def __init__(self, alphas=COX_ALPHAS, inner_cv: int = 5, random_state: int = 0, n_iter: int = COX_MAX_ITER):
        self.alphas = alphas
        self.inner_cv = inner_cv
        self.random_state = random_state
        self.n_iter = n_iter

    def fit(self, X, y, groups=None):
        _, event = survival_arrays(y)
        if not event.any():
            raise ValueError("survival needs at least one event in the training data")
        self.basis_ = row_space_basis(X)
        Z = in_basis(X, self.basis_)
        folds = self.inner_splits_ = self._folds(event, groups)
        if folds is None:
            self.alpha_ = FALLBACK_COX_ALPHA
        else:
            search = GridSearchCV(CoxPHSurvivalAnalysis(n_iter=self.n_iter), {"alpha": list(self.alphas)},
                                  cv=folds, scoring=survival_scorer, refit=False).fit(Z, y)
            self.alpha_ = float(search.best_params_["alpha"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            self.estimator_ = CoxPHSurvivalAnalysis(alpha=self.alpha_, n_iter=self.n_iter).fit(Z, y)
        self.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        self.coef_ = self.basis_ @ self.estimator_.coef_                # [D]
        self.n_features_in_ = self.basis_.shape[0]
        return self

    def _folds(self, event: np.ndarray, groups=None) -> list | None:
        """Inner (train, test) index pairs with events in every fold: ``min(inner_cv, n_events, n // 2)`` folds
        (every inner training and test part keeps at least 2 volumes; counted in subjects with ``groups``, and then
        grouped by subject), stratified by the event flag when there are enough censored volumes; None when that
        leaves fewer than 2 folds."""
        if groups is None:
            with_event, without, total = int(event.sum()), int((~event).sum()), len(event)
        else:
            with_event, without, total = n_groups(groups, event), n_groups(groups, ~event), n_groups(groups)
        n_splits = min(self.inner_cv, with_event, total // 2)
        if n_splits < 2:
            return None
        labels = event if without >= n_splits else None
        return group_splits(n_splits, self.random_state, len(event), labels=labels, groups=groups)

    def predict(self, X) -> np.ndarray:
        return self.estimator_.predict(in_basis(X, self.basis_))

    def score(self, X, y) -> float:
        """Harrell's C-index."""
        return survival_scorer(self, X, y)
