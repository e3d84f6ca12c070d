"""Readers: every format and on-disk layout lands on the same RAS+ canonical grid and preprocessed slices."""

import hashlib
import shutil
import struct

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from braindino.errors import InputError
from braindino.ingest import PreprocessConfig, content_hash, load_volume, preprocess_volume

SHAPE = (40, 48, 36)
SPACING = (1.2, 0.9, 2.0)
RAS_AFFINE = np.array([[SPACING[0], 0, 0, -24.0],
                       [0, SPACING[1], 0, -21.0],
                       [0, 0, SPACING[2], -30.0],
                       [0, 0, 0, 1]])
MARKER_VALUE = 900
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def make_anatomy() -> np.ndarray:
    """[X, Y, Z] int16 head-like volume in RAS order: off-centre ellipsoid, intensity ramps, one marker blob.

    Ramps along every axis and the off-centre marker make any flip or axis swap visible; the background is low
    seeded noise so that Otsu has something to separate.
    """
    i, j, k = np.indices(SHAPE)
    head = ((i - 22) / 14) ** 2 + ((j - 20) / 16) ** 2 + ((k - 17) / 12) ** 2 < 1
    marker = (i - 28) ** 2 + (j - 30) ** 2 + (k - 20) ** 2 <= 4
    background = np.random.default_rng(7).integers(1, 8, size=SHAPE)
    data = np.where(head, 200 + 3 * i + 2 * j + k, background)
    data[marker] = MARKER_VALUE
    return data.astype(np.int16)


