"""Deterministic acquisition effects that :mod:`braindino.augment.intensity` does not have (yet): additive
Gaussian and Rician noise, and thick slices (lower through-plane resolution).

Same conventions as ``intensity``: images ``[B, C, H, W]`` float tensors about ``[0, 1]``, per-sample parameters as
``[B]`` tensors; randomness only from an explicit ``torch.Generator`` on the images' device, so a result is
fixed by the generator's seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def add_gaussian_noise(images: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x + std[b] * n`` with ``n ~ N(0, 1)`` drawn from ``generator``. images ``[B, C, H, W]``, std ``[B]``."""
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return images + _per_sample(std.to(images.dtype)) * noise


def add_rician_noise(images: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Magnitude image of complex data with Gaussian noise in both channels: ``sqrt((x + s n1)^2 + (s n2)^2)``
    (``s = std[b]``; ``n1`` then ``n2`` drawn from ``generator``). Rician: biased upwards where the signal is low,
    as in the background of a real magnitude image. images ``[B, C, H, W]``, std ``[B]``."""
    scale = _per_sample(std.to(images.dtype))
    real = images + scale * torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    imaginary = scale * torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return torch.sqrt(real * real + imaginary * imaginary)


def thick_slices(stack: torch.Tensor, factor: int) -> torch.Tensor:
    """Acquire ``factor``-times thicker slices and resample them back onto the original slice grid.

    stack ``[Z, C, H, W]`` (slices along dim 0, e.g. the axial planes of a volume) → same shape: the mean of each
    block of ``factor`` consecutive slices (the last block padded by repeating the last slice), then linear
    interpolation between block centres (``align_corners=False``, so block ``b`` sits at slice
    ``b * factor + (factor - 1) / 2``). ``factor`` 1 returns the stack unchanged.
    """
    if factor < 1:
        raise ValueError(f"slice thickness factor must be at least 1, got {factor}")
    if factor == 1:
        return stack
    depth = stack.shape[0]
    padded_depth = math.ceil(depth / factor) * factor
    columns = stack.permute(1, 2, 3, 0).reshape(1, -1, depth)                        # [1, C*H*W, Z]
    columns = F.pad(columns, (0, padded_depth - depth), mode="replicate")
    thick = F.avg_pool1d(columns, kernel_size=factor, stride=factor)                   # [1, C*H*W, Z/factor]
    resampled = F.interpolate(thick, size=padded_depth, mode="linear", align_corners=False)[..., :depth]
    return resampled.reshape(*stack.shape[1:], depth).permute(3, 0, 1, 2).contiguous()
