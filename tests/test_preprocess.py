"""Preprocessing: normalisation, resampling, crop window, slice selection and foreground masks."""

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from braindino.errors import InputError
from braindino.ingest import PreprocessConfig, Volume, foreground_mask, preprocess_volume


def make_volume(data: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Volume:
    data = np.asarray(data, dtype=np.float32)
    return Volume(data=data, affine=np.diag([*spacing, 1.0]), spacing=tuple(spacing), source_path="mem.nii")


def box_volume(shape=(30, 40, 12), box=(slice(5, 15), slice(10, 30), slice(3, 9)), seed=0) -> np.ndarray:
    """[X, Y, Z] zeros with random positive intensities inside ``box``."""
    data = np.zeros(shape, dtype=np.float32)
    data[box] = np.random.default_rng(seed).uniform(10, 110, size=data[box].shape)
    return data


def test_output_types_and_shapes_follow_the_interface():
    result = preprocess_volume(make_volume(box_volume()), PreprocessConfig(size=32))
    assert result.slices.dtype == np.float16 and result.slices.shape[1:] == (32, 32)
    assert result.z_indices.dtype == np.int32 and result.foreground_fraction.dtype == np.float32
    assert len(result.slices) == len(result.z_indices) == len(result.foreground_fraction)
    assert result.resampled_shape == (30, 40) and isinstance(result.crop_offset, tuple)
    assert result.spacing == (1.0, 1.0, 1.0) and result.affine.shape == (4, 4)


def test_normalisation_matches_numpy_reference_and_crop_window_is_centred():
    data = box_volume()
    config = PreprocessConfig(size=32, foreground="nonzero", clip_percentiles=(2.0, 98.0))
    result = preprocess_volume(make_volume(data), config)
    # bounding box rows 5..14, cols 10..29 -> offset = (5 + 14 + 1 - 32) // 2, (10 + 29 + 1 - 32) // 2
    assert result.crop_offset == (-6, 4)
    np.testing.assert_array_equal(result.z_indices, np.arange(3, 9))
    low, high = np.percentile(data[data != 0], (2.0, 98.0))
    for slice_, z in zip(result.slices, result.z_indices):
        plane = data[:, :, z]
        normalised = np.clip((plane - low) / (high - low), 0, 1) * (plane != 0)
        expected = np.zeros((32, 32), dtype=np.float32)
        expected[6:32, :] = normalised[0:26, 4:36]        # window rows -6..25 (6 rows of padding), cols 4..35
        np.testing.assert_allclose(slice_.astype(np.float32), expected, atol=1e-3)
    assert result.slices.min() == 0 and result.slices.max() == 1
    fg = result.slices[0] > 0
    rows, cols = np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0))
    assert rows[0] + rows[-1] + 1 == 32 and cols[0] + cols[-1] + 1 == 32        # box centred in the window


