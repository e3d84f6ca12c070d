"""``braindino manifest --bids``: a manifest from a BIDS tree (subjects with and without sessions, runs,
acquisitions, participants.tsv and sessions.tsv labels, derivatives/ and other non-raw folders skipped), then
``prepare`` and ``probe`` on it."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import head_like_volume, write_tiny_model

from braindino.bids import bids_manifest
from braindino.cli import main
from braindino.errors import InputError
from braindino.manifest import read_manifest
from braindino.store import SliceStore

N_SUBJECTS = 8


def image(path, seed: int, lesion: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = head_like_volume(np.random.default_rng(seed), shape=(32, 32, 10), lesion=lesion)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def tsv(path, rows: list[list[str]]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    """A BIDS dataset: sub-01..08; sub-01 and sub-02 with two sessions (sub-01: two T1w runs in ses-01, a
    sessions.tsv with the age at each session), the others without; a T1w for everyone, a FLAIR for even
    subjects, an acq-fast T2w for sub-03. participants.tsv: age (n/a for sub-05), dx (lesion for odd subjects).
    Also present and never listed: derivatives/, sourcedata/, code/, sidecar JSONs, a defacemask, dotfiles."""
    root = tmp_path_factory.mktemp("bids") / "dataset"
    (root / "dataset_description.json").parent.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    participants = [["participant_id", "age", "dx"]]
    for number in range(1, N_SUBJECTS + 1):
        sub, lesion = f"sub-{number:02d}", number % 2 == 1
        participants.append([sub, "n/a" if number == 5 else str(40 + 3 * number), "lesion" if lesion else "none"])
        sessions = ["ses-01/", "ses-02/"] if number <= 2 else [""]
        for folder in sessions:
            ses = f"_{folder[:-1]}" if folder else ""
            anat = root / sub / folder / "anat"
            runs = ["_run-1", "_run-2"] if number == 1 and folder == "ses-01/" else [""]
            for run in runs:
                image(anat / f"{sub}{ses}{run}_T1w.nii.gz", 10 * number + len(run), lesion)
            if number % 2 == 0:
                image(anat / f"{sub}{ses}_FLAIR.nii.gz", 10 * number + 5, lesion)
            (anat / f"{sub}{ses}_T1w.json").write_text("{}")
        if number == 3:
            image(root / sub / "anat" / f"{sub}_acq-fast_T2w.nii", 99)
            image(root / sub / "anat" / f"{sub}_defacemask.nii.gz", 98)
            image(root / sub / "anat" / f"._{sub}_T1w.nii.gz", 97)
    tsv(root / "participants.tsv", participants)
    tsv(root / "sub-01" / "sub-01_sessions.tsv", [["session_id", "age"], ["ses-01", "43.5"], ["ses-02", "n/a"]])
    image(root / "derivatives" / "prep" / "sub-01" / "anat" / "sub-01_desc-brain_T1w.nii.gz", 1)
    image(root / "sourcedata" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", 2)
    image(root / "code" / "sub-01_T1w.nii.gz", 3)
    image(root / ".git" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", 4)
    image(root / "sub-02" / "dwi" / "sub-02_ses-01_dwi.nii.gz", 5)
    return root


def test_bids_manifest_rows_columns_and_labels(bids, tmp_path):
    table = bids_manifest(bids, tmp_path)
    expected = ["sub-01/ses-01/anat/sub-01_ses-01_run-1_T1w.nii.gz", "sub-01/ses-01/anat/sub-01_ses-01_run-2_T1w.nii.gz",
                "sub-01/ses-02/anat/sub-01_ses-02_T1w.nii.gz",
                "sub-02/ses-01/anat/sub-02_ses-01_FLAIR.nii.gz", "sub-02/ses-01/anat/sub-02_ses-01_T1w.nii.gz",
                "sub-02/ses-02/anat/sub-02_ses-02_FLAIR.nii.gz", "sub-02/ses-02/anat/sub-02_ses-02_T1w.nii.gz",
                "sub-03/anat/sub-03_T1w.nii.gz", "sub-03/anat/sub-03_acq-fast_T2w.nii"]
    listed = [str((tmp_path / p).resolve().relative_to(bids.resolve())) for p in table["path"]]
    assert listed[:9] == expected
    assert len(table) == 9 + 5 + 3                        # sub-04..08: a T1w each, a FLAIR for sub-04, 06, 08
    assert listed[9:] == sorted(listed[9:], key=lambda p: (p.split("/")[0], p))
    assert table.columns.tolist() == ["path", "subject", "sequence", "session", "run", "acq", "age", "dx"]
    first = table.iloc[0]
    assert (first["subject"], first["sequence"], first["session"], first["run"], first["acq"]) == (
        "sub-01", "T1w", "01", "1", "")
    assert table.loc[8, ["sequence", "acq", "session"]].tolist() == ["T2w", "fast", ""]
    ages = dict(zip(table["path"].map(lambda p: p.rsplit("/", 1)[-1]), table["age"]))
    assert ages["sub-01_ses-01_run-1_T1w.nii.gz"] == "43.5"      # sessions.tsv wins over participants.tsv
    assert ages["sub-01_ses-02_T1w.nii.gz"] == "43"              # its n/a: the participant's value stays
    assert ages["sub-05_T1w.nii.gz"] == "" and ages["sub-06_T1w.nii.gz"] == "58"
    assert set(table["dx"]) == {"lesion", "none"}
    assert not table["path"].str.contains("derivatives|sourcedata|code|defacemask|/\\._|dwi").any()


def test_manifest_command_writes_a_manifest_that_reads_back(bids, tmp_path, capsys):
    out = tmp_path / "lists" / "manifest.csv"
    assert main(["manifest", "--bids", str(bids), "--out", str(out)]) == 0
    summary = capsys.readouterr().out.strip()
    assert summary == (f"braindino manifest: 17 images of {N_SUBJECTS} subjects (5 FLAIR, 11 T1w, 1 T2w) -> {out}")
    manifest = read_manifest(out)
    assert len(manifest) == 17 and all(p.startswith(str(bids)) for p in manifest["path"])
    assert manifest["sequence"].tolist()[:2] == ["T1w", "T1w"] and "age" in manifest.columns


@pytest.mark.parametrize("case, make, words", [
    ("no sub folders", lambda root: (root / "README").write_text("x"), ["no sub-* folders"]),
    ("no anatomy", lambda root: image(root / "sub-01" / "func" / "sub-01_bold.nii.gz", 0), ["no anatomical"]),
    ("no participant_id", lambda root: (image(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", 0),
                                        tsv(root / "participants.tsv", [["id", "age"], ["sub-01", "3"]])),
     ["no participant_id column"]),
    ("clashing column", lambda root: (image(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", 0),
                                      tsv(root / "participants.tsv", [["participant_id", "path"], ["sub-01", "x"]])),
     ["path", "clash"]),
    ("repeated id", lambda root: (image(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", 0),
                                  tsv(root / "participants.tsv", [["participant_id"], ["sub-01"], ["sub-01"]])),
     ["sub-01 listed more than once"]),
])
def test_bad_bids_folders_are_one_line_errors(tmp_path, case, make, words):
    root = tmp_path / "ds"
    root.mkdir()
    make(root)
    with pytest.raises(InputError) as caught:
        bids_manifest(root, tmp_path)
    assert "\n" not in str(caught.value) and all(w in caught.value.cause for w in words), (case, caught.value)


def test_manifest_command_errors(tmp_path, capsys):
    assert main(["manifest", "--bids", str(tmp_path / "absent"), "--out", str(tmp_path / "m.csv")]) == 2
    assert "BIDS folder not found" in capsys.readouterr().err
    assert main(["manifest", "--bids", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "--out is a folder" in capsys.readouterr().err


def test_bids_to_prepare_to_probe_end_to_end(bids, tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    assert main(["manifest", "--bids", str(bids), "--out", str(manifest)]) == 0
    assert main(["prepare", "--manifest", str(manifest), "--out", str(tmp_path / "store"), "--size", "32",
                 "--workers", "1"]) == 0
    volumes = SliceStore(tmp_path / "store").volumes
    assert len(volumes) == 17 and set(volumes["sequence"]) == {"T1w", "T2w", "FLAIR"}
    assert {"session", "run", "acq", "age", "dx"} <= set(volumes.columns)
    out = tmp_path / "probe"
    model = write_tiny_model(tmp_path / "model")                 # 32-px slices, as prepared
    assert main(["probe", "--model", str(model), "--no-default-baselines", "--manifest", str(manifest),
                 "--task", "classification", "--target", "dx", "--unit", "volume", "--folds", "2",
                 "--seeds", "0", "--bootstrap", "20", "--workers", "1", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file()
    predictions = pd.read_csv(out / "predictions.csv")
    assert set(predictions["subject"]) == {f"sub-{n:02d}" for n in range(1, N_SUBJECTS + 1)}
