"""Patch maps back onto the input's own voxel grid, written as NIfTI with the input's affine.

A slice's patch map ``[N]`` (row-major over the ``[h, w]`` grid at the encoder's ``input_size``) becomes pixels by
giving each patch's ``p x p`` square its value; when the slices were resized to the input size the pixel map is
resized back to the slice size (bilinear). The ``[S, size, size]`` stack then takes the path of the segmentation
probe's masks: :func:`slices_to_canonical` (un-crop, in-plane resample, axial planes ``z``; planes the
preprocessing did not keep are 0) and :func:`canonical_to_native` (undo the RAS reorientation), saved with the
input's ``native_affine`` — so a map overlays its image in any viewer.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from braindino.atomic import atomic_path
from braindino.ingest.geometry import canonical_to_native, slices_to_canonical


def patch_maps_to_slices(maps: np.ndarray, grid, patch_size: int, slice_size: int) -> np.ndarray:
    """``[S, N]`` patch values → ``[S, slice_size, slice_size]`` float32 pixel maps (``N = h·w``, patches of
    ``patch_size`` pixels at the input size ``h·patch_size``)."""
    rows, cols = (int(g) for g in grid)
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 2 or maps.shape[1] != rows * cols:
        raise ValueError(f"maps must be [S, {rows * cols}] for a {rows}x{cols} grid, got {maps.shape}")
    pixels = maps.reshape(-1, rows, cols).repeat(patch_size, axis=1).repeat(patch_size, axis=2)
    if pixels.shape[1:] != (slice_size, slice_size):
        resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(pixels))[:, None], size=(slice_size,) * 2,
                                mode="bilinear", align_corners=False)
        pixels = resized[:, 0].numpy()
    return np.ascontiguousarray(pixels, dtype=np.float32)


def patch_maps_to_native(maps: np.ndarray, z: np.ndarray, geometry: dict, patch_size: int,
                         foreground: np.ndarray | None = None) -> np.ndarray:
    """``[S, N]`` patch maps of the slices at axial planes ``z`` ``[S]`` → ``[i, j, k]`` float32 in the input
    file's voxel order (``geometry``: a volume geometry with ``grid``, see :func:`braindino.encoder.volume.
    volume_geometry`); ``foreground`` ``[S, size, size]`` bool, when given, zeroes the background pixels."""
    pixels = patch_maps_to_slices(maps, geometry["grid"], patch_size, int(geometry["slice_size"]))
    if foreground is not None:
        pixels = pixels * foreground
    return canonical_to_native(slices_to_canonical(pixels, z, geometry), geometry).astype(np.float32)


def write_nifti(path, native: np.ndarray, geometry: dict) -> Path:
    """Atomically save ``native`` (``[i, j, k]`` or ``[i, j, k, n]``) with the input's native affine."""
    path = Path(path)
    image = nib.Nifti1Image(np.asarray(native, dtype=np.float32), np.asarray(geometry["native_affine"], dtype=float))
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp) + ".nii.gz")
        os.replace(str(tmp) + ".nii.gz", tmp)
    return path
