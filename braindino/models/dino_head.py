"""DINO / iBOT projection head: MLP -> bottleneck -> L2 normalisation -> weight-normalised prototype layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

# Floor on the bottleneck norm before dividing; large enough to stay non-zero in fp16/bf16.
_NORMALIZE_EPS = 1e-6


class DINOHead(nn.Module):
    """Maps backbone embeddings to logits over ``out_dim`` prototypes.

    ``n_layers`` Linear layers (GELU between them) take ``in_dim`` through ``hidden_dim`` to ``bottleneck_dim``; the
    bottleneck vector is L2-normalised and multiplied by the prototype matrix ``[out_dim, bottleneck_dim]``, whose rows
    are kept at unit norm: the weight is weight-normalised (``W = g * V / ||V||`` row-wise) with ``g`` fixed to 1 and
    not trained. Logits are therefore cosine similarities in ``[-1, 1]``; the losses' temperatures set their scale.

    ``batchnorm`` (DINO v1's ``use_bn``) puts a BatchNorm after each hidden Linear, always on the batch's own
    statistics (no running averages, so the teacher normalises like the student and nothing but parameters is
    averaged by the EMA; under DDP each process normalises over its local batch). It removes what every slice of
    the batch shares before the bottleneck, so the cosine logits differ between slices from the first step.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        batchnorm: bool = False,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        widths = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if index < n_layers - 1:
                if batchnorm:
                    layers.append(nn.BatchNorm1d(width_out, track_running_stats=False))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

        prototypes = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(prototypes.weight, std=0.02)
        self.last_layer = weight_norm(prototypes)
        row_norm = self.last_layer.parametrizations.weight.original0  # g: [out_dim, 1]
        with torch.no_grad():
            row_norm.fill_(1.0)
        row_norm.requires_grad_(False)

    def forward(self, x: Tensor, return_bottleneck: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``[..., in_dim]`` embeddings -> ``[..., out_dim]`` logits; with ``return_bottleneck`` also the
        L2-normalised bottleneck ``[..., bottleneck_dim]`` the logits are cosines of (the contrastive warm-up's
        embedding)."""
        bottleneck = F.normalize(self.mlp(x.flatten(0, -2)).unflatten(0, x.shape[:-1]), p=2, dim=-1,
                                 eps=_NORMALIZE_EPS)
        logits = self.last_layer(bottleneck)
        return (logits, bottleneck) if return_bottleneck else logits

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The trainable prototype parameters (the direction ``V``); DINO keeps them fixed for the first iterations."""
        return [parameter for parameter in self.last_layer.parameters() if parameter.requires_grad]
