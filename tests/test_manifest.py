"""Manifest parsing: columns, types, path resolution, duplicates and labels."""

import os

import pandas as pd
import pytest

from braindino.errors import InputError
from braindino.manifest import assert_no_duplicate_rows, find_duplicate_rows, label_columns, read_manifest


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_standard_columns_types_and_relative_paths(tmp_path):
    manifest = write(tmp_path / "study" / "manifest.csv",
                     "path,subject,sequence,split,volume_index,age,diagnosis\n"
                     "sub-001/t1.nii.gz,001,T1,train,,71,AD\n"
                     "sub-001/flair.nii.gz,001,FLAIR,Train,,71,AD\n"
                     f"{tmp_path}/abs/dwi.nii.gz,002, DWI ,test,2,64,CN\n"
                     "../elsewhere/t1.mha,003,T1,,,58,CN\n")
    df = read_manifest(manifest)
    assert list(df.columns) == ["path", "subject", "sequence", "split", "volume_index", "age", "diagnosis"]
    assert df["path"].tolist() == [str(tmp_path / "study" / "sub-001" / "t1.nii.gz"),
                                   str(tmp_path / "study" / "sub-001" / "flair.nii.gz"),
                                   str(tmp_path / "abs" / "dwi.nii.gz"),
                                   str(tmp_path / "elsewhere" / "t1.mha")]
    assert df["subject"].tolist() == ["001", "001", "002", "003"]          # leading zeros kept
    assert df["sequence"].tolist() == ["T1", "FLAIR", "DWI", "T1"]
    assert df["split"].tolist() == ["train", "train", "test", ""]
    assert str(df["volume_index"].dtype) == "Int64"
    assert df["volume_index"].isna().tolist() == [True, True, False, True] and df["volume_index"][2] == 2
    assert df["age"].tolist() == [71, 71, 64, 58]
    assert label_columns(df) == ["age", "diagnosis"]
    assert df.attrs["manifest_path"] == str(manifest)


def test_optional_columns_are_added_when_absent(tmp_path):
    df = read_manifest(write(tmp_path / "m.csv", "subject,path,score\ns1,a.nii,0.5\n"))
    assert list(df.columns) == ["path", "subject", "sequence", "split", "volume_index", "score"]
    assert df["sequence"].tolist() == [""] and df["split"].tolist() == [""]
    assert df["volume_index"].isna().all()
    assert label_columns(df) == ["score"]


def test_excel_style_bom_and_integral_float_volume_index(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("path,subject,volume_index\na.nii,s1,3.0\n".encode("utf-8-sig"))
    df = read_manifest(path)
    assert df["volume_index"].tolist() == [3]


def test_duplicates_are_same_resolved_path_and_volume_index(tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "link")
    manifest = write(tmp_path / "m.csv",
                     "path,subject,volume_index\n"
                     "data/a.nii,s1,\n"          # row 2
                     "data/../data/a.nii,s1,\n"  # row 3: same file
                     "link/a.nii,s2,\n"          # row 4: same file through a symlink
                     "data/b.nii,s3,0\n"         # row 5
                     "data/b.nii,s3,1\n"         # row 6: other volume of the same 4D file
                     "data/b.nii,s3,1\n")        # row 7: duplicate of row 6
    df = read_manifest(manifest)
    assert find_duplicate_rows(df) == [1, 2, 5]
    with pytest.raises(InputError) as caught:
        assert_no_duplicate_rows(df)
    message = str(caught.value)
    assert message.startswith(f"{manifest}: ")
    assert "row 3 repeats row 2" in message and "row 4 repeats row 2" in message and "row 7 repeats row 6" in message


def test_no_duplicates(tmp_path):
    df = read_manifest(write(tmp_path / "m.csv", "path,subject\na.nii,s1\nb.nii,s1\n"))
    assert find_duplicate_rows(df) == []
    assert_no_duplicate_rows(df)


def test_find_duplicate_rows_accepts_a_frame_without_volume_index():
    df = pd.DataFrame({"path": ["/x/a.nii", "/x/a.nii", "/x/b.nii"], "subject": ["1", "2", "3"]})
    assert find_duplicate_rows(df) == [1]


def test_mask_column_resolves_like_path_and_empty_stays_empty(tmp_path):
    manifest = write(tmp_path / "study" / "manifest.csv",
                     "path,subject,mask,grade\n"
                     "sub-1/t1.nii.gz,1,sub-1/seg.nii.gz,2\n"
                     f"sub-2/t1.nii.gz,2,{tmp_path}/labels/seg2.nii.gz,3\n"
                     "sub-3/t1.nii.gz,3,,1\n"
                     "sub-4/t1.nii.gz,4,../shared/seg4.nii.gz,1\n")
    df = read_manifest(manifest)
    assert df["mask"].tolist() == [str(tmp_path / "study" / "sub-1" / "seg.nii.gz"),
                                   str(tmp_path / "labels" / "seg2.nii.gz"), "",
                                   str(tmp_path / "shared" / "seg4.nii.gz")]
    assert label_columns(df) == ["mask", "grade"]
