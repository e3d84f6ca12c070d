"""iBOT masked-patch loss: the student predicts the teacher's prototype distribution of patches it did not see.

For the M masked tokens (row j belongs to image b(j), which has n_b masked tokens) and I = number of images with at
least one masked token::

    CE_j = -sum_k  p_t[j, k] * log_softmax(z_s[j, :] / tau_s)[k]

    loss = 1/I * sum_j  CE_j / n_b(j)

Each masked image counts equally, however many of its tokens were masked: an image with 1 masked token weighs as much
as one with 10. The student saw mask tokens at these positions; the teacher saw the real patches.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class IBOTPatchLoss(nn.Module):
    """Per-image averaged cross-entropy between teacher and student patch prototypes at masked positions."""

    def __init__(self, student_temp: float = 0.1):
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp

    def forward(self, student_patch_logits: Tensor, teacher_patch_probs: Tensor, masks: Tensor) -> Tensor:
        """Scalar float32 loss.

        student_patch_logits: [M, K] student logits of the masked tokens.
        teacher_patch_probs: [M, K] teacher probabilities of the same tokens (rows sum to 1).
        masks: [B, N] bool, True where a patch token was masked. Rows of the two [M, K] inputs follow
            ``masks.nonzero()`` (row-major over [B, N]: image 0's masked tokens first, in token order).
        A batch without any masked token gives 0, still attached to the student graph.
        """
        if masks.dim() != 2 or masks.dtype != torch.bool:
            raise ValueError(f"masks must be a [B, N] bool tensor, got {masks.dtype} {tuple(masks.shape)}")
        masked_per_image = masks.sum(dim=1)
        n_masked = int(masked_per_image.sum())
        if student_patch_logits.shape != teacher_patch_probs.shape or student_patch_logits.shape[0] != n_masked:
            raise ValueError(f"expected student and teacher [M, K] with M = {n_masked} masked tokens, got "
                             f"{tuple(student_patch_logits.shape)} and {tuple(teacher_patch_probs.shape)}")
        if n_masked == 0:
            return student_patch_logits.float().sum() * 0.0

        with torch.autocast(device_type=student_patch_logits.device.type, enabled=False):
            student_log_probs = F.log_softmax(student_patch_logits.float() / self.student_temp, dim=-1)
            token_cross_entropy = -(teacher_patch_probs.float() * student_log_probs).sum(dim=-1)
        image_of_token = masks.nonzero()[:, 0]
        token_weight = 1.0 / masked_per_image[image_of_token].float()
        n_masked_images = (masked_per_image > 0).sum()
        return (token_cross_entropy * token_weight).sum() / n_masked_images
