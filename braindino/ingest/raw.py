"""What every reader hands back before validation, and the helpers the readers share.

A reader returns a :class:`RawImage`: the chosen ``[X, Y, Z]`` volume in on-disk voxel order with its voxel->RAS
affine. ITK images (LPS geometry, ``[Z, Y, X]`` arrays) are converted by :func:`itk_to_raw`.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from braindino.errors import InputError

REEXPORT_HINT = "re-export the image from the scanner or conversion tool"
STACK_HINT = "braindino slices 3D volumes; stack the slices into one 3D image"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class RawImage:
    """A reader's output before validation: ``data`` is the chosen ``[X, Y, Z]`` volume in on-disk voxel order,
    ``affine`` its ``[4, 4]`` voxel->RAS-mm matrix, ``header_spacing`` the voxel sizes as the header stores them."""

    data: np.ndarray
    affine: np.ndarray
    header_spacing: tuple[float, ...]


def itk_to_raw(image: sitk.Image) -> RawImage:
    """Convert a 3D ITK image (LPS geometry, ``[Z, Y, X]`` array) to a RAS affine and an ``[X, Y, Z]`` array."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    data = np.array(sitk.GetArrayViewFromImage(image).T, dtype=np.float32)   # copy: the view dies with `image`
    return RawImage(data=data, affine=affine, header_spacing=tuple(float(s) for s in spacing))


def check_volume_index(path: Path, n_volumes: int | None, volume_index) -> int | None:
    """Validate ``volume_index`` for a 3D (``n_volumes=None``) or 4D image; return the index to read or None."""
    if volume_index is not None and not _is_whole_number(volume_index):
        raise InputError(path, f"volume_index={volume_index!r} is not a whole number",
                         "give volume_index as 0, 1, 2, ... (or leave it empty for 3D images)")
    if n_volumes is None:
        if volume_index not in (None, 0):
            raise InputError(path, f"volume_index={volume_index} given but the image is 3D",
                             "leave volume_index empty (or 0) for 3D images")
        return None
    if volume_index is None:
        raise InputError(path, f"image is 4D with {n_volumes} volumes but no volume_index was given",
                         f"add a volume_index column (0..{n_volumes - 1}) to the manifest row")
    if not 0 <= volume_index < n_volumes:
        raise InputError(path, f"volume_index={volume_index} is out of range for a 4D image with {n_volumes} "
                               f"volumes", f"use a volume_index between 0 and {n_volumes - 1}")
    return int(volume_index)


def _is_whole_number(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def trim_trailing_singletons(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without trailing 1s beyond the third axis: (64, 64, 30, 1) -> (64, 64, 30)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def first_line(error: BaseException) -> str:
    """The first line of ``str(error)`` (at most 200 characters), or its type name."""
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
