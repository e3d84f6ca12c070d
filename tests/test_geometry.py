"""Slices → canonical → native voxel grid: the inverse of ingest's geometry, on real NIfTI files."""

import nibabel as nib
import numpy as np
import pytest

from braindino.errors import InputError
from braindino.ingest import PreprocessConfig, Volume, load_volume, preprocess_volume
from braindino.ingest.geometry import (canonical_to_native, label_slices_from_mask, slices_to_canonical,
                                       volume_geometry)
from conftest import head_like_volume

SHAPE = (40, 36, 20)


def ras_image_and_mask(seed=0):
    """A head-like ``[40, 36, 20]`` image (RAS voxel order) and a label mask: 1 = a box lesion, 2 = a stripe,
    both inside the brain on central slices."""
    image = head_like_volume(np.random.default_rng(seed), shape=SHAPE)
    mask = np.zeros(SHAPE, dtype=np.int16)
    mask[14:22, 12:19, 8:13] = 1
    mask[18:30, 20:23, 6:14] = 2
    return image, mask


def store_as(orientation: str, array: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """``array`` in RAS voxel order → (on-disk array, affine) for an ``RAS``, ``LPS`` or permuted ``SLP`` file."""
    ras_affine = np.diag([*spacing, 1.0])
    ras_affine[:3, 3] = [-20.0, -18.0, -10.0]
    if orientation == "RAS":
        return array, ras_affine
    flips = np.diag([-1.0, -1.0, 1.0, 1.0])
    flips[:2, 3] = [SHAPE[0] - 1, SHAPE[1] - 1]                    # LPS voxel -> RAS voxel
    lps_array, lps_affine = array[::-1, ::-1], ras_affine @ flips
    if orientation == "LPS":
        return lps_array, lps_affine
    to_slp = [2, 0, 1]                                               # on-disk axes: S, L, P
    return np.transpose(lps_array, to_slp), lps_affine[:, to_slp + [3]]


def write_pair(tmp_path, orientation, spacing):
    image, mask = ras_image_and_mask()
    paths = []
    for name, array in (("image", image), ("mask", mask)):
        stored, affine = store_as(orientation, array, spacing)
        path = tmp_path / f"{name}_{orientation}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(stored), affine), path)
        paths.append(path)
    return paths


def round_trip(image_path, mask_path, size):
    volume = load_volume(image_path)
    prepared = preprocess_volume(volume, PreprocessConfig(size=size))
    geometry = volume_geometry(volume, prepared)
    labels = label_slices_from_mask(load_volume(mask_path), geometry, prepared.z_indices)
    return prepared, geometry, labels, canonical_to_native(slices_to_canonical(labels, prepared.z_indices,
                                                                               geometry), geometry)


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "SLP"])
def test_mask_round_trip_is_exact_at_1mm(tmp_path, orientation):
    image_path, mask_path = write_pair(tmp_path, orientation, (1.0, 1.0, 1.0))
    prepared, geometry, labels, native = round_trip(image_path, mask_path, size=48)
    assert tuple(geometry["resampled_shape"]) == SHAPE[:2]
    assert labels.shape == (len(prepared.z_indices), 48, 48) and labels.dtype == np.int64
    stored = nib.load(mask_path)
    np.testing.assert_array_equal(native, np.asanyarray(stored.dataobj))

    out_path = tmp_path / "round_trip.nii.gz"
    nib.save(nib.Nifti1Image(native.astype(np.int16), np.asarray(geometry["native_affine"])), out_path)
    saved = nib.load(out_path)
    assert saved.shape == stored.shape
    np.testing.assert_allclose(saved.affine, stored.affine, atol=1e-6)


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_label_slices_sit_under_the_image_pixels(tmp_path, orientation):
    image_path, mask_path = write_pair(tmp_path, orientation, (1.0, 1.0, 1.0))
    prepared, geometry, labels, _ = round_trip(image_path, mask_path, size=48)
    image, mask = ras_image_and_mask()
    k = int(np.flatnonzero(prepared.z_indices == 10)[0])
    row, col = geometry["crop_offset"]
    # canonical voxel (x, y, 10) is window pixel (x - row, y - col), in the image slice and the label slice alike
    np.testing.assert_array_equal(labels[k, 14 - row:22 - row, 12 - col:19 - col], 1)
    assert (labels[k] == 1).sum() == 8 * 7
    assert (prepared.slices[k, 14 - row, 12 - col] > 0) == (image[14, 12, 10] > 0)


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "SLP"])
def test_mask_round_trip_with_anisotropic_voxels(tmp_path, orientation):
    image_path, mask_path = write_pair(tmp_path, orientation, (0.8, 1.3, 2.0))
    _, geometry, labels, native = round_trip(image_path, mask_path, size=64)
    assert tuple(geometry["resampled_shape"]) == (32, 47)
    original = np.asanyarray(nib.load(mask_path).dataobj)
    assert native.shape == original.shape
    for label in (1, 2):
        assert dice(native == label, original == label) > 0.9
    assert set(np.unique(labels)) == {0, 1, 2}


