"""Map per-slice results back to the input's voxel grid: the inverse of :func:`preprocess_volume`'s geometry.

The forward path (see :mod:`braindino.ingest.preprocess`): the file's voxel grid (``native_affine``,
``native_shape``) is reoriented to RAS+ canonical order (``affine``, ``canonical_shape`` ``[X, Y, Z]``); each kept
axial plane ``z`` ``[X, Y]`` is resampled to ``resampled_shape`` ``(H, W)`` (``align_corners=False``) and a
``[size, size]`` window starting at ``crop_offset`` (row, col; negative = padding) is cut out of it.

A geometry is a plain dict with keys ``affine``, ``native_affine`` (``[4, 4]`` float64 arrays), ``native_shape``,
``canonical_shape``, ``spacing``, ``crop_offset``, ``resampled_shape`` (tuples) and ``slice_size`` (int);
:func:`volume_geometry` builds it (features files store it as JSON and read it back in this form). The functions
below also accept the JSON form (lists). Label maps (integer or bool) are resampled with ``nearest-exact``, float maps
(e.g. saliency) bilinearly.
"""

import numpy as np
import torch
import torch.nn.functional as F

from braindino.errors import InputError
from braindino.ingest.preprocess import PreprocessedVolume
from braindino.ingest.readers import Volume

GRID_TOLERANCE = 1e-3     # mm for world affines, voxels for voxel-to-voxel maps


def volume_geometry(volume: Volume, prepared: PreprocessedVolume) -> dict:
    """The geometry dict of ``prepared`` (from ``preprocess_volume(volume, ...)``)."""
    if volume.native_affine is None or volume.native_shape is None:
        raise ValueError("volume has no native grid (native_affine / native_shape); load it with load_volume")
    return {
        "affine": np.asarray(prepared.affine, dtype=np.float64),
        "native_affine": np.asarray(volume.native_affine, dtype=np.float64),
        "native_shape": tuple(int(n) for n in volume.native_shape),
        "canonical_shape": tuple(int(n) for n in volume.data.shape),
        "spacing": tuple(float(s) for s in prepared.spacing),
        "crop_offset": tuple(int(o) for o in prepared.crop_offset),
        "resampled_shape": tuple(int(n) for n in prepared.resampled_shape),
        "slice_size": int(prepared.slices.shape[-1]),
    }


def slices_to_canonical(slice_maps: np.ndarray, z: np.ndarray, geometry: dict) -> np.ndarray:
    """Place per-slice maps ``[S, size, size]`` (for axial planes ``z`` ``[S]``) into the canonical grid.

    Returns ``[X, Y, Z]`` of ``slice_maps``' dtype: each map is un-cropped into the resampled plane (outside the
    window: 0), resampled back to ``[X, Y]`` (nearest for integer/bool maps, bilinear for float maps) and written at
    its ``z``; planes that were not kept are 0.
    """
    maps, z = np.asarray(slice_maps), np.asarray(z, dtype=np.int64)
    size, (x_len, y_len, z_len) = int(geometry["slice_size"]), _shape(geometry["canonical_shape"])
    if maps.ndim != 3 or maps.shape[1:] != (size, size) or z.shape != (len(maps),):
        raise ValueError(f"slice_maps must be [S, {size}, {size}] with z [S], got {maps.shape} and {z.shape}")
    if z.size and (z.min() < 0 or z.max() >= z_len):
        raise ValueError(f"slice indices must lie in 0..{z_len - 1}, got {z.min()}..{z.max()}")
    offset = tuple(int(o) for o in geometry["crop_offset"])
    planes = _shift(maps, (-offset[0], -offset[1]), _shape(geometry["resampled_shape"]))    # [S, H, W]
    planes = _resample_planes(planes, (x_len, y_len))                                        # [S, X, Y]
    canonical = np.zeros((x_len, y_len, z_len), dtype=maps.dtype)
    canonical[:, :, z] = planes.transpose(1, 2, 0)
    return canonical


