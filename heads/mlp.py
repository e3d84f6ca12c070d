"""A small torch MLP head on pooled features ``[V, D]`` for classification, regression or survival."""

import numpy as np
import torch
from torch import nn

from heads.torch_head import TorchHead, standardisation


class MLPHead(TorchHead):
    """Standardised ``[V, D]`` → Linear(D, hidden) → GELU → Dropout → Linear(hidden, n_outputs).

    Trained full-batch with AdamW for ``epochs`` steps; deterministic given ``random_state``. See
    :mod:`heads.torch_head` for the per-task losses and outputs.
    """

    def __init__(self, task: str, hidden: int = 128, epochs: int = 300, lr: float = 3e-3,
                 weight_decay: float = 1e-2, dropout: float = 0.1, random_state: int = 0):
        self.task = task
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.random_state = random_state

    def _fit_inputs(self, X) -> tuple[torch.Tensor]:
        features = _as_matrix(X)
        self.feature_mean_, self.feature_scale_ = standardisation(features)
        self.n_features_in_ = features.shape[1]
        return self._inputs(features)

    def _inputs(self, X) -> tuple[torch.Tensor]:
        features = _as_matrix(X)
        if features.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {features.shape[1]} features; the head was fitted on {self.n_features_in_}")
        return (torch.from_numpy((features - self.feature_mean_) / self.feature_scale_),)

    def _build_network(self, n_outputs: int) -> nn.Module:
        return nn.Sequential(nn.Linear(self.n_features_in_, self.hidden), nn.GELU(), nn.Dropout(self.dropout),
                             nn.Linear(self.hidden, n_outputs))


def _as_matrix(X) -> np.ndarray:
    features = np.asarray(X, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"X must be [V, D], got shape {features.shape}")
    return features
