"""Pool a volume's per-slice embeddings into one vector, as a scikit-learn transformer over bags."""

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

POOLING_METHODS = {"mean": (np.mean,), "max": (np.max,), "meanmax": (np.mean, np.max)}


def check_bags(bags) -> list[np.ndarray]:
    """Validate a list of bags (each ``[S, D]``, ``S >= 1``, one ``D`` for all) and return them as float32 arrays."""
    arrays = [np.asarray(bag, dtype=np.float32) for bag in bags]
    if not arrays:
        raise ValueError("no bags given")
    for index, bag in enumerate(arrays):
        if bag.ndim != 2 or bag.shape[0] == 0:
            raise ValueError(f"bag {index} has shape {bag.shape}; expected [S, D] with at least one slice")
    widths = {bag.shape[1] for bag in arrays}
    if len(widths) > 1:
        raise ValueError(f"bags have different feature widths {sorted(widths)}")
    return arrays


class SlicePooling(TransformerMixin, BaseEstimator):
    """Bags ``[S_v, D]`` (one per volume, ``S_v`` may differ) → pooled ``[V, D]`` (``mean``, ``max``) or
    ``[V, 2D]`` (``meanmax``: mean then max). Stateless apart from the feature width seen in ``fit``.

    Max pooling keeps a focal finding that lives in few slices, which a mean over all slices washes out.
    """

    def __init__(self, method: str = "mean"):
        self.method = method

    def fit(self, bags, y=None):
        if self.method not in POOLING_METHODS:
            raise ValueError(f"method must be one of {tuple(POOLING_METHODS)}, got {self.method!r}")
        self.n_features_in_ = check_bags(bags)[0].shape[1]
        return self

    def transform(self, bags) -> np.ndarray:
        arrays = check_bags(bags)
        if arrays[0].shape[1] != self.n_features_in_:
            raise ValueError(f"bags have {arrays[0].shape[1]} features; the pooling was fitted on "
                             f"{self.n_features_in_}")
        reductions = POOLING_METHODS[self.method]
        return np.concatenate([np.stack([reduce(bag, axis=0) for bag in arrays]) for reduce in reductions], axis=1)
