"""DINO loss: the student's CLS prototype distribution of every crop matches the teacher's of every other view.

With student crops ``s`` (G_s global crops then L local crops), teacher global crops ``t`` (G_t), batch size B and
K prototypes::

    CE(s, t) = 1/B * sum_b  -sum_k  p_t[t, b, k] * log_softmax(z_s[s, b, :] / tau_s)[k]

    loss = mean of CE(s, t) over all pairs (s, t), except s = global crop i with t = global crop i

The excluded pairs are a crop compared with itself: the student and teacher saw the same view there.
``p_t`` are teacher probabilities (centred and sharpened, or Sinkhorn-Knopp), see ``braindino.losses.teacher``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DINOLoss(nn.Module):
    """Cross-entropy between teacher probabilities and student log-probabilities over crop pairs."""

    def __init__(self, student_temp: float = 0.1):
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp

    def forward(self, student_global: Tensor, student_local: Tensor | None, teacher_probs: Tensor) -> Tensor:
        """Scalar float32 loss.

        student_global: [G_s, B, K] student logits of the global crops.
        student_local: [L, B, K] student logits of the local crops, or None.
        teacher_probs: [G_t, B, K] teacher probabilities of the global crops (rows sum to 1).
        """
        crops = student_global if student_local is None else torch.cat([student_global, student_local], dim=0)
        if crops.dim() != 3 or teacher_probs.dim() != 3 or crops.shape[1:] != teacher_probs.shape[1:]:
            raise ValueError(f"expected student [S, B, K] and teacher [G_t, B, K] with the same B and K, got "
                             f"{tuple(crops.shape)} and {tuple(teacher_probs.shape)}")
        n_student, batch, _ = crops.shape
        n_teacher = teacher_probs.shape[0]
        same_view = torch.zeros(n_student, n_teacher, dtype=torch.bool, device=crops.device)
        n_same = min(student_global.shape[0], n_teacher)
        same_view[:n_same, :n_same] = torch.eye(n_same, dtype=torch.bool, device=crops.device)
        n_pairs = n_student * n_teacher - n_same
        if n_pairs == 0:
            raise ValueError("no (student crop, teacher crop) pair compares different views")

        with torch.autocast(device_type=crops.device.type, enabled=False):
            student_log_probs = F.log_softmax(crops.float() / self.student_temp, dim=-1)
            # cross_entropy[s, t] = CE(s, t), summed over the batch here and divided by B below.
            cross_entropy = -torch.einsum("tbk,sbk->st", teacher_probs.float(), student_log_probs)
        return cross_entropy.masked_fill(same_view, 0.0).sum() / (batch * n_pairs)
