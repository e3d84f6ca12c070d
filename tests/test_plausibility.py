"""Implausible geometry: a tiny head, thick slices, a label map given as an image — one warning line naming the
file, the volume stored anyway; refused with ``prepare --strict``."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import head_like_volume

from braindino.cli import main
from braindino.ingest import PreprocessConfig, load_volume, preprocess_volume
from braindino.ingest.plausibility import distinct_values, implausible_geometry
from braindino.store import SliceStore

PLAUSIBLE_ZOOMS = (3.2, 3.2, 5.0)        # the 40 x 40 x 20 head of head_like_volume(seed 0): 102 mm across


def nifti(path, data, zooms) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.diag([*zooms, 1.0])), str(path))
    return str(path)


def label_map() -> np.ndarray:
    """``[40, 40, 20]``: the head of ``head_like_volume`` cut into 4 labelled regions (values 0..4)."""
    head = head_like_volume(np.random.default_rng(0)) > 0
    labels = np.zeros(head.shape, dtype=np.float32)
    labels[head] = 1 + (np.indices(head.shape)[0][head] * 4) // head.shape[0]
    return labels


def warnings_for(path) -> list[str]:
    volume = load_volume(path)
    return [w.cause for w in implausible_geometry(volume, preprocess_volume(volume, PreprocessConfig(size=32)))]


@pytest.mark.parametrize("case, zooms, words", [
    ("plausible", PLAUSIBLE_ZOOMS, []),
    ("tiny head", (1.0, 1.0, 1.0), ["only 32 mm across", "32 x 30 x 14 mm", "under 100 mm"]),
    ("thick slices", (3.2, 3.2, 7.5), ["7.5 mm apart", "3.2 x 3.2 x 7.5 mm", "over 6 mm"]),
])
def test_geometry_warnings(tmp_path, case, zooms, words):
    causes = warnings_for(nifti(tmp_path / "v.nii.gz", head_like_volume(np.random.default_rng(0)), zooms))
    assert len(causes) == (1 if words else 0), (case, causes)
    assert all(word in causes[0] for word in words), (case, causes)


def test_label_map_given_as_image_warns(tmp_path):
    causes = warnings_for(nifti(tmp_path / "labels.nii.gz", label_map(), PLAUSIBLE_ZOOMS))
    assert causes == ["image holds only 5 distinct values (a label map or mask?)"]


def test_distinct_values_is_exact_for_few_values():
    rng = np.random.default_rng(1)
    few = rng.integers(0, 9, size=(70, 70, 70)).astype(np.float32)
    few[5, 5, 5] = 100.0                     # one voxel the sample skips
    assert distinct_values(few) == 10
    assert distinct_values(rng.normal(size=(70, 70, 70))) > 16


@pytest.fixture
def mixed_cohort(tmp_path):
    """A plausible head, a tiny head and a label map; returns the manifest path."""
    rng = np.random.default_rng(0)
    paths = [nifti(tmp_path / "good.nii.gz", head_like_volume(np.random.default_rng(0)), PLAUSIBLE_ZOOMS),
             nifti(tmp_path / "tiny.nii.gz", head_like_volume(rng), (1.0, 1.0, 1.0)),
             nifti(tmp_path / "labels.nii.gz", label_map(), PLAUSIBLE_ZOOMS)]
    pd.DataFrame({"path": paths, "subject": ["a", "b", "c"]}).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


def prepare(manifest, out, *options) -> int:
    return main(["prepare", "--manifest", str(manifest), "--out", str(out), "--size", "32", "--workers", "1",
                 *options])


def test_prepare_warns_once_per_implausible_volume_and_stores_it(mixed_cohort, tmp_path, capsys):
    assert prepare(mixed_cohort, tmp_path / "store") == 0
    console = capsys.readouterr().out
    warnings = [line for line in console.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, console
    assert warnings[0].startswith(f"warning: {tmp_path / 'tiny.nii.gz'}: foreground is only ")
    assert warnings[1].startswith(f"warning: {tmp_path / 'labels.nii.gz'}: image holds only 5 distinct values")
    assert all(line.endswith("stored anyway (prepare --strict refuses such volumes)") for line in warnings)
    assert "3 volumes stored, 0 unchanged, 0 failed, 2 with warnings" in console
    assert len(SliceStore(tmp_path / "store").volumes) == 3


def test_prepare_strict_refuses_implausible_volumes(mixed_cohort, tmp_path, capsys):
    assert prepare(mixed_cohort, tmp_path / "store", "--strict") == 1
    console = capsys.readouterr().out
    assert "warning:" not in console
    errors = pd.read_csv(tmp_path / "store" / "errors.csv")
    assert errors["path"].tolist() == [str(tmp_path / "tiny.nii.gz"), str(tmp_path / "labels.nii.gz")]
    assert "under 100 mm" in errors["cause"][0] and "distinct values" in errors["cause"][1]
    assert errors["hint"].str.contains("without --strict").all()
    assert SliceStore(tmp_path / "store").volumes["path"].tolist() == [str(tmp_path / "good.nii.gz")]
    assert "1 volumes stored, 0 unchanged, 2 failed" in console
