"""SimCLR NT-Xent loss (normalised temperature-scaled cross-entropy), the objective BrainIAC was pretrained with.

The 2N embeddings of N images (two views each, all ranks together) are L2-normalised to u. For anchor i with
positive pos(i) (the other view of the same image) and cosine similarities sim(i, j) = u_i . u_j::

    l_i  = -log( exp(sim(i, pos(i)) / tau) / sum_{j != i} exp(sim(i, j) / tau) )
    loss = mean of l_i over the anchors

Every other embedding of the global batch is a negative. Under ``torch.distributed`` each rank gathers all ranks'
embeddings as candidates and averages l_i over its own 2B anchors; the gather passes back to each rank the gradients
that every rank's loss sends to its embeddings, so averaging gradients over ranks (as DDP does) gives exactly the
gradient of the global-batch loss, and the mean of the ranks' losses is the global-batch loss.
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class SimCLRLoss(nn.Module):
    """NT-Xent over two views, with negatives from all ranks when ``gather_distributed`` and distributed."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """z1, z2: [B, D] embeddings of the two views of the same B images (row b of each is image b).

        Returns the scalar float32 mean of l_i over this rank's 2B anchors. All ranks must pass the same B.
        """
        if z1.dim() != 2 or z1.shape != z2.shape:
            raise ValueError(f"z1 and z2 must both be [B, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
        batch = z1.shape[0]
        with torch.autocast(device_type=z1.device.type, enabled=False):
            local = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # [2B, D]: view 1 then view 2
            if self.gather_distributed and _distributed():
                rank, world = dist.get_rank(), dist.get_world_size()
                per_rank = dist_fn.all_gather(local)  # world x [2B, D], differentiable for every part
                view1 = torch.cat([gathered[:batch] for gathered in per_rank])
                view2 = torch.cat([gathered[batch:] for gathered in per_rank])
            else:
                rank, world = 0, 1
                view1, view2 = local[:batch], local[batch:]
            candidates = torch.cat([view1, view2])  # [2N, D], N = world * B: all views 1, then all views 2
            n_images = world * batch

            image = torch.arange(rank * batch, (rank + 1) * batch, device=z1.device)
            anchor_index = torch.cat([image, image + n_images])  # rows of `candidates` that are `local`
            positive_index = torch.cat([image + n_images, image])
            logits = local @ candidates.T / self.temperature  # [2B, 2N]
            is_self = torch.zeros_like(logits, dtype=torch.bool)
            is_self[torch.arange(2 * batch, device=z1.device), anchor_index] = True
            logits = logits.masked_fill(is_self, -torch.inf)
            return F.cross_entropy(logits, positive_index)
