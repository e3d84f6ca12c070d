"""DICOM as scanners and archives write it: enhanced multi-frame files, Siemens mosaics, files GDCM cannot parse,
pixel data its codecs cannot decode — each read correctly or refused with one line naming the file, never a
library's own text, and nothing printed by a codec on the console. Real files shipped in nibabel's (and, when it is
installed, pydicom's) wheel are used alongside the generated ones."""

import nibabel as nib
import numpy as np
import pytest
from dicom_files import (PER_FRAME_GROUPS, PIXEL_MEASURES_SEQUENCE, PLANE_ORIENTATION_SEQUENCE,
                         PLANE_POSITION_SEQUENCE, shipped_dicom, write_12bit_lossy_jpeg, write_enhanced_mr,
                         write_mosaic_series, write_series_with_unparsable_member)
from test_readers import RAS_AFFINE, SPACING, make_anatomy, reoriented, to_sitk

from braindino.errors import InputError
from braindino.ingest import PreprocessConfig, load_volume, preprocess_volume

LIBRARY_TEXT = (".cxx", ".h:", "SimpleITK", "gdcm", "itk::", "Exception thrown", "unexpected error")


def one_line_error(call, path, *words) -> InputError:
    """``call()`` must raise an InputError for ``path``: one line, its cause holding ``words``, no library text."""
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for word in words:
        assert word.lower() in caught.value.cause.lower(), (word, message)
    said = f"{caught.value.cause} {caught.value.hint}".lower()
    assert not any(text.lower() in said for text in LIBRARY_TEXT), message
    assert "Doe" not in message and "1.2.826" not in message, message
    return caught.value


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory):
    """The anatomy of ``make_anatomy`` stored sagittally (voxel axes PIR) as one Enhanced MR file, given both as
    the file and as a folder holding only it: ``{"file": path, "folder": path}``."""
    root = tmp_path_factory.mktemp("enhanced")
    path = write_enhanced_mr(root / "enhanced.dcm", to_sitk(*reoriented(make_anatomy(), RAS_AFFINE, "PIR")))
    (root / "folder").mkdir()
    write_enhanced_mr(root / "folder" / "IM_0001.dcm", to_sitk(*reoriented(make_anatomy(), RAS_AFFINE, "PIR")))
    (root / "folder" / "IM_0001.dcm").rename(root / "folder" / "IM_0001")     # archives often drop the suffix
    return {"file": path, "folder": root / "folder"}


def test_generated_enhanced_file_holds_per_frame_functional_groups(enhanced):
    raw = enhanced["file"].read_bytes()
    n_frames = make_anatomy().shape[0]                          # PIR: the R axis runs across the frames
    assert raw.count(PLANE_POSITION_SEQUENCE) == n_frames and raw.count(PER_FRAME_GROUPS) == 1
    assert raw.count(PLANE_ORIENTATION_SEQUENCE) >= 1 and raw.count(PIXEL_MEASURES_SEQUENCE) >= 1


@pytest.mark.parametrize("given", ["file", "folder"])
def test_enhanced_multiframe_dicom_reads_as_its_3d_volume(enhanced, given, capfd):
    volume = load_volume(enhanced[given])
    np.testing.assert_array_equal(volume.data, make_anatomy().astype(np.float32))
    np.testing.assert_allclose(volume.affine, RAS_AFFINE, atol=1e-4)
    np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-5)
    assert "".join(nib.aff2axcodes(volume.native_affine)) == "PIR"
    assert capfd.readouterr() == ("", "")


def test_enhanced_dicom_gives_the_slices_of_the_same_anatomy_as_nifti(enhanced, tmp_path):
    nifti = tmp_path / "same.nii.gz"
    nib.save(nib.Nifti1Image(make_anatomy(), RAS_AFFINE), str(nifti))
    config = PreprocessConfig(size=32, spacing_mm=1.5)
    expected = preprocess_volume(load_volume(nifti), config)
    for given in ("file", "folder"):
        got = preprocess_volume(load_volume(enhanced[given]), config)
        np.testing.assert_array_equal(got.z_indices, expected.z_indices)
        np.testing.assert_allclose(got.slices, expected.slices, atol=1e-6)


