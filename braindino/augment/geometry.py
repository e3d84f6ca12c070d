"""Batched random resized crops with left-right flip and rotation, resampled in one ``grid_sample`` call.

Each crop is an axis-aligned box in the input image (chosen like torchvision's ``RandomResizedCrop``: an area
fraction and a log-uniform aspect ratio, placed uniformly so the box stays inside the image), then mirrored and
rotated about its centre, and resampled to a square output. All crops of a batch become one ``[N, 2, 3]`` affine
matrix stack and are resampled by a single ``F.affine_grid`` + ``F.grid_sample`` (bilinear, zero padding,
``align_corners=False``), so the whole batch runs on the images' device without a Python loop over samples.

Coordinates are continuous pixel-edge coordinates: ``x`` runs over columns ``[0, W]``, ``y`` over rows ``[0, H]``,
pixel ``(row i, col j)`` has its centre at ``(x, y) = (j + 0.5, i + 0.5)``. Crop boxes are sampled uniformly over
the image (no foreground bias). Resampling is plain bilinear (no antialiasing); crops shrunk by more than ~1.5x
alias slightly, as with ``F.interpolate(antialias=False)``. Rotated corners that leave the image read zeros, which
matches the black MRI background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from braindino.augment.sampling import check_generator, check_image_batch, uniform

CROP_ATTEMPTS = 10
"""Scale/ratio draws per crop; the first that fits in the image is used (torchvision's default count)."""


@dataclass(frozen=True)
class CropParameters:
    """Geometry of ``N`` crops, in input-image pixels.

    centers: ``[N, 2]`` float, ``(x, y)`` of the crop centre (pixel-edge coordinates, see module docstring).
    sizes: ``[N, 2]`` float, ``(width, height)`` of the crop box before rotation.
    flips: ``[N]`` bool, mirror the crop left-right: along the rows, which run along the R axis in the store's
    slice layout (rows = X/Right, columns = Y/Anterior; see ``braindino.ingest.preprocess``).
    angles_deg: ``[N]`` float, rotation in degrees; positive turns the content counter-clockwise as displayed
        (row 0 at the top), so ``+90`` on a full square crop equals ``torch.rot90(image, 1, dims=(-2, -1))``.
    """

    centers: torch.Tensor
    sizes: torch.Tensor
    flips: torch.Tensor
    angles_deg: torch.Tensor


def _fallback_size(image_size: tuple[int, int], ratio: tuple[float, float]) -> tuple[float, float]:
    """``(width, height)`` used when no draw fits: the largest centred box whose aspect is clamped to ``ratio``."""
    height, width = image_size
    image_ratio = width / height
    if image_ratio < ratio[0]:
        return float(width), width / ratio[0]
    if image_ratio > ratio[1]:
        return height * ratio[1], float(height)
    return float(width), float(height)


def sample_crop_parameters(
    n_crops: int,
    image_size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_p: float,
    max_rotation_deg: float,
    generator: torch.Generator,
    device: torch.device,
) -> CropParameters:
    """Draw ``n_crops`` crop geometries for images of ``image_size = (H, W)``.

    scale: range of the crop area as a fraction of ``H * W``; ratio: range of width/height, drawn log-uniformly.
    Up to ``CROP_ATTEMPTS`` draws per crop, vectorised; the first that fits is kept, and a crop with no fitting draw
    gets the largest centred box with its aspect clamped into ``ratio`` (torchvision's fallback). Box sizes are
    continuous (not rounded to pixels). flip_p: probability of a left-right flip; rotation angle ~
    ``U(-max_rotation_deg, max_rotation_deg)``.
    """
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"crop scale range must satisfy 0 < low <= high, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop aspect-ratio range must satisfy 0 < low <= high, got {ratio}")
    if max_rotation_deg < 0:
        raise ValueError(f"max_rotation_deg must be >= 0, got {max_rotation_deg}")
    height, width = image_size
    draws = (n_crops, CROP_ATTEMPTS)
    area = height * width * uniform(draws, scale[0], scale[1], generator, device)
    aspect = torch.exp(uniform(draws, math.log(ratio[0]), math.log(ratio[1]), generator, device))
    crop_widths = torch.sqrt(area * aspect)
    crop_heights = torch.sqrt(area / aspect)
    fits = (crop_widths <= width) & (crop_heights <= height)
    first_fit = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    fallback_width, fallback_height = _fallback_size(image_size, ratio)
    any_fit = fits.any(dim=1)
    crop_widths = torch.where(any_fit, crop_widths.gather(1, first_fit).squeeze(1), fallback_width)
    crop_heights = torch.where(any_fit, crop_heights.gather(1, first_fit).squeeze(1), fallback_height)

    left = uniform((n_crops,), 0.0, 1.0, generator, device) * (width - crop_widths)
    top = uniform((n_crops,), 0.0, 1.0, generator, device) * (height - crop_heights)
    flips = uniform((n_crops,), 0.0, 1.0, generator, device) < flip_p
    angles = uniform((n_crops,), -max_rotation_deg, max_rotation_deg, generator, device)
    return CropParameters(
        centers=torch.stack([left + crop_widths / 2, top + crop_heights / 2], dim=1),
        sizes=torch.stack([crop_widths, crop_heights], dim=1),
        flips=flips,
        angles_deg=angles,
    )


