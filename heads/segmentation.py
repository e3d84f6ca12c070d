"""A linear segmentation decoder on frozen patch tokens (the segmentation probe of DINOv2, with a Dice term).

Patch tokens ``[n, N, D]`` of ``n`` slices (``N = grid_h * grid_w`` in row-major patch order, as a ViT flattens
its patch grid) → LayerNorm → one linear map per patch to ``C`` logits ``[n, C, grid_h, grid_w]`` → bilinear
upsampling (``align_corners=False``) to the slice ``[n, C, size, size]``. Trained with cross-entropy + soft Dice (mean over the
foreground classes 1..C-1, pooled over each mini-batch) by AdamW in seeded mini-batches.
"""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from torch import nn

DICE_SMOOTH = 1.0


class PatchLinearDecoder(nn.Module):
    """``tokens`` ``[n, N, D]`` → logits ``[n, C, size, size]``."""

    def __init__(self, n_features: int, n_classes: int, grid: tuple[int, int], slice_size: int):
        super().__init__()
        self.grid, self.slice_size = grid, slice_size
        self.norm = nn.LayerNorm(n_features)
        self.classify = nn.Linear(n_features, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.classify(self.norm(tokens))                                   # [n, N, C]
        logits = logits.transpose(1, 2).reshape(len(tokens), -1, *self.grid)        # [n, C, gh, gw]
        return F.interpolate(logits, size=(self.slice_size, self.slice_size), mode="bilinear", align_corners=False)


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over foreground classes: ``logits`` ``[n, C, H, W]``, ``masks`` ``[n, H, W]`` long."""
    probabilities = torch.softmax(logits, dim=1)[:, 1:]                             # [n, C-1, H, W]
    one_hot = F.one_hot(masks, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probabilities.dtype)
    overlap = (probabilities * one_hot).sum(dim=(0, 2, 3))
    total = probabilities.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    return 1.0 - ((2 * overlap + DICE_SMOOTH) / (total + DICE_SMOOTH)).mean()


class SegmentationDecoder(BaseEstimator):
    """``fit(patch [n, N, D], masks [n, size, size] int in 0..C-1)``; ``predict_proba(patch) -> [n, C, size, size]``
    float32; ``predict(patch) -> [n, size, size]`` int64 labels. ``grid`` is the ``(h, w)`` patch grid; ``size`` is
    ``slice_size``. Deterministic given ``random_state``.
    """

    def __init__(self, n_classes: int, grid: tuple[int, int], slice_size: int, epochs: int = 20,
                 batch_size: int = 32, lr: float = 1e-2, weight_decay: float = 1e-4, dice_weight: float = 1.0,
                 random_state: int = 0):
        self.n_classes = n_classes
        self.grid = grid
        self.slice_size = slice_size
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.dice_weight = dice_weight
        self.random_state = random_state

    def fit(self, patch, masks):
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be at least 2 (background + foreground), got {self.n_classes}")
        tokens = self._check_tokens(patch, fitted=False)
        labels = np.asarray(masks)
        if labels.shape != (len(tokens), self.slice_size, self.slice_size):
            raise ValueError(f"masks must be [{len(tokens)}, {self.slice_size}, {self.slice_size}], "
                             f"got {labels.shape}")
        if labels.min() < 0 or labels.max() >= self.n_classes:
            raise ValueError(f"mask labels must lie in 0..{self.n_classes - 1}, got {labels.min()}..{labels.max()}")
        labels = torch.from_numpy(labels.astype(np.int64))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            self.network_ = PatchLinearDecoder(self.n_features_in_, self.n_classes, tuple(self.grid),
                                               self.slice_size)
            optimiser = torch.optim.AdamW(self.network_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            for _ in range(self.epochs):
                for batch in torch.randperm(len(tokens)).split(self.batch_size):
                    logits = self.network_(_batch_tensor(tokens, batch))
                    loss = (F.cross_entropy(logits, labels[batch])
                            + self.dice_weight * soft_dice_loss(logits, labels[batch]))
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
        self.network_.eval()
        return self

    def predict_proba(self, patch) -> np.ndarray:
        """``[n, C, size, size]`` float32 class probabilities per pixel."""
        tokens = self._check_tokens(patch, fitted=True)
        with torch.no_grad():
            batches = [torch.softmax(self.network_(_batch_tensor(tokens, batch)), dim=1)
                       for batch in torch.arange(len(tokens)).split(self.batch_size)]
        return torch.cat(batches).numpy()

    def predict(self, patch) -> np.ndarray:
        """``[n, size, size]`` int64 most probable class per pixel."""
        return self.predict_proba(patch).argmax(axis=1).astype(np.int64)

    def score(self, patch, masks) -> float:
        """Mean Dice over the foreground classes, pooled over all given slices."""
        return dice_score(self.predict(patch), np.asarray(masks), self.n_classes)

    def _check_tokens(self, patch, fitted: bool) -> np.ndarray:
        """``patch`` ``[n, N, D]`` (any float dtype; kept as is and converted per batch to save memory)."""
        tokens = np.asarray(patch)
        n_patches = int(np.prod(self.grid))
        if tokens.ndim != 3 or tokens.shape[1] != n_patches:
            raise ValueError(f"patch tokens must be [n, {n_patches}, D] for grid {tuple(self.grid)}, "
                             f"got {tokens.shape}")
        if not fitted:
            self.n_features_in_ = tokens.shape[2]
        elif tokens.shape[2] != self.n_features_in_:
            raise ValueError(f"patch tokens have {tokens.shape[2]} features; the decoder was fitted on "
                             f"{self.n_features_in_}")
        return tokens


def dice_score(predicted: np.ndarray, truth: np.ndarray, n_classes: int) -> float:
    """Mean over foreground classes 1..C-1 of ``2|P ∩ T| / (|P| + |T|)`` over all pixels of ``[n, H, W]`` label maps
    (a class absent from both counts as 1)."""
    scores = []
    for label in range(1, n_classes):
        p, t = predicted == label, truth == label
        total = p.sum() + t.sum()
        scores.append(1.0 if total == 0 else 2.0 * np.logical_and(p, t).sum() / total)
    return float(np.mean(scores))


def _batch_tensor(tokens: np.ndarray, batch: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(tokens[batch.numpy()], dtype=np.float32))
