"""Every bad input gives one InputError line that names the file, says what is wrong and what to do."""

import gzip
import struct

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_files import write_12bit_lossy_jpeg, write_mosaic_series, write_series_with_unparsable_member

from braindino.errors import InputError
from braindino.ingest import (
    PreprocessConfig,
    content_hash,
    load_volume,
    preprocess_volume,
)
from braindino.manifest import read_manifest

PIXDIM_OFFSET = 76          # NIfTI-1 header byte offsets (float32 pixdim[8], int16 codes, float32 srow_x/y/z)
QFORM_CODE_OFFSET = 252
SROW_X_OFFSET = 280


def expect_input_error(call, path, *cause_words):
    """Run ``call``; it must raise InputError for ``path`` whose cause contains every word (case-insensitive)."""
    with pytest.raises(InputError) as caught:
        call()
    error = caught.value
    message = str(error)
    assert message.startswith(f"{path}: ") and "\n" not in message and error.hint
    for word in cause_words:
        assert word.lower() in error.cause.lower(), (word, message)
    return error


def nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def patch(path, offset: int, fmt: str, *values):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack(fmt, *values))


def small_volume():
    return np.random.default_rng(0).uniform(1, 10, size=(6, 7, 8)).astype(np.float32)


def handwritten_mha(path, spacing: str):
    """A MetaImage whose spacing line is written by hand (SimpleITK refuses to create zero spacing)."""
    header = (f"ObjectType = Image\nNDims = 3\nElementSpacing = {spacing}\nDimSize = 4 5 6\n"
              "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    path.write_bytes(header.encode() + np.ones(4 * 5 * 6, dtype="<i2").tobytes())
    return path


def test_missing_file(tmp_path):
    expect_input_error(lambda: load_volume(tmp_path / "absent.nii.gz"), tmp_path / "absent.nii.gz", "not found")
    expect_input_error(lambda: content_hash(tmp_path / "absent.nii"), tmp_path / "absent.nii", "not found")


@pytest.mark.parametrize("name", ["scan.png", "scan.tar.gz", "scan"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    error = expect_input_error(lambda: load_volume(path), path, "unsupported")
    assert ".nii.gz" in error.hint


def test_truncated_gzip(tmp_path):
    path = nifti(tmp_path / "t.nii.gz", small_volume())
    path.write_bytes(path.read_bytes()[:-40])
    expect_input_error(lambda: load_volume(path), path, "truncated")


def test_not_gzip_although_named_gz(tmp_path):
    plain = nifti(tmp_path / "plain.nii", small_volume())
    path = tmp_path / "plain.nii.gz"
    path.write_bytes(plain.read_bytes())
    expect_input_error(lambda: load_volume(path), path, "not a valid gzip")


def test_gzip_with_damaged_payload(tmp_path):
    path = nifti(tmp_path / "d.nii.gz", small_volume())
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    expect_input_error(lambda: load_volume(path), path, "gzip")


def test_gzip_data_named_nii(tmp_path):
    path = tmp_path / "c.nii"
    path.write_bytes(gzip.compress(nib.Nifti1Image(small_volume(), np.eye(4)).to_bytes()))
    error = expect_input_error(lambda: load_volume(path), path, "gzip-compressed")
    assert ".nii.gz" in error.hint


@pytest.mark.parametrize("damage", ["magic", "header size", "short"])
def test_corrupt_nifti_header(tmp_path, damage):
    path = nifti(tmp_path / "h.nii", small_volume())
    if damage == "magic":
        patch(path, 344, "4s", b"zzz\0")
    elif damage == "header size":
        patch(path, 0, "<i", 1234)
    else:
        path.write_bytes(path.read_bytes()[:200])
    expect_input_error(lambda: load_volume(path), path, "header")


def test_truncated_nifti_data(tmp_path):
    path = nifti(tmp_path / "short.nii", small_volume())
    path.write_bytes(path.read_bytes()[:-100])
    expect_input_error(lambda: load_volume(path), path, "truncated")


def test_corrupt_and_truncated_itk_files(tmp_path):
    garbage = tmp_path / "garbage.mha"
    garbage.write_bytes(b"this is not a MetaImage header\n" + bytes(100))
    expect_input_error(lambda: load_volume(garbage), garbage, "header")
    truncated = tmp_path / "truncated.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(small_volume()), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-200])
    expect_input_error(lambda: load_volume(truncated), truncated, "truncated")


def test_nan_voxels(tmp_path):
    data = small_volume()
    data[1, 2, 3] = np.nan
    data[2, 2, 2] = np.nan
    path = nifti(tmp_path / "nan.nii.gz", data)
    error = expect_input_error(lambda: load_volume(path), path, "2 voxels", "nan")
    assert "replace" in error.hint


def test_inf_voxels(tmp_path):
    data = small_volume()
    data[0, 0, 0] = np.inf
    path = tmp_path / "inf.mha"
    sitk.WriteImage(sitk.GetImageFromArray(data), str(path))
    expect_input_error(lambda: load_volume(path), path, "1 voxels", "infinite")


@pytest.mark.parametrize("value", [0.0, -1.5])
def test_zero_or_negative_nifti_pixdim(tmp_path, value):
    path = nifti(tmp_path / "pixdim.nii", small_volume())
    patch(path, PIXDIM_OFFSET + 4 * 2, "<f", value)          # pixdim[2]: spacing along the second axis
    expect_input_error(lambda: load_volume(path), path, "spacing", "axis 1")


@pytest.mark.parametrize("spacing", ["1 0 1", "1 1 -2"])
def test_zero_or_negative_itk_spacing(tmp_path, spacing):
    path = handwritten_mha(tmp_path / "spacing.mha", spacing)
    expect_input_error(lambda: load_volume(path), path, "spacing")


def test_singular_nifti_affine(tmp_path):
    path = nifti(tmp_path / "singular.nii", small_volume())
    patch(path, QFORM_CODE_OFFSET, "<hh", 0, 2)                            # qform off, sform on
    patch(path, SROW_X_OFFSET, "<12f", 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0)  # first two columns identical
    assert np.linalg.matrix_rank(nib.load(str(path)).affine[:3, :3]) == 2
    expect_input_error(lambda: load_volume(path), path, "singular")


@pytest.mark.parametrize("shape", [(6, 7), (6, 7, 1)])
def test_2d_nifti(tmp_path, shape):
    path = nifti(tmp_path / "flat.nii.gz", np.ones(shape, dtype=np.float32))
    expect_input_error(lambda: load_volume(path), path, "2D")


def test_2d_mha(tmp_path):
    path = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((6, 7), dtype=np.float32)), str(path))
    expect_input_error(lambda: load_volume(path), path, "2D")


def test_4d_without_volume_index(tmp_path):
    path = nifti(tmp_path / "dwi.nii.gz", np.ones((4, 5, 6, 3), dtype=np.float32))
    error = expect_input_error(lambda: load_volume(path), path, "4D", "3 volumes", "no volume_index")
    assert "volume_index" in error.hint and "0..2" in error.hint


@pytest.mark.parametrize("index", [3, -1])
def test_4d_volume_index_out_of_range(tmp_path, index):
    path = nifti(tmp_path / "dwi.nii.gz", np.ones((4, 5, 6, 3), dtype=np.float32))
    expect_input_error(lambda: load_volume(path, volume_index=index), path, "out of range")


@pytest.mark.parametrize("index", [1.5, "2", True])
def test_volume_index_that_is_not_a_whole_number(tmp_path, index):
    path = nifti(tmp_path / "dwi.nii.gz", np.ones((4, 5, 6, 3), dtype=np.float32))
    expect_input_error(lambda: load_volume(path, volume_index=index), path, "not a whole number")


def test_volume_index_on_3d_image(tmp_path):
    path = nifti(tmp_path / "t1.nii.gz", small_volume())
    expect_input_error(lambda: load_volume(path, volume_index=2), path, "3D")


def test_all_zero_volume(tmp_path):
    path = nifti(tmp_path / "zeros.nii.gz", np.zeros((6, 7, 8), dtype=np.int16))
    volume = load_volume(path)
    expect_input_error(lambda: preprocess_volume(volume, PreprocessConfig(size=8)), path, "all voxels are zero")


@pytest.mark.parametrize("zooms, size, words", [
    ((1000.0, 1000.0, 1000.0), 224, ["6000 x 7000 mm", "1000 x 1000", "wider than 600 mm"]),   # microns as mm
    ((100.0, 100.0, 1.0), 224, ["600 x 700 mm", "100 x 100", "wider than 600"]),
    ((30.0, 30.0, 1.0), 32, ["180 x 210 mm", "180 x 210 pixels", "more than 4 x size 32"]),
])
def test_implausible_in_plane_extent(tmp_path, zooms, size, words):
    """Voxel sizes in the wrong units would resample to huge slices: refused, naming spacing and extent."""
    path = nifti(tmp_path / "units.nii.gz", small_volume(), np.diag([*zooms, 1.0]))
    volume = load_volume(path)
    error = expect_input_error(lambda: preprocess_volume(volume, PreprocessConfig(size=size)), path, *words)
    assert "pixdim" in error.hint and "xyzt_units" in error.hint


def test_empty_dicom_directory(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    expect_input_error(lambda: load_volume(folder), folder, "empty")


def test_directory_without_dicom_files(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    expect_input_error(lambda: load_volume(folder), folder, "no readable DICOM series")


def write_manifest(tmp_path, content: bytes | str):
    path = tmp_path / "manifest.csv"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize("header, missing", [("subject,split\n", "path"), ("path,label\n", "subject"),
                                             ("file,patient\n", "path, subject")])
def test_manifest_missing_required_columns(tmp_path, header, missing):
    path = write_manifest(tmp_path, header + "a,b\n")
    expect_input_error(lambda: read_manifest(path), path, f"missing required column(s) {missing}")


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe\x00p\x00a\x00t\x00h", ["utf-8"]),
    ("path,subject\na.nii,s1\n\"b.nii,s2\n", ["not a readable csv"]),
    ("path,subject\na.nii,s1,extra,fields\n", ["not a readable csv"]),
    ("path,subject\na.nii,s1\nb.nii,s2,extra\n", ["not a readable csv", "line 3"]),
    ("", ["empty"]),
    ("path,subject\n", ["no rows"]),
])
def test_unreadable_manifest(tmp_path, content, words):
    path = write_manifest(tmp_path, content)
    expect_input_error(lambda: read_manifest(path), path, *words)


def test_manifest_not_found(tmp_path):
    expect_input_error(lambda: read_manifest(tmp_path / "nope.csv"), tmp_path / "nope.csv", "not found")


@pytest.mark.parametrize("rows, words", [
    ("a.nii,s1,train\nb.nii,s2,training\nc.nii,s3,dev\n", ["split", "rows 3, 4"]),
    ("a.nii,,train\nb.nii,s2,val\n", ["empty subject", "row 2"]),
    ("a.nii,s1,val\n,s2,val\n", ["empty path", "row 3"]),
])
def test_manifest_bad_cells(tmp_path, rows, words):
    path = write_manifest(tmp_path, "path,subject,split\n" + rows)
    expect_input_error(lambda: read_manifest(path), path, *words)


@pytest.mark.parametrize("value", ["-1", "1.5", "two"])
def test_manifest_bad_volume_index(tmp_path, value):
    path = write_manifest(tmp_path, f"path,subject,volume_index\na.nii,s1,0\nb.nii,s2,{value}\n")
    expect_input_error(lambda: read_manifest(path), path, "volume_index", "row 3")


# ------------------------------------------------------------------------- every kind through `braindino prepare`


def bad_files(folder):
    """Every kind of bad file above, made in ``folder``: ``[(path, volume_index or "", words its cause holds)]``."""
    import shutil

    def copy(name, source):
        shutil.copy(source, folder / name)
        return folder / name

    made = folder / "made"
    made.mkdir()
    nii = nifti(made / "plain.nii", small_volume())
    gz = nifti(made / "plain.nii.gz", small_volume())
    four_d = nifti(folder / "dwi.nii.gz", np.ones((4, 5, 6, 3), dtype=np.float32))
    kinds = [(folder / "absent.nii.gz", "", ["not found"])]
    png = folder / "scan.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    kinds.append((png, "", ["unsupported"]))
    path = copy("truncated.nii.gz", gz)
    path.write_bytes(path.read_bytes()[:-40])
    kinds.append((path, "", ["truncated"]))
    path = folder / "plain_named.nii.gz"
    path.write_bytes(nii.read_bytes())
    kinds.append((path, "", ["not a valid gzip"]))
    path = copy("damaged.nii.gz", gz)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    kinds.append((path, "", ["gzip"]))
    path = folder / "compressed.nii"
    path.write_bytes(gzip.compress(nib.Nifti1Image(small_volume(), np.eye(4)).to_bytes()))
    kinds.append((path, "", ["gzip-compressed"]))
    for damage in ("magic", "size", "short"):
        path = copy(f"header_{damage}.nii", nii)
        if damage == "magic":
            patch(path, 344, "4s", b"zzz\0")
        elif damage == "size":
            patch(path, 0, "<i", 1234)
        else:
            path.write_bytes(path.read_bytes()[:200])
        kinds.append((path, "", ["header"]))
    path = copy("short_data.nii", nii)
    path.write_bytes(path.read_bytes()[:-100])
    kinds.append((path, "", ["truncated"]))
    path = folder / "garbage.mha"
    path.write_bytes(b"this is not a MetaImage header\n" + bytes(100))
    kinds.append((path, "", ["header"]))
    path = folder / "truncated.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(small_volume()), str(path))
    path.write_bytes(path.read_bytes()[:-200])
    kinds.append((path, "", ["truncated"]))
    data = small_volume()
    data[1, 2, 3] = data[2, 2, 2] = np.nan
    kinds.append((nifti(folder / "nan.nii.gz", data), "", ["2 voxels", "nan"]))
    data = small_volume()
    data[0, 0, 0] = np.inf
    path = folder / "inf.mha"
    sitk.WriteImage(sitk.GetImageFromArray(data), str(path))
    kinds.append((path, "", ["1 voxels", "infinite"]))
    path = copy("pixdim.nii", nii)
    patch(path, PIXDIM_OFFSET + 4 * 2, "<f", 0.0)
    kinds.append((path, "", ["spacing", "axis 1"]))
    kinds.append((handwritten_mha(folder / "spacing.mha", "1 1 -2"), "", ["spacing"]))
    path = copy("singular.nii", nii)
    patch(path, QFORM_CODE_OFFSET, "<hh", 0, 2)
    patch(path, SROW_X_OFFSET, "<12f", 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0)
    kinds.append((path, "", ["singular"]))
    kinds.append((nifti(folder / "flat.nii.gz", np.ones((6, 7, 1), dtype=np.float32)), "", ["2D"]))
    path = folder / "flat.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((6, 7), dtype=np.float32)), str(path))
    kinds.append((path, "", ["2D"]))
    kinds.append((four_d, "", ["4D", "3 volumes", "no volume_index"]))
    kinds.append((four_d, "3", ["out of range"]))
    kinds.append((gz, "2", ["3D"]))
    kinds.append((nifti(folder / "zeros.nii.gz", np.zeros((6, 7, 8), dtype=np.int16)), "", ["all voxels are zero"]))
    kinds.append((nifti(folder / "units.nii.gz", small_volume(), np.diag([30.0, 30.0, 1.0, 1.0])), "",
                  ["180 x 210 mm", "more than 4 x size 32"]))
    (folder / "dicom").mkdir()
    kinds.append((folder / "dicom", "", ["empty"]))
    (folder / "notes").mkdir()
    (folder / "notes" / "readme.txt").write_text("no images here", encoding="utf-8")
    kinds.append((folder / "notes", "", ["no readable DICOM series"]))
    kinds.append((write_mosaic_series(folder / "mosaic"), "", ["mosaic"]))
    kinds.append((write_series_with_unparsable_member(folder / "damaged_member"), "",
                  ["zz_damaged.dcm", "cannot be parsed"]))
    kinds.append((write_12bit_lossy_jpeg(folder / "lossy.dcm"), "", ["pixel data could not be decoded: 12-bit"]))
    return kinds


def test_every_bad_file_kind_through_the_prepare_command(tmp_path):
    """One manifest holding every kind of bad file and one good volume, through the real `braindino prepare`: exit
    status 1, the good volume stored, errors.csv one row per bad file naming its cause, and on the console nothing
    but one line per bad file, the progress bar and the summary."""
    import subprocess
    import sys

    import pandas as pd
    from conftest import head_like_volume

    from braindino.store import SliceStore

    kinds = bad_files(tmp_path)
    good = nifti(tmp_path / "good.nii.gz", head_like_volume(np.random.default_rng(0)),
                 np.diag([3.2, 3.2, 5.0, 1.0]))                       # a head 102 mm across: no geometry warning
    rows = [{"path": str(path), "subject": f"s{i:02d}", "volume_index": index}
            for i, (path, index, _) in enumerate(kinds)]
    rows.insert(len(rows) // 2, {"path": str(good), "subject": "good", "volume_index": ""})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    store = tmp_path / "store"
    finished = subprocess.run([sys.executable, "-m", "braindino.cli", "prepare", "--manifest",
                               str(tmp_path / "manifest.csv"), "--out", str(store), "--size", "32", "--workers", "1"],
                              check=False, capture_output=True, encoding="utf-8", timeout=300)
    assert finished.returncode == 1, finished.stderr[-2000:]
    assert SliceStore(store).volumes["path"].tolist() == [str(good)]

    errors = pd.read_csv(store / "errors.csv", dtype=str, keep_default_na=False)
    assert errors["path"].tolist() == [str(path) for path, _, _ in kinds]
    for (path, _, words), cause, hint in zip(kinds, errors["cause"], errors["hint"], strict=True):
        assert all(word.lower() in cause.lower() for word in words), (path.name, words, cause)
        assert "\n" not in cause and len(hint) > 10 and not cause.startswith("unexpected error"), (path.name, cause)

    lines = [line for line in (finished.stdout + finished.stderr).replace("\r", "\n").splitlines() if line.strip()]
    progress = [line for line in lines if line.startswith("prepare:") and "vol/s" in line]
    summary = [line for line in lines if line.startswith("braindino prepare: ")]
    assert len(summary) == 1 and f"1 volumes stored, 0 unchanged, {len(kinds)} failed" in summary[0]
    per_file = [line for line in lines if line not in progress and line not in summary]
    assert per_file == [f"{path}: {cause} — {hint}" for path, cause, hint in
                        zip(errors["path"], errors["cause"], errors["hint"], strict=True)]
