"""Turn one canonical volume into normalised, fixed-size axial slices.

Steps: foreground mask -> robust intensity window (percentiles of foreground voxels) -> in-plane resampling of the
axial stack to ``spacing_mm`` -> one crop/pad window of ``[size, size]`` centred on the foreground bounding box (the
same window for every slice) -> slice selection by foreground fraction -> clip and scale to [0, 1], background 0.

Slice layout: ``slices[k]`` is the axial plane ``z = z_indices[k]`` of :attr:`Volume.data` with rows running along X
(towards Right) and columns along Y (towards Anterior), after resampling and cropping. Resampled pixel ``(r, c)``
sits at output pixel ``(r - crop_offset[0], c - crop_offset[1])``.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from braindino.errors import InputError
from braindino.ingest.config import FOREGROUND_METHODS, PreprocessConfig
from braindino.ingest.head_mask import head_mask
from braindino.ingest.readers import Volume

AUTO_NONZERO_MIN_ZERO_FRACTION = 0.3   # "auto" considers "nonzero" only with at least this share of exact zeros
AUTO_AIR_LEVEL = 0.05   # "air": below this share of the 99th percentile of the non-zero voxels' magnitudes
MAX_RESAMPLED_SIDE_IN_SIZES = 4        # a resampled in-plane side longer than 4 x size means a wrong voxel size
MAX_IN_PLANE_EXTENT_MM = 600.0         # no head is this wide; larger extents come from voxel sizes in wrong units
UNITS_HINT = ("check the voxel size and its units in the header (NIfTI pixdim and xyzt_units: metres or microns "
              "instead of mm?) and fix them or re-export the image")


@dataclass
class PreprocessedVolume:
    """Kept axial slices of one volume.

    ``slices`` ``[K, size, size]`` float16 in [0, 1] (background 0); ``z_indices`` ``[K]`` int32 (Z index in
    :attr:`Volume.data`); ``foreground_fraction`` ``[K]`` float32 (share of the window that is foreground);
    ``affine`` ``[4, 4]`` and ``spacing`` are the canonical volume's; ``crop_offset`` (row, col) is where the output
    window starts in the resampled in-plane grid of shape ``resampled_shape`` (negative = zero padding);
    ``foreground_extent_mm`` is the size of the whole volume's foreground bounding box along X, Y, Z in mm.
    """

    slices: np.ndarray
    z_indices: np.ndarray
    foreground_fraction: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    crop_offset: tuple[int, int]
    resampled_shape: tuple[int, int]
    foreground_extent_mm: tuple[float, float, float]


def preprocess_volume(volume: Volume, config: PreprocessConfig) -> PreprocessedVolume:
    """Preprocess ``volume.data`` ``[X, Y, Z]`` into ``[K, size, size]`` slices; raises InputError if none remain."""
    data = volume.data
    if not np.any(data):
        raise InputError(volume.source_path, "all voxels are zero", "check that the file holds the intended image")
    mask = foreground_mask(data, config.foreground)
    if not np.any(mask):
        raise InputError(volume.source_path, f"no foreground found (method '{config.foreground}')",
                         "check the image, or choose another foreground method")
    low, high = np.percentile(data[mask], config.clip_percentiles)
    if not high > low:
        raise InputError(volume.source_path, "foreground intensity is constant between the clip percentiles",
                         "check that the file is an intensity image and not a mask or label map")

    extent_mm = np.asarray(data.shape[:2]) * np.asarray(volume.spacing[:2])
    resampled_shape = tuple(max(1, int(round(mm / config.spacing_mm))) for mm in extent_mm)     # (H, W)
    _check_in_plane_extent(volume, extent_mm, resampled_shape, config)
    mask_stack = _resample_stack(mask.transpose(2, 0, 1), resampled_shape)                      # [Z, H, W]
    crop_offset = _window_offset(mask_stack.any(axis=0), config.size)
    mask_window = _crop_or_pad(mask_stack, crop_offset, config.size)                            # [Z, size, size]
    fraction = mask_window.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)
    keep = np.flatnonzero(fraction >= config.min_foreground_fraction).astype(np.int32)
    if keep.size == 0:
        raise InputError(volume.source_path, f"no axial slice has at least {config.min_foreground_fraction:.0%} "
                                             f"foreground in a {config.size}x{config.size} window",
                         "check the image orientation and voxel size, or lower min_foreground_fraction")

    data_stack = _resample_stack(data.transpose(2, 0, 1)[keep], resampled_shape)               # [K, H, W]
    window = _crop_or_pad(data_stack, crop_offset, config.size)
    scaled = np.clip((window - np.float32(low)) / np.float32(high - low), 0.0, 1.0)
    scaled *= mask_window[keep]
    return PreprocessedVolume(
        slices=scaled.astype(np.float16),
        z_indices=keep,
        foreground_fraction=fraction[keep],
        affine=volume.affine,
        spacing=volume.spacing,
        crop_offset=crop_offset,
        resampled_shape=resampled_shape,
        foreground_extent_mm=_extent_mm(mask, volume.spacing),
    )


def _extent_mm(mask: np.ndarray, spacing) -> tuple[float, float, float]:
    """Size in mm of the bounding box of the non-empty ``mask`` ``[X, Y, Z]`` along each axis (voxels x spacing)."""
    extent = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(other for other in range(3) if other != axis)))
        extent.append(float((present[-1] - present[0] + 1) * spacing[axis]))
    return tuple(extent)


def _check_in_plane_extent(volume: Volume, extent_mm: np.ndarray, resampled_shape: tuple[int, int],
                           config: PreprocessConfig) -> None:
    """Refuse an axial plane wider than ``MAX_IN_PLANE_EXTENT_MM`` or resampling to a side longer than
    ``MAX_RESAMPLED_SIDE_IN_SIZES * size`` pixels (``extent_mm`` [2], mm along X and Y): both point to voxel sizes
    stored in the wrong units, and would otherwise allocate huge resampled stacks."""
    longest_side = MAX_RESAMPLED_SIDE_IN_SIZES * config.size
    if max(extent_mm) <= MAX_IN_PLANE_EXTENT_MM and max(resampled_shape) <= longest_side:
        return
    spacing = " x ".join(f"{s:g}" for s in volume.spacing[:2])
    extent = " x ".join(f"{mm:.0f}" for mm in extent_mm)
    limit = (f"wider than {MAX_IN_PLANE_EXTENT_MM:.0f} mm" if max(extent_mm) > MAX_IN_PLANE_EXTENT_MM else
             f"resamples to {resampled_shape[0]} x {resampled_shape[1]} pixels at {config.spacing_mm:g} mm, more "
             f"than {MAX_RESAMPLED_SIDE_IN_SIZES} x size {config.size}")
    raise InputError(volume.source_path, f"axial plane of {extent} mm (voxel spacing {spacing} mm) is {limit}",
                     UNITS_HINT)


def looks_skull_stripped(data: np.ndarray) -> bool:
    """Whether the exact zeros of ``data`` ``[X, Y, Z]`` are a background *outside the object* (skull-stripped or
    background-zeroed): at least 30 % of voxels are 0 and the non-zero voxels that border a zero are tissue.

    A head that is not stripped but sits in a zero-padded field of view (or whose air was quantised to many exact
    zeros) fails the second test: there the zeros border air, whose magnitude is noise, below ``AUTO_AIR_LEVEL``
    of the bright voxels; keeping those voxels as foreground would keep noise-only slices.
    """
    nonzero = data != 0
    if 1.0 - np.count_nonzero(nonzero) / data.size < AUTO_NONZERO_MIN_ZERO_FRACTION:
        return False
    border = nonzero & ~ndimage.binary_erosion(nonzero, border_value=1)   # the volume's own edge is not a zero
    if not border.any():
        return True
    bright = np.percentile(np.abs(data[nonzero]), 99)
    return float(np.median(np.abs(data[border]))) >= AUTO_AIR_LEVEL * bright


def foreground_mask(data: np.ndarray, method: str) -> np.ndarray:
    """Boolean ``[X, Y, Z]`` foreground of ``data`` ``[X, Y, Z]``.

    ``nonzero``: voxels != 0 (skull-stripped or background-zeroed images). ``otsu``: the head mask of
    :func:`braindino.ingest.head_mask.head_mask` (a threshold just above the background noise and never above
    Otsu's, holes filled in 3D and per axial slice, the largest connected part), which keeps every voxel inside the
    head on T1-, T2-, FLAIR- and b0-like contrasts. ``auto``: ``nonzero`` for a skull-stripped image, else ``otsu``
    (see :func:`looks_skull_stripped`).
    """
    if method == "auto":
        method = "nonzero" if looks_skull_stripped(data) else "otsu"
    if method == "nonzero":
        return data != 0
    if method == "otsu":
        return head_mask(data)
    raise ValueError(f"unknown foreground method {method!r}; expected one of {FOREGROUND_METHODS}")


def _resample_stack(stack: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample every plane of ``stack`` ``[N, H, W]`` to ``[N, *shape]`` in one torch call (unchanged if same size).

    Boolean masks use ``nearest-exact``; intensities use bilinear, antialiased when shrinking. Both align pixel
    centres (``align_corners=False``), so the physical extent of the plane is kept.
    """
    if stack.shape[1:] == tuple(shape):
        return stack
    if stack.dtype == bool:
        tensor = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.uint8))[:, None]
        return F.interpolate(tensor, size=shape, mode="nearest-exact")[:, 0].numpy().astype(bool)
    tensor = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    shrinking = shape[0] < stack.shape[1] or shape[1] < stack.shape[2]
    return F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=shrinking)[:, 0].numpy()