def test_cropping_window_and_dropped_slices_map_back_to_zero(tmp_path):
    image_path, _ = write_pair(tmp_path, "LPS", (1.0, 1.0, 1.0))
    volume = load_volume(image_path)
    prepared = preprocess_volume(volume, PreprocessConfig(size=24, min_foreground_fraction=0.5))
    geometry = volume_geometry(volume, prepared)
    assert 0 < len(prepared.z_indices) < SHAPE[2]
    ones = np.ones((len(prepared.z_indices), 24, 24), dtype=np.int64)
    canonical = slices_to_canonical(ones, prepared.z_indices, geometry)
    assert canonical.sum() == len(prepared.z_indices) * 24 * 24
    row, col = geometry["crop_offset"]
    np.testing.assert_array_equal(np.flatnonzero(canonical.any(axis=(0, 1))), prepared.z_indices)
    assert canonical[row:row + 24, col:col + 24, prepared.z_indices].all()


def test_float_maps_are_resampled_bilinearly(tmp_path):
    image_path, _ = write_pair(tmp_path, "RAS", (0.5, 0.5, 1.0))
    volume = load_volume(image_path)
    prepared = preprocess_volume(volume, PreprocessConfig(size=16))
    geometry = volume_geometry(volume, prepared)
    ramp = np.tile(np.linspace(0.0, 1.0, 16, dtype=np.float32)[None, :, None], (len(prepared.z_indices), 1, 16))
    canonical = slices_to_canonical(ramp, prepared.z_indices, geometry)
    assert canonical.dtype == np.float32
    inside = canonical[:, :, prepared.z_indices[0]]
    values = np.unique(inside[inside > 0])
    assert len(values) > 16          # interpolated between the 16 ramp levels, not copied (nearest)


def test_geometry_checks(tmp_path):
    image_path, mask_path = write_pair(tmp_path, "RAS", (1.0, 1.0, 1.0))
    volume = load_volume(image_path)
    prepared = preprocess_volume(volume, PreprocessConfig(size=48))
    geometry = volume_geometry(volume, prepared)
    mask = load_volume(mask_path)
    with pytest.raises(InputError, match="differs from its image's grid"):
        label_slices_from_mask(Volume(mask.data[:-1], mask.affine, mask.spacing, "m.nii.gz"), geometry, [10])
    with pytest.raises(InputError, match="non-integer"):
        label_slices_from_mask(Volume(mask.data + 0.5, mask.affine, mask.spacing, "m.nii.gz"), geometry, [10])
    with pytest.raises(ValueError, match="slice indices"):
        slices_to_canonical(np.zeros((1, 48, 48)), [SHAPE[2]], geometry)
    with pytest.raises(ValueError, match="differs from native_shape"):
        canonical_to_native(np.zeros(SHAPE), dict(geometry, native_shape=[36, 40, 20]))
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(0.7), -np.sin(0.7)], [np.sin(0.7), np.cos(0.7)]]
    with pytest.raises(ValueError, match="do not belong together"):
        canonical_to_native(np.zeros(SHAPE), dict(geometry, native_affine=(rotation @ volume.native_affine).tolist()))
    with pytest.raises(ValueError, match="no native grid"):
        volume_geometry(Volume(volume.data, volume.affine, volume.spacing, "x"), prepared)