def reoriented(data: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same anatomy stored with voxel axes ``axcodes`` (e.g. "LPS", "ASL"), via nibabel orientation tools."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.axcodes2ornt(axcodes))
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    new_data = nib.orientations.apply_orientation(data, transform)
    assert "".join(nib.aff2axcodes(new_affine)) == axcodes
    return np.ascontiguousarray(new_data), new_affine


def save_nifti(path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """ITK image of ``data`` [X, Y, Z] with RAS ``affine``: ITK wants a [Z, Y, X] array and LPS geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.T))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((RAS_TO_LPS @ affine[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin((RAS_TO_LPS @ affine[:3, 3]).tolist())
    return image


def write_dicom_series(image: sitk.Image, folder, series_uid: str, patient_name: str = "Doe^Jane") -> str:
    """One MR .dcm file per slice of the 3D ``image`` with the position/orientation tags a reader needs."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    orientation = "\\".join(f"{v:g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = "\\".join(f"{v:.6g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {"0008|0060": "MR", "0010|0010": patient_name, "0020|000d": f"{series_uid}.1",
                "0020|000e": series_uid, "0020|0037": orientation, "0020|0032": position,
                "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}"}
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"series{series_uid.rsplit('.', 1)[-1]}_{k:03d}.dcm"))
        writer.Execute(plane)
    return str(folder)


@pytest.fixture(scope="module")
def anatomy_files(tmp_path_factory):
    """The anatomy of :func:`make_anatomy` in nine on-disk layouts and formats: {label: path}."""
    root = tmp_path_factory.mktemp("anatomy")
    data = make_anatomy()
    files = {"nifti RAS": save_nifti(root / "ras.nii.gz", data, RAS_AFFINE)}
    for axcodes in ("LPS", "LAS", "ASL", "SLP"):
        files[f"nifti {axcodes}"] = save_nifti(root / f"{axcodes}.nii", *reoriented(data, RAS_AFFINE, axcodes))
    sitk.WriteImage(to_sitk(data, RAS_AFFINE), str(root / "ras.mha"))
    files["mha RAS"] = str(root / "ras.mha")
    sitk.WriteImage(to_sitk(*reoriented(data, RAS_AFFINE, "PIL")), str(root / "pil.nrrd"))
    files["nrrd PIL"] = str(root / "pil.nrrd")
    files["dicom LPS"] = write_dicom_series(to_sitk(*reoriented(data, RAS_AFFINE, "LPS")), root / "dicom_lps",
                                            "1.2.826.0.1.3680043.2.1125.7.1")
    files["dicom LIA"] = write_dicom_series(to_sitk(*reoriented(data, RAS_AFFINE, "LIA")), root / "dicom_lia",
                                            "1.2.826.0.1.3680043.2.1125.7.2")
    return files


def test_ras_nifti_reads_back_unchanged(anatomy_files):
    volume = load_volume(anatomy_files["nifti RAS"])
    assert volume.data.dtype == np.float32 and volume.data.flags.c_contiguous
    np.testing.assert_array_equal(volume.data, make_anatomy())
    np.testing.assert_allclose(volume.affine, RAS_AFFINE, atol=1e-5)
    np.testing.assert_allclose(volume.spacing, SPACING, rtol=1e-6)


@pytest.mark.parametrize("label", ["nifti LPS", "nifti LAS", "nifti ASL", "nifti SLP", "mha RAS", "nrrd PIL",
                                   "dicom LPS", "dicom LIA"])
def test_every_layout_gives_the_same_canonical_volume(anatomy_files, label):
    volume = load_volume(anatomy_files[label])
    np.testing.assert_array_equal(volume.data, make_anatomy())
    np.testing.assert_allclose(volume.affine, RAS_AFFINE, atol=1e-4)
    assert volume.source_path == anatomy_files[label]


@pytest.mark.parametrize("foreground", ["nonzero", "otsu", "auto"])
def test_preprocessed_slices_identical_across_layouts_and_formats(anatomy_files, foreground):
    config = PreprocessConfig(spacing_mm=1.0, size=64, foreground=foreground, min_foreground_fraction=0.05)
    reference = preprocess_volume(load_volume(anatomy_files["nifti RAS"]), config)
    assert 0 < len(reference.z_indices) < SHAPE[2] or foreground == "nonzero"
    for label, path in anatomy_files.items():
        result = preprocess_volume(load_volume(path), config)
        np.testing.assert_array_equal(result.z_indices, reference.z_indices, err_msg=label)
        np.testing.assert_array_equal(result.slices, reference.slices, err_msg=label)
        assert result.crop_offset == reference.crop_offset and result.resampled_shape == reference.resampled_shape


def test_itk_lps_geometry_maps_marker_to_hand_derived_ras_point(tmp_path):
    """A marker at ITK index (i, j, k) must land at RAS (-Lx, -Py, Sz) of ITK's own physical point."""
    array_zyx = np.zeros((6, 7, 8), dtype=np.int16)
    array_zyx[4, 2, 5] = 100                                   # ITK index (x=5, y=2, z=4)
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing((0.5, 1.5, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    lps = np.array(image.TransformIndexToPhysicalPoint((5, 2, 4)))
    expected_ras = np.array([-lps[0], -lps[1], lps[2]])
    for suffix in (".mha", ".nrrd", ".nhdr", ".mhd"):
        sitk.WriteImage(image, str(tmp_path / f"img{suffix}"))
        volume = load_volume(tmp_path / f"img{suffix}")
        voxel = np.argwhere(volume.data == 100)[0]
        np.testing.assert_allclose((volume.affine @ [*voxel, 1])[:3], expected_ras, atol=1e-6)
        assert sorted(volume.spacing) == [0.5, 1.5, 2.5]
        assert np.all(np.diag(volume.affine)[:3] > 0) and np.count_nonzero(volume.affine[:3, :3]) == 3


def test_nifti_without_qform_or_sform_uses_pixdim_base_affine(tmp_path):
    """With both codes 0, NIfTI's fallback affine flips X about the centre; canonical undoes the flip."""
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    image = nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0]))
    image.set_sform(None, code=0)
    image.set_qform(None, code=0)
    nib.save(image, str(tmp_path / "nocodes.nii"))
    assert nib.load(str(tmp_path / "nocodes.nii")).header["sform_code"] == 0
    volume = load_volume(tmp_path / "nocodes.nii")
    np.testing.assert_array_equal(volume.data, data[::-1])
    expected = np.array([[2, 0, 0, -3.0], [0, 3, 0, -6.0], [0, 0, 4, -10.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(volume.affine, expected)


def test_nifti_scaling_and_4d_volume_index(tmp_path):
    raw = np.stack([np.full((3, 4, 5), value, dtype=np.int16) for value in (1, 2, 3)], axis=-1)
    path = tmp_path / "scaled4d.nii"
    save_nifti(path, raw, np.eye(4))
    with open(path, "r+b") as handle:                          # scl_slope / scl_inter live at bytes 112 / 116
        handle.seek(112)
        handle.write(struct.pack("<ff", 2.0, 10.0))
    for index, raw_value in enumerate((1, 2, 3)):
        volume = load_volume(path, volume_index=index)
        assert volume.data.shape == (3, 4, 5) and volume.data.dtype == np.float32
        np.testing.assert_array_equal(volume.data, 2.0 * raw_value + 10.0)


def test_trailing_singleton_dimension_is_a_3d_volume(tmp_path):
    data = np.random.default_rng(0).random((3, 4, 5, 1)).astype(np.float32)
    volume = load_volume(save_nifti(tmp_path / "x.nii.gz", data, np.eye(4)))
    np.testing.assert_array_equal(volume.data, data[..., 0])


def test_nifti2_is_read(tmp_path):
    data = np.random.default_rng(1).random((3, 4, 5)).astype(np.float32)
    nib.save(nib.Nifti2Image(data, np.diag([1.0, 2.0, 3.0, 1.0])), str(tmp_path / "two.nii"))
    volume = load_volume(tmp_path / "two.nii")
    np.testing.assert_array_equal(volume.data, data)
    assert volume.spacing == (1.0, 2.0, 3.0)


def test_4d_mha_volume_index(tmp_path):
    frames = [sitk.GetImageFromArray(np.full((5, 4, 3), value, dtype=np.float32)) for value in (7.0, 8.0)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(tmp_path / "series.mha"))
    assert load_volume(tmp_path / "series.mha", volume_index=1).data.shape == (3, 4, 5)
    np.testing.assert_array_equal(load_volume(tmp_path / "series.mha", volume_index=1).data, 8.0)
    with pytest.raises(InputError, match="no volume_index"):
        load_volume(tmp_path / "series.mha")


def test_directory_with_two_series_is_refused_without_leaking_tags(tmp_path):
    image = to_sitk(make_anatomy()[:8, :8, :4], RAS_AFFINE)
    write_dicom_series(image, tmp_path / "mixed", "1.2.826.0.1.3680043.2.1125.8.1", patient_name="Doe^Jane")
    write_dicom_series(image, tmp_path / "mixed", "1.2.826.0.1.3680043.2.1125.8.2", patient_name="Doe^Jane")
    with pytest.raises(InputError) as caught:
        load_volume(tmp_path / "mixed")
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "mixed")) and "2 DICOM series" in message
    assert "Doe" not in message and "1.2.826" not in message


def test_single_slice_dicom_series_is_2d(tmp_path):
    write_dicom_series(to_sitk(make_anatomy()[:8, :8, :1], RAS_AFFINE), tmp_path / "one",
                       "1.2.826.0.1.3680043.2.1125.9.1")
    with pytest.raises(InputError, match="2D"):
        load_volume(tmp_path / "one")


def test_content_hash_matches_hashlib_and_tracks_dicom_members(tmp_path):
    payload = np.random.default_rng(2).bytes(5 * (1 << 19) + 3)   # 2.5 MiB: several 1 MiB chunks
    (tmp_path / "blob.nii").write_bytes(payload)
    assert content_hash(tmp_path / "blob.nii") == hashlib.sha256(payload).hexdigest()

    folder = write_dicom_series(to_sitk(make_anatomy()[:8, :8, :3], RAS_AFFINE), tmp_path / "dcm",
                                "1.2.826.0.1.3680043.2.1125.10.1")
    first = content_hash(folder)
    copy = shutil.copytree(folder, tmp_path / "copy")
    assert content_hash(copy) == first
    member = sorted(copy.iterdir())[1]
    member.write_bytes(member.read_bytes()[:-1] + b"\x01")
    assert content_hash(copy) != first


def dicom_slices_at(folder, z_offsets_mm, series_uid: str, prefix: str, value: int = 0) -> None:
    """Add to ``folder`` one 8x8 slice file of series ``series_uid`` per entry of ``z_offsets_mm`` (mm along S)."""
    for number, z_mm in enumerate(z_offsets_mm):
        affine = RAS_AFFINE.copy()
        affine[2, 3] += z_mm
        staging = folder.parent / f"{folder.name}-{prefix}{number}"
        write_dicom_series(to_sitk(make_anatomy()[:8, :8, :1] + value, affine), staging, series_uid)
        for member in staging.iterdir():
            shutil.move(member, folder / f"{prefix}{number:03d}_{member.name}")
        staging.rmdir()


@pytest.mark.parametrize("case, z_offsets_mm, extra_offsets_mm", [
    ("missing slice", [0, 2, 4, 8, 10], []),
    ("uneven gap", [0, 2, 4, 6, 7], []),
    ("two interleaved volumes", [0, 2, 4, 6], [0, 2, 4, 6]),
])
def test_dicom_series_with_missing_duplicate_or_uneven_slices_is_refused(tmp_path, capfd, case,
                                                                         z_offsets_mm, extra_offsets_mm):
    folder = tmp_path / "series"
    folder.mkdir()
    dicom_slices_at(folder, z_offsets_mm, "1.2.826.0.1.3680043.2.1125.11.1", "a")
    dicom_slices_at(folder, extra_offsets_mm, "1.2.826.0.1.3680043.2.1125.11.1", "b", value=50)
    with pytest.raises(InputError) as caught:
        load_volume(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder}: DICOM series has missing, duplicate or unevenly spaced slices"), case
    assert "split or re-export" in message and "\n" not in message
    assert "Doe" not in message and "1.2.826" not in message
    distinct = len(set(z_offsets_mm + extra_offsets_mm))
    assert f"{len(z_offsets_mm) + len(extra_offsets_mm)} files at {distinct} distinct positions" in message
    assert capfd.readouterr() == ("", "")                    # no ITK warning on the console


def test_dicom_gap_jitter_within_tolerance_is_read_without_console_warnings(tmp_path, capfd):
    """A 5 % gap deviation passes the check; ITK's own "non uniform sampling" warning must stay off the console."""
    folder = tmp_path / "series"
    folder.mkdir()
    dicom_slices_at(folder, [0, 2, 4, 6, 8.1], "1.2.826.0.1.3680043.2.1125.12.1", "a")
    volume = load_volume(folder)
    assert volume.data.shape == (8, 8, 5)
    assert capfd.readouterr() == ("", "")
