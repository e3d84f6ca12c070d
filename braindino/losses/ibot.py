"""iBOT masked-patch loss: the student predicts the teacher's prototype distribution of patches it did not see.

For the M masked tokens (row j belongs to image b(j), which has n_b masked tokens) and I = number of images with at
least one masked token::

    CE_j = -sum_k  p_t[j, k] * log_softmax(z_s[j, :] / tau_s)[k]

    loss = sum_j  w_j * CE_j,      w_j = 1 / (I * n_b(j))

Each masked image counts equally, however many of its tokens were masked: an image with 1 masked token weighs as much
as one with 10. The student saw mask tokens at these positions; the teacher saw the real patches. The token weights
``w`` depend only on the masks, so they are computed with them (on the CPU, in the data loader) and the loss itself
needs nothing read back from the device.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_token_weights(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``masks [B, N]`` bool → (``indices [M]`` int64 flat row-major positions of the masked tokens,
    ``weights [M]`` float32 ``1 / (I * n_b(j))``); both empty when nothing is masked."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2:
        raise ValueError(f"masks must be [B, N], got shape {masks.shape}")
    indices = np.flatnonzero(masks)
    masked_per_image = masks.sum(axis=1)
    n_masked_images = int((masked_per_image > 0).sum())
    weights = 1.0 / (n_masked_images * masked_per_image[indices // masks.shape[1]].astype(np.float64))
    return indices.astype(np.int64), weights.astype(np.float32)


class IBOTPatchLoss(nn.Module):
    """Per-image averaged cross-entropy between teacher and student patch prototypes at masked positions."""

    def __init__(self, student_temp: float = 0.1):
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp

    def forward(self, student_patch_logits: Tensor, teacher_patch_probs: Tensor, token_weights: Tensor) -> Tensor:
        """Scalar float32 loss.

        student_patch_logits: [M, K] student logits of the masked tokens.
        teacher_patch_probs: [M, K] teacher probabilities of the same tokens (rows sum to 1).
        token_weights: [M] from :func:`masked_token_weights` (rows follow its ``indices``).
        A batch without any masked token (M = 0) gives 0, still attached to the student graph.
        """
        if (student_patch_logits.shape != teacher_patch_probs.shape
                or student_patch_logits.shape[:1] != token_weights.shape):
            raise ValueError(f"expected student and teacher [M, K] with M = {token_weights.shape[0]} masked tokens, "
                             f"got {tuple(student_patch_logits.shape)} and {tuple(teacher_patch_probs.shape)}")
        with torch.autocast(device_type=student_patch_logits.device.type, enabled=False):
            student_log_probs = F.log_softmax(student_patch_logits.float() / self.student_temp, dim=-1)
            token_cross_entropy = -(teacher_patch_probs.float() * student_log_probs).sum(dim=-1)
        return (token_cross_entropy * token_weights.float()).sum()
