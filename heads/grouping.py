"""Subject groups for inner cross-validation: several samples (volumes) of one subject never sit on both sides of
an inner split, or the penalty search and the brain-age slope are tuned on near-copies of their own test samples.

``groups`` ``[V]`` (any hashable: the subject of each sample) is an optional ``fit`` argument of every head with an
inner search; ``None`` means one sample per subject.
"""

import inspect

import numpy as np
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold


def accepts_groups(estimator) -> bool:
    """Whether ``estimator.fit`` (for a Pipeline: its final step's) takes a ``groups`` argument."""
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    return "groups" in inspect.signature(final.fit).parameters


def fit_grouped(estimator, X, y, groups=None):
    """``estimator.fit(X, y)`` with ``groups`` routed to the estimator (a Pipeline's final step) when it takes them
    and they are given; returns the fitted estimator."""
    if groups is None or not accepts_groups(estimator):
        return estimator.fit(X, y)
    if hasattr(estimator, "steps"):
        return estimator.fit(X, y, **{f"{estimator.steps[-1][0]}__groups": np.asarray(groups)})
    return estimator.fit(X, y, groups=np.asarray(groups))


def take(X, index):
    """Rows ``index`` of an array or of a list of bags."""
    return X[index] if isinstance(X, np.ndarray) else [X[i] for i in index]


def group_splits(n_splits: int, random_state: int, n: int, labels=None, groups=None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner (train, test) index pairs over ``n`` samples: stratified by ``labels`` [n] when given, grouped by
    ``groups`` [n] when given (``StratifiedGroupKFold`` / ``GroupKFold``; else ``StratifiedKFold`` / ``KFold``), all
    shuffled by ``random_state``."""
    dummy = np.zeros((n, 1))
    if groups is None:
        splitter = (StratifiedKFold(n_splits, shuffle=True, random_state=random_state) if labels is not None
                    else KFold(n_splits, shuffle=True, random_state=random_state))
        return list(splitter.split(dummy, labels))
    if labels is not None:
        splitter = StratifiedGroupKFold(n_splits, shuffle=True, random_state=random_state)
        return list(splitter.split(dummy, labels, groups))
    splitter = GroupKFold(n_splits, shuffle=True, random_state=random_state)
    return list(splitter.split(dummy, groups=groups))


def n_groups(groups, index=None) -> int:
    """Distinct groups among ``index`` (all when None)."""
    values = np.asarray(groups) if index is None else np.asarray(groups)[index]
    return len(np.unique(values))