def test_slice_selection_uses_window_foreground_fraction():
    data = np.zeros((20, 20, 10), dtype=np.float32)
    data[2:18, 2:18, 1:4] = 5.0                          # 256 px of foreground
    data[2:18, 2:18, 0] = np.where(np.arange(16) < 2, 5.0, 0)[:, None] * np.ones(16)  # 32 px
    data[5:15, 5:15, 4:10] = 7.0                         # 100 px
    config = PreprocessConfig(size=32, foreground="nonzero", min_foreground_fraction=0.09)
    result = preprocess_volume(make_volume(data), config)
    np.testing.assert_array_equal(result.z_indices, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    np.testing.assert_allclose(result.foreground_fraction, [256 / 1024] * 3 + [100 / 1024] * 6, rtol=1e-6)


def test_in_plane_resampling_matches_scipy_bilinear_reference():
    """Upsampling 2x with pixel-centre alignment equals scipy.ndimage.zoom(order=1, grid_mode=True)."""
    data = np.random.default_rng(3).uniform(1, 2, size=(10, 12, 4)).astype(np.float32)
    config = PreprocessConfig(spacing_mm=0.5, size=24, foreground="nonzero", clip_percentiles=(0, 100),
                              min_foreground_fraction=0)
    result = preprocess_volume(make_volume(data), config)
    assert result.resampled_shape == (20, 24) and result.crop_offset == (-2, 0)
    zoomed = ndimage.zoom(data, (2, 2, 1), order=1, grid_mode=True, mode="nearest")
    expected = (zoomed - data.min()) / (data.max() - data.min())
    np.testing.assert_allclose(result.slices[:, 2:22, :].astype(np.float32),
                               expected.transpose(2, 0, 1), atol=2e-3)
    assert not result.slices[:, :2].any() and not result.slices[:, 22:].any()


def test_anisotropic_spacing_is_resampled_to_the_physical_size():
    """A 20 mm x 30 mm box stored at 0.5 x 2.0 mm becomes 20 x 30 pixels at 1 mm."""
    data = np.zeros((80, 30, 5), dtype=np.float32)
    data[20:60, 5:20, :] = 100.0                       # 40 voxels * 0.5 mm = 20 mm; 15 voxels * 2 mm = 30 mm
    data[40, 10, 4] = 1.0                              # sets the low clip value; slice 0 is uniformly bright
    result = preprocess_volume(make_volume(data, spacing=(0.5, 2.0, 3.0)),
                               PreprocessConfig(size=48, foreground="nonzero", clip_percentiles=(0, 100)))
    assert result.resampled_shape == (40, 60) and result.spacing == (0.5, 2.0, 3.0)
    foreground = result.slices[0] > 0
    assert np.flatnonzero(foreground.any(1)).size == 20 and np.flatnonzero(foreground.any(0)).size == 30
    np.testing.assert_allclose(result.foreground_fraction, 600 / 48 ** 2)


def test_downsampling_keeps_the_window_mappable_to_native_space():
    data = np.zeros((60, 60, 3), dtype=np.float32)
    data[31:41, 11:21, :] = 100.0
    data[35, 15, 2] = 1.0                              # sets the low clip value; slice 0 is uniformly bright
    result = preprocess_volume(make_volume(data, spacing=(0.5, 0.5, 1.0)),
                               PreprocessConfig(size=16, foreground="nonzero", clip_percentiles=(0, 100),
                                                min_foreground_fraction=0.05))
    assert result.resampled_shape == (30, 30)
    row, col = result.crop_offset
    # resampled pixel r covers native pixels 2r, 2r+1 (centre at edge coordinate 2r + 1): the box's native
    # rows 31..40 (edges 31..41) hold the centres of resampled rows 15..19; cols 11..20 -> 5..9
    assert (row, col) == ((15 + 19 + 1 - 16) // 2, (5 + 9 + 1 - 16) // 2)
    foreground = result.slices[0] > 0
    np.testing.assert_array_equal(np.flatnonzero(foreground.any(1)) + row, np.arange(15, 20))
    np.testing.assert_array_equal(np.flatnonzero(foreground.any(0)) + col, np.arange(5, 10))


def head_with_dark_ventricle(seed=4) -> np.ndarray:
    """[X, Y, Z] noisy background (no exact zeros), bright head, dark hole inside it."""
    rng = np.random.default_rng(seed)
    i, j, k = np.indices((32, 32, 8))
    head = (i - 16) ** 2 + (j - 16) ** 2 < 12 ** 2
    ventricle = (i - 16) ** 2 + (j - 16) ** 2 < 4 ** 2
    data = rng.uniform(1, 5, size=head.shape)
    data[head] = rng.uniform(200, 220, size=head.sum())
    data[ventricle] = rng.uniform(1, 5, size=ventricle.sum())
    return data.astype(np.float32)


def test_otsu_mask_excludes_background_and_fills_enclosed_dark_regions():
    data = head_with_dark_ventricle()
    i, j, _ = np.indices(data.shape)
    expected = (i - 16) ** 2 + (j - 16) ** 2 < 12 ** 2
    threshold_filter = sitk.OtsuThresholdImageFilter()
    threshold_filter.Execute(sitk.GetImageFromArray(data))
    assert 5 < threshold_filter.GetThreshold() < 200
    np.testing.assert_array_equal(foreground_mask(data, "otsu"), expected)
    np.testing.assert_array_equal(foreground_mask(data, "auto"), expected)   # no zeros -> Otsu


def test_auto_uses_nonzero_on_skull_stripped_volumes():
    data = np.zeros((20, 20, 4), dtype=np.float32)
    data[5:15, 5:15] = 100.0
    data[5:15, 5:8] = 1.0                # dim tissue on the edge (not enclosed): Otsu drops it, nonzero keeps it
    np.testing.assert_array_equal(foreground_mask(data, "auto"), data != 0)
    np.testing.assert_array_equal(foreground_mask(data, "otsu"), data == 100)
    with pytest.raises(ValueError, match="unknown foreground"):
        foreground_mask(data, "mean")


def test_background_is_zero_after_normalisation():
    data = head_with_dark_ventricle()
    result = preprocess_volume(make_volume(data), PreprocessConfig(size=40, foreground="otsu"))
    i, j = np.indices((40, 40))
    row, col = result.crop_offset
    outside = (i + row - 16) ** 2 + (j + col - 16) ** 2 >= 12 ** 2
    assert not result.slices[:, outside].any()
    assert result.slices[:, ~outside].min() >= 0 and result.slices.max() == 1


def test_no_slice_with_enough_foreground_raises():
    data = np.zeros((40, 40, 5), dtype=np.float32)
    data[18:20, 18:20, :] = 3.0
    data[19, 19, 2] = 9.0
    with pytest.raises(InputError, match="no axial slice") as caught:
        preprocess_volume(make_volume(data), PreprocessConfig(size=32, min_foreground_fraction=0.5))
    assert str(caught.value).startswith("mem.nii: ")


def test_constant_foreground_raises():
    data = np.zeros((10, 10, 4), dtype=np.float32)
    data[2:8, 2:8] = 1.0
    with pytest.raises(InputError, match="constant"):
        preprocess_volume(make_volume(data), PreprocessConfig(size=16))


@pytest.mark.parametrize("field, value", [("spacing_mm", 0.0), ("size", 0), ("foreground", "mean"),
                                          ("clip_percentiles", (90.0, 10.0)), ("min_foreground_fraction", 1.5)])
def test_invalid_config_is_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        PreprocessConfig(**{field: value})


def phantom_head(seed=0, stripped=False):
    """[48, 48, 40] head filling axial slices 8..31 (24 slices): scalp/skull ring, brain with dark CSF around the
    ventricles and at the cortex edge; outside the head air with Rician-like noise (or exact zeros if stripped)."""
    rng = np.random.default_rng(seed)
    i, j, k = np.indices((48, 48, 40)).astype(float)
    radius = np.sqrt((i - 24) ** 2 + (j - 24) ** 2 + ((k - 19.5) * 18 / 12) ** 2)
    head, brain = radius < 18, radius < 14.5
    data = np.abs(rng.normal(0.0, 0.01, head.shape))                     # air: noise magnitude
    data[head] = rng.uniform(0.5, 0.6, head.sum())                       # scalp and skull
    data[brain] = rng.uniform(0.8, 1.0, brain.sum())                     # tissue
    csf = brain & ((radius > 13) | (np.sqrt((i - 24) ** 2 + (j - 24) ** 2) < 3))
    data[csf] = rng.uniform(0.15, 0.2, csf.sum())                        # dark CSF (FLAIR-like), on the brain's edge
    if stripped:
        data[~brain] = 0.0
    return data.astype(np.float32), head, brain


def test_auto_foreground_is_right_for_stripped_unstripped_and_zero_padded_heads():
    config = PreprocessConfig(size=48, foreground="auto")
    stripped, _, brain = phantom_head(stripped=True)
    np.testing.assert_array_equal(foreground_mask(stripped, "auto"), brain)      # the dark CSF edge is kept
    np.testing.assert_array_equal(foreground_mask(stripped, "otsu"), brain)      # the head mask too (Otsu lost it)

    whole, head, _ = phantom_head()
    head_slices = np.flatnonzero(head.sum(axis=(0, 1)) >= config.min_foreground_fraction * 48 * 48)
    assert 20 <= len(head_slices) < 24                  # the caps of the head hold too little to be kept
    np.testing.assert_array_equal(preprocess_volume(make_volume(whole), config).z_indices, head_slices)

    # the same head in a zero-padded field of view: 16 zero slices below and above, 10 zero voxels each side
    padded = np.pad(whole, ((10, 10), (10, 10), (16, 16)))
    assert (padded == 0).mean() > 0.5
    np.testing.assert_array_equal(foreground_mask(padded, "auto"), foreground_mask(padded, "otsu"))
    np.testing.assert_array_equal(preprocess_volume(make_volume(padded), config).z_indices, head_slices + 16)

    # air quantised to integers: most air voxels exactly 0, the rest 1-3; the head stays the foreground
    quantised = np.round(whole * 400 / 1.0).astype(np.float32)
    quantised[~head] = np.round(np.abs(np.random.default_rng(1).normal(0, 1.0, (~head).sum())))
    assert (quantised == 0).mean() > 0.3
    np.testing.assert_array_equal(preprocess_volume(make_volume(quantised), config).z_indices, head_slices)


# ------------------------------------------------------------------- head mask on every contrast (issue: T2/b0)

HEAD_SIGNAL = {   # relative signal of scalp, skull, CSF, grey and white matter, lesion on each contrast
    "T1": {"scalp": 0.9, "skull": 0.05, "csf": 0.2, "gm": 0.55, "wm": 0.8, "lesion": 0.4},
    "T2": {"scalp": 0.3, "skull": 0.04, "csf": 1.0, "gm": 0.45, "wm": 0.35, "lesion": 0.8},
    "b0": {"scalp": 0.25, "skull": 0.03, "csf": 1.0, "gm": 0.42, "wm": 0.33, "lesion": 0.7},
    "FLAIR": {"scalp": 0.6, "skull": 0.04, "csf": 0.06, "gm": 0.55, "wm": 0.42, "lesion": 0.95},
}


def synthetic_head(contrast: str, snr: float, stripped: bool = False, seed: int = 0, n: int = 64):
    """``(data [n, n, n] float32, head bool [n, n, n])``: an ellipsoidal head on a neck that leaves the field of
    view at the bottom — scalp, dark skull, CSF around the brain and in the ventricles, grey and white matter, a
    lesion — with ``HEAD_SIGNAL[contrast]``, a smooth +-5 % texture, and Rician noise of ``sigma = 0.5 / snr``
    everywhere (the air is noise only). ``stripped``: everything outside the skull set to 0, ``head`` the inside."""
    rng = np.random.default_rng(seed)
    i, j, k = np.indices((n, n, n)).astype(np.float32) / n * 64 - 32
    r = np.sqrt((i / 27) ** 2 + (j / 30) ** 2 + ((k - 3) / 27) ** 2)          # 1 on the scalp's surface
    neck = (np.hypot(i / 13, (j + 4) / 13) < 1) & (k < 3)
    ventricles = (np.hypot(i / 5, j / 11) < 1) & (np.abs(k - 6) < 6)
    lesion = (i - 9) ** 2 + (j + 6) ** 2 + (k - 8) ** 2 < 16
    signal = np.zeros(r.shape, dtype=np.float32)
    tissue = HEAD_SIGNAL[contrast]
    for where, name in [((r < 1) | neck, "scalp"), (r < 0.9, "skull"), (r < 0.82, "csf"), (r < 0.74, "gm"),
                        (r < 0.55, "wm"), (ventricles, "csf"), (lesion, "lesion")]:
        signal[where] = tissue[name]
    signal *= 1 + 0.5 * ndimage.gaussian_filter(rng.standard_normal(r.shape), 2.0)   # smoothed: std about 0.1
    sigma = 0.5 / snr
    data = 1000 * np.hypot(signal + sigma * rng.standard_normal(r.shape), sigma * rng.standard_normal(r.shape))
    head = (r < 1) | neck
    if stripped:
        head = r < 0.82
        data[~head] = 0
    return data.astype(np.float32), head


@pytest.mark.parametrize("snr", [10.0, 20.0])
@pytest.mark.parametrize("stripped", [False, True], ids=["with-skull", "stripped"])
@pytest.mark.parametrize("contrast", list(HEAD_SIGNAL))
def test_auto_foreground_keeps_every_voxel_of_the_head_on_every_contrast(contrast, stripped, snr):
    """No voxel inside the head is zeroed — bright-CSF contrasts included, where Otsu's threshold falls between
    tissue and CSF — and little air is kept (noise specks and the smoothing's halo are dropped)."""
    data, head = synthetic_head(contrast, snr, stripped)
    methods = ["auto"] if stripped else ["auto", "otsu"]
    for method in methods:
        mask = foreground_mask(data, method)
        zeroed = np.count_nonzero(head & ~mask) / np.count_nonzero(head)
        kept_air = np.count_nonzero(mask & ~head) / np.count_nonzero(~head)
        assert zeroed < 1e-3, (method, zeroed)
        assert kept_air < 0.05, (method, kept_air)
        for z in np.flatnonzero(head.any(axis=(0, 1))):                    # slice by slice, too
            assert np.count_nonzero(head[:, :, z] & ~mask[:, :, z]) <= max(1, head[:, :, z].sum() // 500), z