@pytest.mark.parametrize("given", ["file", "folder"])
def test_real_philips_enhanced_mprage_reads_as_a_sagittal_3d_volume(tmp_path, given):
    """nibabel ships a Philips Enhanced MR MPRAGE (176 sagittal frames of 256 x 256 at 1 mm; its pixels blanked)."""
    path = shipped_dicom("nibabel", "nicom/tests/data/philips_mprage.dcm.gz", tmp_path / "one")
    volume = load_volume(path if given == "file" else path.parent)
    assert volume.data.shape == (176, 256, 256)
    np.testing.assert_allclose(volume.spacing, (1.0, 1.0, 1.0), atol=1e-3)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert volume.native_shape == (256, 256, 176)


def test_mosaic_series_is_refused_never_stacked(tmp_path, capfd):
    folder = write_mosaic_series(tmp_path / "mosaic")
    error = one_line_error(lambda: load_volume(folder), folder, "mosaic")
    assert "dcm2niix" in error.hint
    one_line_error(lambda: load_volume(folder / "mosaic_000.dcm"), folder / "mosaic_000.dcm", "mosaic")
    assert capfd.readouterr() == ("", "")


def test_real_siemens_mosaics_are_refused(tmp_path):
    """nibabel ships two Siemens DWI mosaics (ImageType ...\\MOSAIC, a CSA header counting the tiles)."""
    folder = tmp_path / "dwi"
    for name in ("0.dcm", "1.dcm"):
        shipped_dicom("nibabel", f"nicom/tests/data/{name}", folder)
    assert "dcm2niix" in one_line_error(lambda: load_volume(folder), folder, "mosaic").hint
    single = shipped_dicom("nibabel", "nicom/tests/data/siemens_dwi_1000.dcm.gz", tmp_path / "single")
    one_line_error(lambda: load_volume(single), single, "mosaic")


def test_unparsable_member_fails_its_folder_naming_the_file(tmp_path, capfd):
    folder = write_series_with_unparsable_member(tmp_path / "series")
    error = one_line_error(lambda: load_volume(folder), folder, "zz_damaged.dcm", "cannot be parsed")
    assert "dcm2niix" in error.hint
    assert capfd.readouterr() == ("", "")


def test_embed_volume_raises_input_error_for_an_unparsable_dicom(tmp_path):
    from conftest import write_tiny_model

    from braindino import load_encoder

    encoder = load_encoder(write_tiny_model(tmp_path / "model"))
    folder = write_series_with_unparsable_member(tmp_path / "series")
    one_line_error(lambda: encoder.embed_volume(folder), folder, "zz_damaged.dcm")


def test_real_file_gdcm_cannot_parse_is_named(tmp_path):
    """nibabel ships a Siemens file whose header GDCM refuses."""
    path = shipped_dicom("nibabel", "nicom/tests/data/csa_slice_norm.dcm", tmp_path)
    one_line_error(lambda: load_volume(path), path, "cannot be parsed")


@pytest.mark.parametrize("given", ["file", "folder"])
def test_undecodable_12bit_lossy_jpeg_says_so_and_prints_nothing(tmp_path, capfd, given):
    path = write_12bit_lossy_jpeg(tmp_path / "lossy" / "lossy.dcm") if given == "folder" else (
        write_12bit_lossy_jpeg(tmp_path / "lossy.dcm"))
    where = path.parent if given == "folder" else path
    error = one_line_error(lambda: load_volume(where), where)
    assert error.cause == "pixel data could not be decoded: 12-bit lossy JPEG"
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("name", ["JPEG-lossy.dcm", "JPGExtended.dcm"])
def test_real_12bit_lossy_jpeg_from_pydicom(tmp_path, capfd, name):
    path = shipped_dicom("pydicom", f"data/test_files/{name}", tmp_path)
    error = one_line_error(lambda: load_volume(path), path)
    assert error.cause == "pixel data could not be decoded: 12-bit lossy JPEG"
    assert capfd.readouterr() == ("", "")
