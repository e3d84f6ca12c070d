"""Teacher targets: turn teacher prototype logits into the probabilities the student is trained to match.

Two ways to keep the teacher from collapsing onto one prototype (K = number of prototypes):

* **Centering + sharpening** (DINO). A running centre ``c`` [1, K] is subtracted before a low-temperature softmax::

      p_t = softmax((t - c) / tau_t)                 over the K prototypes
      c  <- m * c + (1 - m) * mean_i t_i             mean over every row of every rank

  Subtracting ``c`` stops one prototype from dominating; a small ``tau_t`` stops the output from going uniform.

* **Sinkhorn-Knopp** (SwAV / DINOv2). The M x K matrix ``Q = exp(t / tau_t)`` is rescaled alternately so that
  every prototype receives the same total mass (columns) and every sample is a distribution (rows), which forces the
  batch to use all prototypes equally.

Both work under ``torch.distributed``: batch statistics are summed over all ranks with ``all_reduce``.
"""

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class TeacherCentering(nn.Module):
    """DINO centering of teacher logits with an exponential moving average of their batch mean.

    ``center`` is a registered buffer [1, K], so it is saved in ``state_dict`` and training resumes exactly.
    """

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def probabilities(self, teacher_logits: Tensor, temperature: float) -> Tensor:
        """``softmax((t - center) / temperature)`` over the last axis; [..., K] -> [..., K] float32."""
        if teacher_logits.shape[-1] != self.center.shape[-1]:
            raise ValueError(f"teacher logits have {teacher_logits.shape[-1]} prototypes, centre has "
                             f"{self.center.shape[-1]}")
        return torch.softmax((teacher_logits.float() - self.center) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        """``center <- m * center + (1 - m) * mean(t)``, the mean over all rows [..., K] of all ranks.

        Rows are counted, not ranks averaged, so ranks with different numbers of rows are weighted correctly.
        """
        rows = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
        sum_and_count = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
        if _distributed():
            dist.all_reduce(sum_and_count)
        count = sum_and_count[-1]
        batch_mean = (sum_and_count[:-1] / count.clamp_min(1.0)).unsqueeze(0)
        # no rows on any rank (e.g. no masked patch this step): the centre stays, decided without a host sync
        updated = self.center * self.momentum + batch_mean * (1.0 - self.momentum)
        self.center.copy_(torch.where(count > 0, updated, self.center))


def _global_column_logsumexp(log_q: Tensor) -> Tensor:
    """``log sum_i exp(log_q[i, k])`` over the rows of all ranks; [M, K] -> [1, K]."""
    if log_q.shape[0] > 0:
        column_max = log_q.amax(dim=0, keepdim=True)
    else:
        column_max = log_q.new_full((1, log_q.shape[1]), -math.inf)
    if _distributed():
        dist.all_reduce(column_max, op=dist.ReduceOp.MAX)
    column_sum = torch.exp(log_q - column_max).sum(dim=0, keepdim=True)
    if _distributed():
        dist.all_reduce(column_sum)
    return column_max + torch.log(column_sum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, temperature: float, n_iterations: int = 3) -> Tensor:
    """Balanced soft assignment of M samples (all ranks together) to K prototypes; [M, K] -> [M, K] float32.

    Starting from ``Q = exp(t / temperature)`` each iteration applies::

        Q[:, k] <- Q[:, k] / sum_i Q[i, k] / K        every prototype gets total mass 1/K   (sum over all ranks)
        Q[i, :] <- Q[i, :] / sum_k Q[i, k] / M        every sample gets total mass 1/M

    and the result is ``M * Q``: each row sums to 1 exactly, and each column sums to M/K up to the error left after
    ``n_iterations``. The scale factors 1/K and 1/M cancel in the next normalisation, so the loop runs in log space
    without them, which cannot overflow for small temperatures. Ranks may hold different numbers of rows.
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher logits must be [M, K], got shape {tuple(teacher_logits.shape)}")
    log_q = teacher_logits.float() / temperature
    for _ in range(n_iterations):
        log_q = log_q - _global_column_logsumexp(log_q)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q.exp()
