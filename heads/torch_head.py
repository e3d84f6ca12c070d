"""Shared fit / predict machinery of the small torch heads (MLP, attention-MIL).

A subclass turns its inputs into tensors and builds a network whose ``forward(*inputs)`` returns ``[V, n_outputs]``;
this base class encodes the targets per task, trains full-batch with AdamW under a private seeded RNG (the global
torch RNG is left untouched, and a fit is deterministic given ``random_state``), and decodes the outputs:

- classification: ``n_classes`` logits, cross-entropy; ``predict`` → labels, ``predict_proba`` → ``[V, n_classes]``
- regression: one output, MSE on the standardised target; ``predict`` → target units
- survival: one output, Cox partial likelihood (Breslow); ``predict`` → risk score (higher = earlier event)
"""

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from sklearn.preprocessing import LabelEncoder

from heads.cox import cox_partial_likelihood_loss
from heads.targets import check_task, survival_arrays, task_score


class TorchHead(BaseEstimator, ABC):
    """Base class; subclasses implement ``_fit_inputs``, ``_inputs`` and ``_build_network``."""

    @abstractmethod
    def _fit_inputs(self, X) -> tuple[torch.Tensor, ...]:
        """Fit input standardisation on ``X``, set ``n_features_in_`` and return the network's input tensors."""

    @abstractmethod
    def _inputs(self, X) -> tuple[torch.Tensor, ...]:
        """The network's input tensors for ``X`` (standardised with the fitted statistics)."""

    @abstractmethod
    def _build_network(self, n_outputs: int) -> torch.nn.Module:
        """A fresh network (built under the seeded RNG) mapping the input tensors to ``[V, n_outputs]``."""

    def fit(self, X, y):
        check_task(self.task)
        inputs = self._fit_inputs(X)
        targets, n_outputs = self._encode_targets(y)
        if len(targets[0]) != len(inputs[0]):
            raise ValueError(f"{len(inputs[0])} inputs but {len(targets[0])} targets")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            self.network_ = self._build_network(n_outputs)
            optimiser = torch.optim.AdamW(self.network_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            self.network_.train()
            for _ in range(self.epochs):
                optimiser.zero_grad()
                loss = self._loss(self.network_(*inputs), targets)
                loss.backward()
                optimiser.step()
        self.network_.eval()
        return self

    def _encode_targets(self, y) -> tuple[tuple[torch.Tensor, ...], int]:
        """Targets as tensors for :meth:`_loss`, and the number of network outputs."""
        if self.task == "classification":
            encoder = LabelEncoder()
            codes = encoder.fit_transform(np.asarray(y))
            self.classes_ = encoder.classes_
            if len(self.classes_) < 2:
                raise ValueError("classification needs at least two classes in the training data")
            return (torch.as_tensor(codes, dtype=torch.long),), len(self.classes_)
        if self.task == "regression":
            values = np.asarray(y, dtype=np.float64)
            self.target_mean_, self.target_scale_ = float(values.mean()), float(values.std() or 1.0)
            standardised = (values - self.target_mean_) / self.target_scale_
            return (torch.as_tensor(standardised, dtype=torch.float32),), 1
        time, event = survival_arrays(y)
        if not event.any():
            raise ValueError("survival needs at least one event in the training data")
        return (torch.as_tensor(time, dtype=torch.float32), torch.as_tensor(event)), 1

    def _loss(self, outputs: torch.Tensor, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``outputs`` ``[V, n_outputs]`` against the encoded targets."""
        if self.task == "classification":
            return F.cross_entropy(outputs, targets[0])
        if self.task == "regression":
            return F.mse_loss(outputs[:, 0], targets[0])
        return cox_partial_likelihood_loss(outputs[:, 0], *targets)

    def _outputs(self, X) -> torch.Tensor:
        with torch.no_grad():
            return self.network_(*self._inputs(X))

    def predict(self, X) -> np.ndarray:
        """``[V]``: class labels, regression values, or survival risk scores."""
        outputs = self._outputs(X)
        if self.task == "classification":
            return self.classes_[outputs.argmax(dim=1).numpy()]
        if self.task == "regression":
            return outputs[:, 0].double().numpy() * self.target_scale_ + self.target_mean_
        return outputs[:, 0].double().numpy()

    def predict_proba(self, X) -> np.ndarray:
        """``[V, n_classes]`` class probabilities (classification only), columns in ``classes_`` order."""
        if self.task != "classification":
            raise ValueError(f"predict_proba is for classification, not {self.task}")
        return torch.softmax(self._outputs(X), dim=1).double().numpy()

    def score(self, X, y) -> float:
        """Accuracy (classification), R² (regression) or Harrell's C-index (survival)."""
        return task_score(self.task, y, self.predict(X))


def standardisation(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale ``[D]`` of ``features`` ``[M, D]`` (scale 1 for constant features)."""
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    return mean.astype(np.float32), np.where(scale > 0, scale, 1.0).astype(np.float32)