def _window_offset(in_plane_foreground: np.ndarray, size: int) -> tuple[int, int]:
    """(row, col) start of the ``size`` window centred on the bounding box of ``in_plane_foreground`` ``[H, W]``."""
    rows = np.flatnonzero(in_plane_foreground.any(axis=1))
    cols = np.flatnonzero(in_plane_foreground.any(axis=0))
    return (int(rows[0] + rows[-1] + 1 - size) // 2, int(cols[0] + cols[-1] + 1 - size) // 2)


def _crop_or_pad(stack: np.ndarray, offset: tuple[int, int], size: int) -> np.ndarray:
    """Cut ``[N, size, size]`` out of ``stack`` ``[N, H, W]`` starting at ``offset``; outside the stack is 0.

    The window must overlap the stack (it always does: it is centred on the foreground bounding box).
    """
    out = np.zeros((stack.shape[0], size, size), dtype=stack.dtype)
    (row, col), (height, width) = offset, stack.shape[1:]
    src_rows = slice(max(row, 0), min(row + size, height))
    src_cols = slice(max(col, 0), min(col + size, width))
    dst_rows = slice(src_rows.start - row, src_rows.stop - row)
    dst_cols = slice(src_cols.start - col, src_cols.stop - col)
    out[:, dst_rows, dst_cols] = stack[:, src_rows, src_cols]
    return out