def canonical_to_native(array: np.ndarray, geometry: dict) -> np.ndarray:
    """Undo the RAS+ reorientation: canonical ``[X, Y, Z]`` → the file's voxel order ``native_shape``.

    The canonical and native affines differ by a pure axis permutation / flip of the voxel grid (that is what
    nibabel's reorientation does); the returned array saved with ``native_affine`` overlays the input image.
    """
    array = np.asarray(array)
    if array.shape != _shape(geometry["canonical_shape"]):
        raise ValueError(f"array has shape {array.shape}, the canonical grid is {_shape(geometry['canonical_shape'])}")
    native_affine = np.asarray(geometry["native_affine"], dtype=np.float64)
    canonical_to_native_voxels = np.linalg.solve(native_affine, np.asarray(geometry["affine"], dtype=np.float64))
    native_shape = _shape(geometry["native_shape"])
    permutation = np.abs(canonical_to_native_voxels[:3, :3]).argmax(axis=0)     # native axis of each canonical axis
    signs = np.sign(canonical_to_native_voxels[permutation, range(3)])
    expected = np.eye(4)
    expected[:3, :3] = 0.0
    expected[permutation, range(3)] = signs
    expected[permutation, 3] = np.where(signs < 0, np.asarray(native_shape)[permutation] - 1, 0)
    if sorted(permutation) != [0, 1, 2] or not np.allclose(canonical_to_native_voxels, expected,
                                                           atol=GRID_TOLERANCE):
        raise ValueError("the canonical grid is not an axis permutation / flip of the native grid "
                         "(affines or native_shape do not belong together)")
    flipped = np.flip(array, axis=tuple(axis for axis in range(3) if signs[axis] < 0))
    native = np.ascontiguousarray(np.transpose(flipped, np.argsort(permutation)))
    if native.shape != native_shape:
        raise ValueError(f"reoriented shape {native.shape} differs from native_shape {native_shape}")
    return native


def label_slices_from_mask(mask_volume: Volume, geometry: dict, z: np.ndarray) -> np.ndarray:
    """Integer labels ``[S, size, size]`` int64 of ``mask_volume`` at axial planes ``z`` ``[S]``, put through the
    image's in-plane resampling (nearest) and crop, so that label pixel ``[k, r, c]`` lies under image slice pixel
    ``[k, r, c]``. ``mask_volume`` (from :func:`load_volume`) must share the image's canonical grid.
    """
    expected_shape = _shape(geometry["canonical_shape"])
    affine = np.asarray(geometry["affine"], dtype=np.float64)
    if mask_volume.data.shape != expected_shape or not np.allclose(mask_volume.affine, affine,
                                                                   atol=GRID_TOLERANCE):
        raise InputError(mask_volume.source_path,
                         f"mask grid (shape {mask_volume.data.shape}) differs from its image's grid "
                         f"(shape {expected_shape}) in shape or voxel-to-world affine",
                         "resample the mask onto the image grid (same shape and affine) before probing")
    labels = np.rint(mask_volume.data)
    if np.any(labels != mask_volume.data) or labels.min() < 0:
        raise InputError(mask_volume.source_path, "mask holds negative or non-integer values",
                         "store the mask as non-negative integer labels (0 = background)")
    stack = labels.astype(np.int64).transpose(2, 0, 1)[np.asarray(z, dtype=np.int64)]       # [S, X, Y]
    stack = _resample_planes(stack, _shape(geometry["resampled_shape"]))                    # [S, H, W]
    offset = tuple(int(o) for o in geometry["crop_offset"])
    size = int(geometry["slice_size"])
    return _shift(stack, offset, (size, size))


def _shape(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _shift(stack: np.ndarray, offset: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """``out[:, i, j] = stack[:, i + offset[0], j + offset[1]]`` for ``out`` ``[N, *shape]``; 0 outside ``stack``.

    With the crop offset this cuts the window out of a plane; with the negated offset it puts a window back.
    """
    out = np.zeros((stack.shape[0], *shape), dtype=stack.dtype)
    source, target = [], []
    for axis in range(2):
        start, stop = max(offset[axis], 0), min(offset[axis] + shape[axis], stack.shape[axis + 1])
        if start >= stop:
            return out
        source.append(slice(start, stop))
        target.append(slice(start - offset[axis], stop - offset[axis]))
    out[:, target[0], target[1]] = stack[:, source[0], source[1]]
    return out


def _resample_planes(stack: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample ``[N, h, w]`` → ``[N, *shape]`` (pixel centres aligned, ``align_corners=False``, as in ingest):
    ``nearest-exact`` for integer/bool stacks (labels stay labels), bilinear for float stacks."""
    if stack.shape[1:] == tuple(shape):
        return stack
    if stack.shape[0] == 0:
        return np.zeros((0, *shape), dtype=stack.dtype)
    floating = np.issubdtype(stack.dtype, np.floating)
    tensor = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32 if floating else np.float64))[:, None]
    mode = {"mode": "bilinear", "align_corners": False} if floating else {"mode": "nearest-exact"}
    return F.interpolate(tensor, size=shape, **mode)[:, 0].numpy().astype(stack.dtype)
