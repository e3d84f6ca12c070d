"""Gated attention-MIL over the slices of a volume (Ilse, Tomczak & Welling, ICML 2018).

Each bag (one volume) is its per-slice embeddings ``[S, D]``. Slices are embedded ``h_s = ReLU(W x_s)``, weighted by
``a_s = softmax_s(w^T (tanh(V h_s) * sigmoid(U h_s)))`` and summed into one bag embedding ``z = sum_s a_s h_s``, which
a linear layer maps to the task's outputs. The weights ``a`` say which slices the prediction rests on (saliency).
"""

import numpy as np
import torch
from torch import nn

from heads.pooling import check_bags
from heads.torch_head import TorchHead, standardisation


class GatedAttentionMIL(nn.Module):
    """``x`` ``[V, S, D]`` with ``mask`` ``[V, S]`` (True = real slice) → outputs ``[V, n_outputs]``."""

    def __init__(self, n_features: int, hidden: int, attention_dim: int, n_outputs: int, dropout: float):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention_dim)
        self.attention_u = nn.Linear(hidden, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden, n_outputs)

    def embed_and_attend(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice embeddings ``h`` ``[V, S, hidden]`` and attention weights ``a`` ``[V, S]`` (0 on padding)."""
        h = self.embed(x)
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h)))[..., 0]
        return h, torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, weights = self.embed_and_attend(x, mask)
        return self.classifier(torch.einsum("vs,vsh->vh", weights, h))


class AttentionMILHead(TorchHead):
    """Gated attention-MIL head: ``fit(bags, y)``, ``predict(bags) -> [V]``, ``predict_proba(bags)``,
    ``attention(bags) -> list of [S_v]`` weights summing to 1 per bag.

    ``bags`` is a list of ``[S_v, D]`` arrays (slice counts may differ); features are standardised with the mean and
    scale of all training slices. Trained full-batch (bags zero-padded to the longest, padding masked out) with
    AdamW; deterministic given ``random_state``. Per-task losses and outputs: see :mod:`heads.torch_head`.
    """

    def __init__(self, task: str, hidden: int = 128, attention_dim: int = 64, epochs: int = 300, lr: float = 1e-3,
                 weight_decay: float = 1e-2, dropout: float = 0.1, random_state: int = 0):
        self.task = task
        self.hidden = hidden
        self.attention_dim = attention_dim
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.random_state = random_state

    def _fit_inputs(self, bags) -> tuple[torch.Tensor, torch.Tensor]:
        arrays = check_bags(bags)
        self.feature_mean_, self.feature_scale_ = standardisation(np.concatenate(arrays))
        self.n_features_in_ = arrays[0].shape[1]
        return self._inputs(arrays)

    def _inputs(self, bags) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded standardised bags ``[V, S_max, D]`` and their mask ``[V, S_max]``."""
        arrays = check_bags(bags)
        if arrays[0].shape[1] != self.n_features_in_:
            raise ValueError(f"bags have {arrays[0].shape[1]} features; the head was fitted on {self.n_features_in_}")
        lengths = np.array([len(bag) for bag in arrays])
        padded = np.zeros((len(arrays), lengths.max(), self.n_features_in_), dtype=np.float32)
        for index, bag in enumerate(arrays):
            padded[index, :len(bag)] = (bag - self.feature_mean_) / self.feature_scale_
        mask = np.arange(lengths.max())[None, :] < lengths[:, None]
        return torch.from_numpy(padded), torch.from_numpy(mask)

    def _build_network(self, n_outputs: int) -> GatedAttentionMIL:
        return GatedAttentionMIL(self.n_features_in_, self.hidden, self.attention_dim, n_outputs, self.dropout)

    def attention(self, bags) -> list[np.ndarray]:
        """Per-bag slice weights: a list of ``[S_v]`` float arrays, each summing to 1."""
        x, mask = self._inputs(bags)
        with torch.no_grad():
            weights = self.network_.embed_and_attend(x, mask)[1].double().numpy()
        return [row[:length] for row, length in zip(weights, mask.sum(dim=1).tolist())]