def crop_affine_matrices(parameters: CropParameters, image_size: tuple[int, int]) -> torch.Tensor:
    """``[N, 2, 3]`` matrices mapping output normalised coordinates to input normalised coordinates.

    An output point ``(u, v)`` in ``[-1, 1]^2`` goes to the input pixel point
    ``center + R(angle) @ (u * width / 2, s * v * height / 2)`` with ``s = -1`` when flipped (a mirror of the
    rows: left-right in the store's slice layout, where rows run along the R axis), which is then
    normalised by the input size as ``F.grid_sample(align_corners=False)`` expects.
    """
    height, width = image_size
    angles = torch.deg2rad(parameters.angles_deg)
    cos, sin = torch.cos(angles), torch.sin(angles)
    mirror = 1.0 - 2.0 * parameters.flips.to(angles.dtype)
    half_width = parameters.sizes[:, 0] / 2
    half_height = parameters.sizes[:, 1] / 2 * mirror   # rows run along R-L: this flip is left-right anatomy
    center_x = parameters.centers[:, 0] * (2 / width) - 1
    center_y = parameters.centers[:, 1] * (2 / height) - 1
    row_x = torch.stack([cos * half_width * (2 / width), -sin * half_height * (2 / width), center_x], dim=1)
    row_y = torch.stack([sin * half_width * (2 / height), cos * half_height * (2 / height), center_y], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def apply_crops(images: torch.Tensor, parameters: CropParameters, output_size: int) -> torch.Tensor:
    """Resample crop ``n`` of ``images[n]``: ``[N, C, H, W]`` -> ``[N, C, S, S]`` with ``S = output_size``."""
    theta = crop_affine_matrices(parameters, tuple(images.shape[-2:])).to(images.dtype)
    grid = sampling_grid(theta, output_size)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def sampling_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, [N, C, size, size], align_corners=False)`` (``theta`` ``[N, 2, 3]`` -> ``[N, size,
    size, 2]``, equal up to float rounding), computed as two broadcast multiply-adds: the output pixel centres are a
    separable ``(x_j, y_i)`` lattice, so ``theta @ (x_j, y_i, 1)`` needs no batched matrix product (affine_grid's
    ``bmm`` with an inner size of 3 was 7× slower on a CPU, a tenth of the augmentation's time)."""
    centres = (torch.arange(size, dtype=theta.dtype, device=theta.device) * 2 + 1) / size - 1
    rows, columns = centres.view(1, size, 1), centres.view(1, 1, size)
    coefficients = theta.view(-1, 2, 3, 1, 1)
    grid = torch.empty((theta.shape[0], size, size, 2), dtype=theta.dtype, device=theta.device)
    for axis in range(2):   # grid[..., axis] = theta[:, axis, 0] * x + theta[:, axis, 1] * y + theta[:, axis, 2]
        offset = coefficients[:, axis, 2] + coefficients[:, axis, 1] * rows
        torch.addcmul(offset, coefficients[:, axis, 0], columns, out=grid[..., axis])
    return grid


def random_resized_crop(
    images: torch.Tensor,
    output_size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    max_rotation_deg: float = 0.0,
) -> torch.Tensor:
    """One random crop per image: ``[N, C, H, W]`` -> ``[N, C, S, S]``; ``generator`` on ``images.device``."""
    check_image_batch(images)
    check_generator(generator, images.device)
    parameters = sample_crop_parameters(
        images.shape[0], images.shape[-2:], scale, ratio, flip_p, max_rotation_deg, generator, images.device
    )
    return apply_crops(images, parameters, output_size)
