"""One volume through the ingest code that ``braindino prepare`` uses, and the embedding of its slices.

``ingest_source`` accepts a path (NIfTI, DICOM folder, MHA/MHD, NRRD), a nibabel image or ``(array [X, Y, Z],
affine [4, 4])``; images held in memory are written to a temporary NIfTI file and read back by ``load_volume``, so
every source goes through the same validation, RAS reorientation and :func:`preprocess_volume` as a stored volume,
and gives the store's slices bit for bit.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from braindino.ingest import PreprocessConfig, PreprocessedVolume, Volume, load_volume, preprocess_volume
from braindino.ingest.geometry import volume_geometry as ingest_geometry


@dataclass
class VolumeEmbedding:
    """Per-slice embeddings of one volume.

    ``cls`` / ``mean_patch`` ``[S, D]`` float32; ``z`` ``[S]`` int32 (axial index in the RAS canonical volume);
    ``hemispheres`` ``[S, 2, P]`` float32 (mean patch feature of the patient's Left, then Right half of each slice's
    patch grid; ``P = D`` for a ViT); ``patch`` ``[S, N, P]`` float32 or None; ``volume`` ``[D]`` (mean of
    ``cls``); ``slices`` ``[S, size, size]`` float16, the preprocessed slices that were embedded (identical to a
    slice store's); ``geometry``: affine (canonical ``[4, 4]``), native_affine ``[4, 4]``, native_shape (3,),
    canonical_shape (3,), spacing (3,), crop_offset (2,), resampled_shape (2,), slice_size, input_size, grid (2,).
    """

    cls: np.ndarray
    mean_patch: np.ndarray
    z: np.ndarray
    hemispheres: np.ndarray
    patch: np.ndarray | None
    volume: np.ndarray
    slices: np.ndarray
    geometry: dict


def ingest_source(source, volume_index, preprocessing: PreprocessConfig) -> tuple[Volume, PreprocessedVolume]:
    """``source`` → (canonical Volume, its PreprocessedVolume); raises InputError for a bad image."""
    if isinstance(source, (str, os.PathLike)):
        volume = load_volume(source, volume_index)
        return volume, preprocess_volume(volume, preprocessing)
    import nibabel as nib

    if isinstance(source, tuple):
        array, affine = source
        source = nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    with tempfile.TemporaryDirectory(prefix="braindino-") as folder:
        path = os.path.join(folder, "volume.nii")
        nib.save(source, path)
        volume = load_volume(path, volume_index)
        return volume, preprocess_volume(volume, preprocessing)


def volume_geometry(volume: Volume, prepared: PreprocessedVolume, input_size: int, grid) -> dict:
    """Everything needed to map per-slice (or per-patch) outputs back to the canonical and native voxel grids:
    :func:`braindino.ingest.geometry.volume_geometry` plus the model's ``input_size`` and patch ``grid``."""
    return {**ingest_geometry(volume, prepared), "input_size": int(input_size), "grid": tuple(int(g) for g in grid)}
