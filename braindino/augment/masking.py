"""iBOT/BEiT-style block masks on the ViT patch grid, and the per-batch mask sampler.

A mask is built from random rectangular blocks (area at least ``min_block_patches``, aspect ratio log-uniform in
``[1 / max_aspect, max_aspect]``), each accepted only if the patches it newly masks fit in the remaining budget.
When no block fits any more (budget below ``min_block_patches``, or ``BLOCK_ATTEMPTS`` rejected draws in a row),
the mask is topped up one patch at a time with random unmasked patches 4-adjacent to the masked ones (a random
patch if nothing is masked yet), so every mask has exactly the requested number of patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from braindino.losses.ibot import masked_token_weights

BLOCK_ATTEMPTS = 10
"""Block draws tried before the block phase gives up and the top-up phase finishes the mask."""


class BlockMaskGenerator:
    """Block masks on a ``grid_size = (h, w)`` patch grid; ``__call__(n_masked, rng)`` -> ``[h, w]`` bool."""

    def __init__(self, grid_size: tuple[int, int], min_block_patches: int = 4, max_aspect: float = 3.0):
        height, width = grid_size
        if height < 1 or width < 1:
            raise ValueError(f"grid size must be positive, got {grid_size}")
        if min_block_patches < 1:
            raise ValueError(f"min_block_patches must be >= 1, got {min_block_patches}")
        if max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
        self.grid_size = (int(height), int(width))
        self.min_block_patches = int(min_block_patches)
        self.log_aspect_limit = math.log(max_aspect)

    @property
    def n_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def __call__(self, n_masked: int, rng: np.random.Generator) -> np.ndarray:
        """``[h, w]`` bool mask with exactly ``n_masked`` True patches."""
        if not 0 <= n_masked <= self.n_patches:
            raise ValueError(f"cannot mask {n_masked} patches of a {self.grid_size} grid")
        mask = np.zeros(self.grid_size, dtype=bool)
        n_done = 0
        while n_done < n_masked:
            added = self._add_block(mask, n_masked - n_done, rng)
            if added == 0:
                break
            n_done += added
        self._top_up(mask, n_masked - n_done, rng)
        return mask

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Mask one random block adding between 1 and ``budget`` new patches; returns how many (0 if none fit)."""
        height, width = self.grid_size
        if budget < self.min_block_patches:
            return 0
        for _ in range(BLOCK_ATTEMPTS):
            area = rng.uniform(self.min_block_patches, budget)
            aspect = math.exp(rng.uniform(-self.log_aspect_limit, self.log_aspect_limit))
            block_height = int(round(math.sqrt(area * aspect)))
            block_width = int(round(math.sqrt(area / aspect)))
            if not (1 <= block_height <= height and 1 <= block_width <= width):
                continue
            top = int(rng.integers(0, height - block_height + 1))
            left = int(rng.integers(0, width - block_width + 1))
            block = mask[top : top + block_height, left : left + block_width]
            newly_masked = int(block.size - block.sum())
            if 0 < newly_masked <= budget:
                block[...] = True
                return newly_masked
        return 0

    def _top_up(self, mask: np.ndarray, missing: int, rng: np.random.Generator) -> None:
        """Mask ``missing`` more patches in place, each a random unmasked 4-neighbour of the masked region."""
        for _ in range(missing):
            neighbours = np.zeros_like(mask)
            neighbours[1:] |= mask[:-1]
            neighbours[:-1] |= mask[1:]
            neighbours[:, 1:] |= mask[:, :-1]
            neighbours[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(neighbours & ~mask)
            if candidates.size == 0:
                candidates = np.flatnonzero(~mask)
            mask.flat[rng.choice(candidates)] = True


def sample_mask_array(
    batch_size: int,
    grid_size: tuple[int, int],
    mask_ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``[B, h * w]`` bool patch masks for a batch (row-major patch order), like DINOv2's collate.

    ``m = round(B * mask_sample_probability)`` (halves round up) images, chosen at random, get block masks; the
    ``i``-th of them masks ``round(r_i * h * w)`` patches with ``r_i ~ U(edges[i], edges[i + 1])``,
    ``edges = linspace(*mask_ratio_range, m + 1)``, so the ratios spread evenly over the range; the other images
    get no masked patch. ``rng`` is required (the default ``None`` raises).
    """
    if rng is None:
        raise ValueError("sample_mask_array needs rng=np.random.default_rng(seed) for reproducible masks")
    low, high = mask_ratio_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"mask_ratio_range must satisfy 0 <= low <= high <= 1, got {mask_ratio_range}")
    if not 0.0 <= mask_sample_probability <= 1.0:
        raise ValueError(f"mask_sample_probability must be in [0, 1], got {mask_sample_probability}")
    generator = BlockMaskGenerator(grid_size)
    n_patches = generator.n_patches
    n_masked_images = int(math.floor(batch_size * mask_sample_probability + 0.5))
    edges = np.linspace(low, high, n_masked_images + 1)
    masks = np.zeros((batch_size, n_patches), dtype=bool)
    masked_images = rng.permutation(batch_size)[:n_masked_images]
    for rank, image in enumerate(masked_images):
        ratio = rng.uniform(edges[rank], edges[rank + 1])
        masks[image] = generator(int(math.floor(ratio * n_patches + 0.5)), rng).reshape(-1)
    return masks


def sample_batch_masks(
    batch_size: int,
    grid_size: tuple[int, int],
    mask_ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """``sample_mask_array`` as a ``[B, h * w]`` bool tensor."""
    return torch.from_numpy(sample_mask_array(batch_size, grid_size, mask_ratio_range, mask_sample_probability, rng))


@dataclass
class MaskBatch:
    """One step's iBOT masks with everything derived from them, built on the CPU (in a data-loader worker).

    masks ``[B, N]`` bool (``True`` = masked); indices ``[M]`` int64, the masked tokens' flat row-major positions
    in ``[B, N]`` (the student and teacher gather patch tokens with them, a gather whose size the host knows);
    weights ``[M]`` float32, the iBOT loss weight of each masked token (see ``braindino.losses.ibot``).
    """

    masks: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def from_masks(cls, masks: np.ndarray) -> MaskBatch:
        indices, weights = masked_token_weights(masks)
        return cls(torch.from_numpy(np.ascontiguousarray(masks)), torch.from_numpy(indices),
                   torch.from_numpy(weights))

    def pin_memory(self) -> MaskBatch:
        """Page-locked copies, so that ``to(cuda, non_blocking=True)`` is a true asynchronous copy."""
        return MaskBatch(self.masks.pin_memory(), self.indices.pin_memory(), self.weights.pin_memory())

    def to(self, device: torch.device, non_blocking: bool = False) -> MaskBatch:
        return MaskBatch(*(t.to(device, non_blocking=non_blocking) for t in (self.masks, self.indices,
                                                                             self.weights)))


@dataclass(frozen=True)
class IBOTMaskSampler:
    """Picklable recipe for one step's masks: ``sampler(n_images, rng) -> MaskBatch`` (see ``sample_batch_masks``)."""

    grid_size: tuple
    mask_ratio_range: tuple = (0.1, 0.5)
    mask_sample_probability: float = 0.5

    def __call__(self, n_images: int, rng: np.random.Generator) -> MaskBatch:
        return MaskBatch.from_masks(sample_mask_array(n_images, self.grid_size, self.mask_ratio_range,
                                                      self.mask_sample_probability, rng))
