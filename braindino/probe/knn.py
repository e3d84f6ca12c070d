"""Weighted k-nearest-neighbour probe as in DINO's kNN evaluation (Caron et al. 2021, ``eval_knn.py``).

Features are L2-normalised; the k training vectors of highest cosine similarity vote with weight
``exp(similarity / T)`` (T = 0.07). Classification: class probabilities = normalised weighted votes. Regression:
the weighted mean of the neighbours' targets. ``k`` is chosen from ``ks`` (capped at n_train − 1) by leave-one-out
on the training vectors only (balanced accuracy / mean absolute error), so no test vector is ever looked at; with
``groups`` (the subject of each training vector) a vector's vote leaves out every vector of its own subject, not
only itself.
"""

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.metrics import balanced_accuracy_score, mean_absolute_error
from sklearn.preprocessing import normalize

DEFAULT_KS = (10, 20)
TEMPERATURE = 0.07


class KNNProbe(BaseEstimator):
    """``fit(X [n, P], y [n])`` → ``predict(X [m, P]) -> [m]``; classification also ``predict_proba -> [m, C]``
    (columns in ``classes_`` order). Fitted: ``k_`` (chosen), ``classes_`` (classification)."""

    def __init__(self, task: str = "classification", ks=DEFAULT_KS, temperature: float = TEMPERATURE):
        self.task = task
        self.ks = ks
        self.temperature = temperature

    def fit(self, X, y, groups=None):
        if self.task not in ("classification", "regression"):
            raise ValueError(f"the kNN probe predicts classes or numbers, not {self.task!r}")
        self.X_ = normalize(np.asarray(X, dtype=np.float64))
        y = np.asarray(y)
        if self.task == "classification":
            self.classes_, self.y_ = np.unique(y, return_inverse=True)
        else:
            self.y_ = y.astype(np.float64)
        similarity = self._loo_similarity(groups)
        available = int(np.isfinite(similarity).sum(axis=1).min()) if len(self.y_) else 0   # fewest voters a row has
        candidates = sorted({max(1, min(int(k), len(self.y_) - 1)) for k in self.ks})
        self.k_ = candidates[0]
        if len(self.y_) > 2 and len(candidates) > 1 and available >= 1:
            candidates = sorted({min(k, available) for k in candidates})
            losses = [self._loss(self._vote(similarity, k)) for k in candidates]
            self.k_ = candidates[int(np.argmin(losses))]
        return self

    def _loo_similarity(self, groups=None) -> np.ndarray:
        """[n, n] cosine similarities of the training vectors with each vector's own entry, and with ``groups``
        [n] every entry of its own subject, set to -inf (left out of its leave-one-out vote)."""
        similarity = self.X_ @ self.X_.T
        np.fill_diagonal(similarity, -np.inf)
        if groups is not None:
            groups = np.asarray(groups)
            similarity[groups[:, None] == groups[None, :]] = -np.inf
        return similarity

    def _vote(self, similarity: np.ndarray, k: int) -> np.ndarray:
        """[m, C] normalised class votes or [m] weighted means from similarities [m, n_train]."""
        k = min(k, similarity.shape[1])
        neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]                   # [m, k]
        top = np.take_along_axis(similarity, neighbours, axis=1)
        weights = np.exp((top - top.max(axis=1, keepdims=True)) / self.temperature)      # stable exp(s / T)
        weights = np.where(np.isfinite(top), weights, 0.0)
        labels = self.y_[neighbours]
        if self.task == "classification":
            votes = np.zeros((len(similarity), len(self.classes_)))
            np.add.at(votes, (np.arange(len(similarity))[:, None], labels), weights)
            return votes / votes.sum(axis=1, keepdims=True)
        return (weights * labels).sum(axis=1) / weights.sum(axis=1)

    def _loss(self, out: np.ndarray) -> float:
        if self.task == "classification":
            return -balanced_accuracy_score(self.y_, out.argmax(axis=1))
        return mean_absolute_error(self.y_, out)

    def _out(self, X) -> np.ndarray:
        return self._vote(normalize(np.asarray(X, dtype=np.float64)) @ self.X_.T, self.k_)

    def predict_proba(self, X) -> np.ndarray:
        """[m, C] class probabilities (classification)."""
        return self._out(X)

    def predict(self, X) -> np.ndarray:
        out = self._out(X)
        return self.classes_[out.argmax(axis=1)] if self.task == "classification" else out
