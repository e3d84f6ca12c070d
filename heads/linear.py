"""Linear heads on pooled features ``[V, D]``: standardisation + a penalised linear model whose penalty is chosen by
inner cross-validation on the training data only (nothing of a test fold is ever seen).

Probes have far more features than training volumes (D = 384-1,536 for a few dozen volumes), so the logistic and Cox
heads fit in the span of the training rows (:func:`row_space_basis`): an L2-penalised linear model's weights lie in
that span, so fitting the ``r <= V`` coordinates there is the same model as fitting all D features, D / r times
cheaper for every inner-CV fit. ``coef_`` is reported in the D standardised features.
"""

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxPHSurvivalAnalysis

from heads.targets import check_task, survival_arrays, survival_scorer

LOGISTIC_CS = tuple(np.logspace(-4, 2, 13))      # inverse L2 strength on standardised features
RIDGE_ALPHAS = tuple(np.logspace(-2, 5, 15))
COX_ALPHAS = tuple(np.logspace(-1, 4, 11))       # ridge penalty on the (summed) Cox log partial likelihood
# Newton-CG: on separable training data (most probes: D >> V) L-BFGS needs thousands of iterations at large C; Newton
# steps in the r <= V row-space coordinates need a few dozen (10-20x faster on the demo's probes, same solutions).
LOGISTIC_SOLVER = "newton-cg"
LOGISTIC_TOL = 1e-6                         # Newton-CG gradient tolerance (sklearn's 1e-4 left ~5e-5 in probabilities)
FALLBACK_C = 1.0                            # used when a class (or the events) is too rare for inner folds
FALLBACK_COX_ALPHA = 10.0


def make_linear_head(task: str, inner_cv: int = 5, random_state: int = 0) -> Pipeline:
    """A ``StandardScaler`` + linear model pipeline for ``task``; ``fit(X [V, D], y)``, ``predict(X) -> [V]``.

    - classification: :class:`LogisticRegressionInnerCV` (``C`` by stratified inner CV on log loss; ``predict_proba``)
    - regression: ``RidgeCV`` (``alpha`` by efficient leave-one-out CV)
    - survival: :class:`CoxPHInnerCV` (ridge ``alpha`` by inner CV on the C-index); ``predict`` → risk score
    """
    check_task(task)
    if task == "classification":
        model = LogisticRegressionInnerCV(inner_cv=inner_cv, random_state=random_state)
    elif task == "regression":
        model = RidgeCV(alphas=RIDGE_ALPHAS)
    else:
        model = CoxPHInnerCV(inner_cv=inner_cv, random_state=random_state)
    return make_pipeline(StandardScaler(), model)


def inner_folds(groups: np.ndarray, inner_cv: int, random_state: int) -> StratifiedKFold | None:
    """Stratified inner folds over class labels ``groups`` ``[V]``, or None if impossible.

    The number of folds is ``min(inner_cv, smallest group count)``, so every fold holds every group; with a group
    of one member no stratified split exists and the caller falls back to a fixed penalty.
    """
    n_splits = min(inner_cv, int(np.unique(groups, return_counts=True)[1].min()))
    if n_splits < 2:
        return None
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=random_state)


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

    def fit(self, X, y):
        y = np.asarray(y)
        if np.unique(y).size < 2:
            raise ValueError("classification needs at least two classes in the training data")
        self.basis_ = row_space_basis(X)
        Z = in_basis(X, self.basis_)
        model = LogisticRegression(solver=LOGISTIC_SOLVER, tol=LOGISTIC_TOL, max_iter=self.max_iter)
        folds = inner_folds(y, self.inner_cv, self.random_state)
        if folds is None:
            self.C_ = FALLBACK_C
            self.estimator_ = model.set_params(C=FALLBACK_C).fit(Z, y)
        else:
            search = GridSearchCV(model, {"C": list(self.Cs)}, cv=folds, scoring="neg_log_loss").fit(Z, y)
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


class CoxPHInnerCV(BaseEstimator):
    """Ridge-penalised Cox model (scikit-survival, Breslow ties) with ``alpha`` from ``alphas`` chosen by inner CV
    on the C-index (folds: see ``_folds``). ``predict(X [V, D]) -> [V]`` risk (higher = earlier event).

    Fitted attributes: ``alpha_`` (chosen), ``basis_`` ``[D, r]`` (:func:`row_space_basis`), ``estimator_``
    (CoxPHSurvivalAnalysis refitted on all data, in those r coordinates), ``coef_`` ``[D]`` (in the D features).
    """

    def __init__(self, alphas=COX_ALPHAS, inner_cv: int = 5, random_state: int = 0):
        self.alphas = alphas
        self.inner_cv = inner_cv
        self.random_state = random_state

    def fit(self, X, y):
        _, event = survival_arrays(y)
        if not event.any():
            raise ValueError("survival needs at least one event in the training data")
        self.basis_ = row_space_basis(X)
        Z = in_basis(X, self.basis_)
        folds = self._folds(event)
        if folds is None:
            self.alpha_ = FALLBACK_COX_ALPHA
            self.estimator_ = CoxPHSurvivalAnalysis(alpha=FALLBACK_COX_ALPHA).fit(Z, y)
        else:
            search = GridSearchCV(CoxPHSurvivalAnalysis(), {"alpha": list(self.alphas)},
                                  cv=folds, scoring=survival_scorer).fit(Z, y)
            self.alpha_ = float(search.best_params_["alpha"])
            self.estimator_ = search.best_estimator_
        self.coef_ = self.basis_ @ self.estimator_.coef_                # [D]
        self.n_features_in_ = self.basis_.shape[0]
        return self

    def _folds(self, event: np.ndarray) -> list | None:
        """Inner (train, test) index pairs with events in every fold: ``min(inner_cv, n_events, n // 2)`` folds
        (every inner training and test part keeps at least 2 volumes), stratified by the event flag when there are
        enough censored volumes; None when that leaves fewer than 2 folds."""
        n_splits = min(self.inner_cv, int(event.sum()), len(event) // 2)
        if n_splits < 2:
            return None
        if (~event).sum() >= n_splits:
            return list(StratifiedKFold(n_splits, shuffle=True, random_state=self.random_state).split(event, event))
        return list(KFold(n_splits, shuffle=True, random_state=self.random_state).split(event))

    def predict(self, X) -> np.ndarray:
        return self.estimator_.predict(in_basis(X, self.basis_))

    def score(self, X, y) -> float:
        """Harrell's C-index."""
        return survival_scorer(self, X, y)
