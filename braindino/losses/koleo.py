"""KoLeo regulariser: spread features uniformly over the sphere (Kozachenko-Leonenko entropy estimator).

For a batch of B features, L2-normalised to x_i, with nn(i) the nearest other row by cosine similarity::

    d_i  = || x_i - x_nn(i) ||_2
    loss = -1/B * sum_i log(d_i + eps)

Minimising it pushes every feature away from its nearest neighbour, which raises the differential entropy of the
feature distribution. Adjacent MRI slices give near-duplicate or identical rows: ``eps`` keeps the loss finite there,
and the gradient of ``||.||`` at an exact duplicate (d_i = 0) is 0, so gradients stay finite too.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """Negative mean log distance of each L2-normalised feature to its nearest neighbour in the batch."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps

    def forward(self, features: Tensor) -> Tensor:
        """features [B, D] (B >= 2, any float dtype) -> scalar float32 loss, computed with autocast disabled."""
        if features.dim() != 2 or features.shape[0] < 2:
            raise ValueError(f"features must be [B, D] with B >= 2, got {tuple(features.shape)}")
        with torch.autocast(device_type=features.device.type, enabled=False):
            unit = F.normalize(features.float(), dim=-1, eps=self.eps)
            with torch.no_grad():
                similarity = unit @ unit.T
                similarity.fill_diagonal_(-torch.inf)
                nearest = similarity.argmax(dim=1)
            distance = torch.linalg.vector_norm(unit - unit[nearest], dim=-1)
            return -torch.log(distance + self.eps).mean()
