"""The networks behind an :class:`~braindino.encoder.Encoder`: a timm ViT (braindino's own, a random one, or a
natural-image one) and the non-deep pixel baseline.

Every backbone maps ``x`` ``[B, 1, S, S]`` (slices in [0, 1] already resized to the encoder's input size ``S``) to
``{"cls": [B, D], "mean_patch": [B, D], "patch": [B, N, P], "hemispheres": [B, 2, P]}`` (``N = h·w`` patch grid
cells, row-major; ``P`` the patch feature width: ``D`` for a ViT).

``hemispheres`` (:func:`hemisphere_means`): the mean patch feature of each half of the patch grid's rows. A stored
slice's rows run along X towards the patient's Right (RAS canonical, crop centred on the head, so the midline is
about the centre row), hence ``[:, 0]`` = rows ``< h/2`` (patient Left), ``[:, 1]`` = rows ``>= h/2`` (patient
Right); for odd ``h`` the middle row counts half in each. A one-sided finding shows as a difference between the two.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn


def hemisphere_means(patch: Tensor, rows: int) -> Tensor:
    """``patch`` ``[B, N, P]`` (a row-major grid of ``rows`` rows) → ``[B, 2, P]``: mean over the patches of rows
    ``< rows/2`` (patient Left) and of rows ``>= rows/2`` (patient Right); an odd grid's middle row is weighted ½ in
    each half (both halves then weigh ``rows/2`` rows; a one-row grid gives its mean twice)."""
    batch, cells, width = patch.shape
    if rows < 1 or cells % rows:
        raise ValueError(f"a patch grid of {cells} cells has no {rows} equal rows")
    row_means = patch.float().reshape(batch, rows, cells // rows, width).mean(dim=2)        # [B, h, P]
    position = torch.arange(rows, device=patch.device, dtype=torch.float32) + 0.5           # row centres
    left = (rows / 2 - position + 0.5).clamp(0, 1)                                          # 1, .., ½ (odd), 0
    weights = torch.stack([left, left.flip(0)]) / (rows / 2)                                # [2, h], rows sum 1
    return torch.einsum("sh,bhp->bsp", weights, row_means)


class ViTBackbone(nn.Module):
    """A timm ``VisionTransformer`` with tokens ``[CLS, registers.., patches..]``.

    ``in_chans`` 3 (natural-image models): the grey slice is replicated to RGB and normalised with ``mean`` / ``std``
    (the model's ``pretrained_cfg``); ``in_chans`` 1 (braindino models): fed as is (a normalisation that
    ``init_from`` folded into the patch embedding is already in the weights). ``patch`` is the patch tokens
    after the final norm ``[B, N, D]``; ``mean_patch`` their mean; ``cls`` the class token (or, for a ViT without
    one, the mean of the patch tokens); ``hemispheres`` ``[B, 2, D]`` the patch tokens' mean per half of the grid.
    """

    def __init__(self, vit: VisionTransformer, mean=None, std=None):
        super().__init__()
        self.vit = vit
        channels = vit.patch_embed.proj.in_channels
        self.replicate = channels
        self.register_buffer("mean", torch.tensor(mean or (0.0,) * channels).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(std or (1.0,) * channels).view(1, channels, 1, 1))

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = (x.expand(-1, self.replicate, -1, -1) - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        tokens = self.vit.forward_features(x)                      # [B, prefix + N, D]
        patch = tokens[:, self.vit.num_prefix_tokens:]
        mean_patch = patch.mean(dim=1)
        cls = tokens[:, 0] if self.vit.cls_token is not None else mean_patch
        rows = x.shape[-2] // self.vit.patch_embed.patch_size[0]
        return {"cls": cls, "mean_patch": mean_patch, "patch": patch,
                "hemispheres": hemisphere_means(patch, rows)}


class PixelsBackbone(nn.Module):
    """Non-deep baseline on a ``grid x grid`` layout of an ``S x S`` slice (``S`` divisible by ``grid``).

    ``cls`` ``[B, grid²]``: the slice area-averaged down to ``grid x grid``, flattened row-major.
    ``mean_patch`` ``[B, grid²]``: histogram of the foreground (> 0) intensities in ``grid²`` equal bins over
    (0, 1], normalised to sum 1 (all zeros for an empty slice).
    ``patch`` ``[B, grid², (S/grid)²]``: the raw pixels of each ``S/grid`` square patch, row-major (so the patch
    token width is ``(S/grid)²``, not ``D``).
    ``hemispheres`` ``[B, 2, (S/grid)²]``: the mean of those raw-pixel patches per half of the grid's rows (so the
    same width as ``patch``): each half's average ``S/grid`` square, which a bright one-sided lesion brightens.
    """

    def __init__(self, grid: int):
        super().__init__()
        self.grid = grid

    @property
    def embed_dim(self) -> int:
        return self.grid * self.grid

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = x.float()
        batch, side = x.shape[0], x.shape[-1]
        cls = F.adaptive_avg_pool2d(x, self.grid).flatten(1)
        bins = self.grid * self.grid
        flat = x.flatten(1)
        foreground = flat > 0
        which = (flat * bins).ceil().clamp(1, bins).long() - 1                 # (k-1)/bins < v <= k/bins -> bin k-1
        counts = torch.zeros(batch, bins, dtype=torch.float32, device=x.device)
        counts.scatter_add_(1, which, foreground.float())
        mean_patch = counts / counts.sum(1, keepdim=True).clamp_min(1.0)
        cell = side // self.grid
        patch = F.unfold(x, kernel_size=cell, stride=cell).transpose(1, 2)      # [B, grid², cell²]
        return {"cls": cls, "mean_patch": mean_patch, "patch": patch, "hemispheres": hemisphere_means(patch, self.grid)}


def weights_digest(module: nn.Module) -> hashlib._Hash:
    """sha256 running over every state-dict tensor (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{data.dtype}\0{tuple(data.shape)}\0".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest
