"""``braindino prepare`` end to end on real NIfTI files written with nibabel."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from braindino.cli import main
from braindino.ingest.preprocess import PreprocessConfig, preprocess_volume
from braindino.ingest.readers import content_hash, load_volume
from braindino.store import SliceStore
from braindino.store.format import volume_id, volume_key

SHAPE = (32, 40, 30)
CONFIG = PreprocessConfig(size=32)
TINY_SHARDS = ["--shard-mb", "0.001"]   # 1 KiB: every volume gets a shard of its own


def head(seed: int, shape=SHAPE) -> np.ndarray:
    """[X, Y, Z] float32 ellipsoid with smooth texture inside and exact zeros outside."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = ((grid / rng.uniform(0.7, 0.9, size=(3, 1, 1, 1))) ** 2).sum(0) < 1
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    return (inside * (100 + 400 * (texture - texture.min()) / np.ptp(texture))).astype(np.float32)


def save(path, data, zooms=(1.0, 1.2, 1.5)):
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), path)
    return str(path)


@pytest.fixture
def cohort(tmp_path):
    """Two subjects with a T1 and a FLAIR volume each; labels age, diagnosis; returns the manifest path."""
    rows = []
    for index in range(4):
        subject, sequence = f"{index // 2:03d}", ("T1", "FLAIR")[index % 2]
        path = save(tmp_path / f"sub-{subject}_{sequence}.nii.gz", head(index))
        rows.append({"path": os.path.basename(path), "subject": subject, "sequence": sequence,
                     "split": "train", "age": 60.5 + index, "diagnosis": ("AD", "CN")[index // 2]})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


def prepare(manifest, out, *options) -> int:
    return main(["prepare", "--manifest", str(manifest), "--out", str(out), "--size", "32", "--workers", "1",
                 *options])


def store_slices(store: SliceStore, volume_row: int) -> np.ndarray:
    return np.stack([store[i] for i in store.volume_slices(volume_row)])


def test_round_trip_index_and_labels(cohort, tmp_path, capsys):
    assert prepare(cohort, tmp_path / "store", *TINY_SHARDS) == 0
    assert "4 volumes stored, 0 unchanged, 0 failed" in capsys.readouterr().out
    store = SliceStore(tmp_path / "store")
    manifest = pd.read_csv(cohort, dtype={"subject": str})
    assert store.volumes["subject"].tolist() == manifest["subject"].tolist()
    assert store.volumes["sequence"].tolist() == ["T1", "FLAIR", "T1", "FLAIR"]   # multi-sequence subjects
    assert store.volumes["age"].tolist() == manifest["age"].tolist()
    assert store.volumes["diagnosis"].tolist() == manifest["diagnosis"].tolist()
    assert store.volumes["volume_id"].is_unique
    assert (store.height, store.width) == (32, 32)
    for row, volume in enumerate(store.volumes.itertuples()):
        path = str(tmp_path / manifest["path"][row])
        expected = preprocess_volume(load_volume(path), CONFIG)
        np.testing.assert_array_equal(store_slices(store, row), expected.slices)    # float16, bit for bit
        np.testing.assert_array_equal(store.slice_z[list(store.volume_slices(row))], expected.z_indices)
        assert volume.path == path and volume.content_hash == content_hash(path)
        assert (volume.shape_x, volume.shape_y, volume.shape_z) == SHAPE
        assert (volume.spacing_x, volume.spacing_y, volume.spacing_z) == pytest.approx((1.0, 1.2, 1.5))
        assert (volume.crop_row, volume.crop_col) == expected.crop_offset
        assert (volume.resampled_rows, volume.resampled_cols) == expected.resampled_shape
        info = store.slice_info(store.volume_slices(row)[0])
        np.testing.assert_array_equal(info["affine"], expected.affine)
        assert (info["subject"], info["sequence"], info["z"]) == (volume.subject, volume.sequence,
                                                                  expected.z_indices[0])
    assert len(json.loads((tmp_path / "store" / "store.json").read_text())["shards"]) == 4
    assert pd.read_csv(tmp_path / "store" / "errors.csv").empty


def test_parallel_workers_write_the_same_store(cohort, tmp_path):
    assert prepare(cohort, tmp_path / "serial") == 0
    assert prepare(cohort, tmp_path / "parallel", "--workers", "2") == 0
    serial, parallel = SliceStore(tmp_path / "serial"), SliceStore(tmp_path / "parallel")
    pd.testing.assert_frame_equal(serial.volumes, parallel.volumes)
    np.testing.assert_array_equal(np.stack([serial[i] for i in range(len(serial))]),
                                  np.stack([parallel[i] for i in range(len(parallel))]))


def test_rerun_skips_unchanged_and_reingests_changed(cohort, tmp_path, capsys):
    store_dir = tmp_path / "store"
    assert prepare(cohort, store_dir) == 0
    meta_before = (store_dir / "store.json").read_text()
    changed = tmp_path / "sub-000_FLAIR.nii.gz"
    os.utime(tmp_path / "sub-000_T1.nii.gz", (1, 1))          # touched, same bytes: still unchanged
    capsys.readouterr()
    assert prepare(cohort, store_dir) == 0
    assert "0 volumes stored, 4 unchanged" in capsys.readouterr().out
    assert (store_dir / "store.json").read_text() == meta_before   # nothing rewritten

    save(changed, head(42))
    manifest = pd.read_csv(cohort)
    manifest.loc[3, "age"] = 99.0                            # a corrected label is carried into the store
    manifest.to_csv(cohort, index=False)
    assert prepare(cohort, store_dir) == 0
    assert "1 volumes stored, 3 unchanged" in capsys.readouterr().out
    store = SliceStore(store_dir)
    assert len(store.volumes) == 4 and store.volumes["path"].is_unique
    row = store.volumes.index[store.volumes["path"] == str(changed)][0]
    np.testing.assert_array_equal(store_slices(store, row),
                                  preprocess_volume(load_volume(changed), CONFIG).slices)
    assert store.volumes["content_hash"].iat[row] == content_hash(changed)
    assert store.volumes.set_index("path")["age"][str(tmp_path / manifest["path"][3])] == 99.0
    assert len(store) == sum(len(store.volume_slices(r)) for r in range(4))

    changed.write_bytes(b"no longer an image")                # a stored file turning bad: stale copy dropped
    assert prepare(cohort, store_dir) == 1
    assert str(changed) not in SliceStore(store_dir).volumes["path"].tolist()


def test_bad_files_reported_good_files_stored(cohort, tmp_path, capsys):
    zeros = save(tmp_path / "zeros.nii.gz", np.zeros(SHAPE, np.float32))
    flat = save(tmp_path / "flat.nii.gz", np.ones((32, 40, 1), np.float32))
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    listener = socket.socket(socket.AF_UNIX)                  # opening a socket fails in no way ingest expects
    listener.bind(str(tmp_path / "socket.nii.gz"))
    manifest = pd.read_csv(cohort)
    bad_rows = pd.DataFrame({"path": ["missing.nii.gz", "broken.nii.gz", zeros, flat, "socket.nii.gz"],
                             "subject": "bad", "sequence": "T1"})
    pd.concat([manifest, bad_rows, manifest.iloc[[0]]]).to_csv(cohort, index=False)   # last row: a duplicate
    with listener:
        assert prepare(cohort, tmp_path / "store") == 1
    console = capsys.readouterr().out
    errors = pd.read_csv(tmp_path / "store" / "errors.csv")
    assert errors.columns.tolist() == ["path", "subject", "sequence", "cause", "hint"]
    assert [os.path.basename(p) for p in errors["path"]] == ["sub-000_T1.nii.gz", "missing.nii.gz",
                                                             "broken.nii.gz", "zeros.nii.gz", "flat.nii.gz",
                                                             "socket.nii.gz"]
    causes = errors["cause"].tolist()
    assert "duplicate" in causes[0] and "not found" in causes[1] and "gzip" in causes[2]
    assert "zero" in causes[3] and "2D" in causes[4] and causes[5].startswith("unexpected error OSError")
    assert errors["hint"].str.len().min() > 10
    for path, cause in zip(errors["path"], errors["cause"]):
        assert f"{path}: {cause} — " in console               # one line per failure on the console
    assert "4 volumes stored, 0 unchanged, 6 failed" in console
    assert len(SliceStore(tmp_path / "store").volumes) == 4


def test_4d_rows_with_volume_index(tmp_path):
    data = np.stack([head(0), head(1)], axis=-1)
    path = save(tmp_path / "dwi.nii.gz", data)
    pd.DataFrame({"path": [path, path], "subject": "s", "volume_index": [1, 0]}).to_csv(tmp_path / "m.csv",
                                                                                       index=False)
    assert prepare(tmp_path / "m.csv", tmp_path / "store") == 0
    store = SliceStore(tmp_path / "store")
    assert store.volumes["volume_index"].tolist() == [1, 0] and store.volumes["volume_id"].is_unique
    np.testing.assert_array_equal(store_slices(store, 0),
                                  preprocess_volume(load_volume(path, 1), CONFIG).slices)


@pytest.mark.parametrize("text", ["path,age\nx.nii.gz,3\n", "path,subject\n\"unterminated,s\nx,y,z,w\n"])
def test_manifest_error_writes_nothing(tmp_path, capsys, text):
    (tmp_path / "m.csv").write_text(text)
    assert prepare(tmp_path / "m.csv", tmp_path / "store") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "m.csv" in err
    assert not (tmp_path / "store").exists()


def test_incompatible_store_refused(cohort, tmp_path, capsys):
    assert prepare(cohort, tmp_path / "store") == 0
    assert prepare(cohort, tmp_path / "store", "--spacing", "2") == 2
    assert "different preprocessing: spacing_mm 1.0 (asked 2.0)" in capsys.readouterr().err
    meta_path = tmp_path / "store" / "store.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format_version": 999}))
    assert prepare(cohort, tmp_path / "store") == 2
    assert "format version 999 is not supported" in capsys.readouterr().err


def test_killed_prepare_leaves_readable_store_and_rerun_completes(cohort, tmp_path):
    """SIGKILL while the 4th row blocks on a FIFO: rows 1-2 are committed, row 3 sits in a .tmp shard."""
    manifest = pd.read_csv(cohort)
    os.mkfifo(tmp_path / "stalls.nii.gz")
    stalling = pd.concat([manifest.iloc[:3], pd.DataFrame({"path": ["stalls.nii.gz"], "subject": ["9"]}),
                          manifest.iloc[3:]])
    stalling.to_csv(tmp_path / "stalling.csv", index=False)
    store_dir = tmp_path / "store"
    command = [sys.executable, "-m", "braindino.cli", "prepare", "--manifest", str(tmp_path / "stalling.csv"),
               "--out", str(store_dir), "--size", "32", "--workers", "1", *TINY_SHARDS]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (store_dir / "shards" / "shard-00002.f16.tmp").exists():
            assert time.monotonic() < deadline and process.poll() is None, "prepare did not stall on the FIFO"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    store = SliceStore(store_dir)
    assert store.volumes["path"].tolist() == [str(tmp_path / p) for p in manifest["path"][:2]]
    for row in range(2):
        expected = preprocess_volume(load_volume(store.volumes["path"][row]), CONFIG).slices
        np.testing.assert_array_equal(store_slices(store, row), expected)

    assert prepare(cohort, store_dir, *TINY_SHARDS) == 0
    assert not [p for p in store_dir.rglob("*") if p.name.endswith(".tmp")]
    store = SliceStore(store_dir)
    assert sorted(store.volumes["path"]) == sorted(str(tmp_path / p) for p in manifest["path"])
    assert sorted(store.volumes["shard"]) == [0, 1, 2, 3]      # shard 2 written anew after the .tmp was dropped


@pytest.mark.parametrize("workers", ["1", "2"])
def test_moved_file_takes_over_its_stored_slices(cohort, tmp_path, capsys, workers):
    store_dir = tmp_path / "store"
    assert prepare(cohort, store_dir) == 0
    shards_before = json.loads((store_dir / "store.json").read_text())["shards"]
    (tmp_path / "moved").mkdir()
    new_path = tmp_path / "moved" / "renamed_T1.nii.gz"
    os.rename(tmp_path / "sub-000_T1.nii.gz", new_path)
    copied = tmp_path / "moved" / "copied_T1.nii.gz"           # a copy; the original stays on disk
    shutil.copy(tmp_path / "sub-001_T1.nii.gz", copied)
    manifest = pd.read_csv(cohort)
    manifest.loc[0, ["path", "age"]] = ["moved/renamed_T1.nii.gz", 70.0]
    manifest.loc[2, "path"] = "moved/copied_T1.nii.gz"
    manifest.to_csv(cohort, index=False)
    capsys.readouterr()
    assert prepare(cohort, store_dir, "--workers", workers) == 0
    console = capsys.readouterr().out
    assert "0 volumes stored, 2 unchanged, 0 failed, 2 moved;" in console
    assert "no longer in the manifest" not in console
    assert json.loads((store_dir / "store.json").read_text())["shards"] == shards_before   # nothing re-ingested
    store = SliceStore(store_dir)
    kept = str(tmp_path / "sub-001_T1.nii.gz")                # not in the manifest, but its file exists: kept
    assert sorted(store.volumes["path"]) == sorted([kept, *(str(tmp_path / p) for p in manifest["path"])])
    np.testing.assert_array_equal(store_slices(store, store.volumes.index[store.volumes["path"] == kept][0]),
                                  store_slices(store, store.volumes.index[store.volumes["path"] == str(copied)][0]))
    row = store.volumes.index[store.volumes["path"] == str(new_path)][0]
    assert store.volumes["volume_id"].iat[row] == volume_id(volume_key(new_path, None))
    assert store.volumes["age"].iat[row] == 70.0 and store.volumes["content_hash"].iat[row] == content_hash(new_path)
    np.testing.assert_array_equal(store_slices(store, row), preprocess_volume(load_volume(new_path), CONFIG).slices)
    assert len(store) == sum(len(store.volume_slices(r)) for r in range(5))


def test_stored_volumes_whose_files_are_gone_are_dropped_with_one_warning(cohort, tmp_path, capsys):
    store_dir = tmp_path / "store"
    assert prepare(cohort, store_dir) == 0
    gone, kept = tmp_path / "sub-001_FLAIR.nii.gz", tmp_path / "sub-001_T1.nii.gz"
    gone.unlink()
    manifest = pd.read_csv(cohort)
    manifest[~manifest["path"].isin([gone.name, kept.name])].to_csv(cohort, index=False)
    capsys.readouterr()
    assert prepare(cohort, store_dir) == 0
    console = capsys.readouterr().out
    warnings = [line for line in console.splitlines() if "no longer in the manifest" in line]
    assert len(warnings) == 1 and str(gone) in warnings[0] and str(kept) not in warnings[0]
    assert "1 stored volumes dropped (file gone, not in the manifest)" in console
    paths = SliceStore(store_dir).volumes["path"].tolist()
    assert str(gone) not in paths and str(kept) in paths and len(paths) == 3   # files still on disk are kept


def test_unexpected_error_cause_is_its_first_line(cohort, tmp_path, capsys, monkeypatch):
    def failing_reader(path, volume_index=None):
        raise RuntimeError("ITK ERROR: reader failed\n  at itkImageFileReader.hxx line 135\n  more detail")

    monkeypatch.setattr("braindino.ingest.worker.load_volume", failing_reader)
    assert prepare(cohort, tmp_path / "store") == 1
    console = capsys.readouterr().out
    causes = pd.read_csv(tmp_path / "store" / "errors.csv")["cause"].tolist()
    assert causes == ["unexpected error RuntimeError: ITK ERROR: reader failed"] * 4
    assert "itkImageFileReader" not in console and "more detail" not in console


def test_prepare_and_extract_give_the_same_cause_and_hint_for_the_same_unexpected_error(cohort, tmp_path, capsys,
                                                                                       monkeypatch):
    import braindino
    from braindino.extract.cohort import extract_cohort

    def failing_reader(path, volume_index=None):
        raise RuntimeError("ITK ERROR: reader failed\n  at itkImageFileReader.hxx line 135")

    monkeypatch.setattr("braindino.ingest.worker.load_volume", failing_reader)
    assert prepare(cohort, tmp_path / "store", "--workers", "0") == 1
    _features, report = extract_cohort(braindino.load_encoder("random:vit_tiny"), cohort, tmp_path / "features",
                                       workers=0, progress=False)
    prepared = pd.read_csv(tmp_path / "store" / "errors.csv")[["path", "cause", "hint"]]
    extracted = pd.read_csv(tmp_path / "features" / "errors.csv")[["path", "cause", "hint"]]
    assert len(prepared) == 4 and report.computed == 0
    pd.testing.assert_frame_equal(prepared.sort_values("path").reset_index(drop=True),
                                  extracted.sort_values("path").reset_index(drop=True))
    assert prepared["hint"].str.contains("report this error type").all()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_library_warnings_do_not_reach_the_console(tmp_path, workers):
    """nibabel logs a line about negative pixdim that names no file: only braindino's own line may appear.
    Run as a real command, since pytest captures log records and worker output of the test process itself."""
    bad = tmp_path / "negative.nii"
    save(bad, head(0))
    with open(bad, "r+b") as handle:                          # pixdim[1] at byte 80
        handle.seek(80)
        handle.write(np.float32(-1.0).tobytes())
    pd.DataFrame({"path": [str(bad)], "subject": ["s"]}).to_csv(tmp_path / "m.csv", index=False)
    command = [sys.executable, "-m", "braindino.cli", "prepare", "--manifest", str(tmp_path / "m.csv"),
               "--out", str(tmp_path / "store"), "--size", "32", "--workers", workers]
    finished = subprocess.run(command, check=False, capture_output=True, encoding="utf-8", timeout=300)
    assert finished.returncode == 1
    lines = (finished.stdout + finished.stderr).replace("\r", "\n").splitlines()
    mentions = [line for line in lines if "pixdim" in line or "positive" in line]
    assert mentions and all(line.startswith(f"{bad}: voxel spacing") for line in mentions), mentions


def test_unwritable_out_is_one_line_and_exit_2(cohort, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "store"
    assert prepare(cohort, out) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {out}: --out cannot be a folder here: {out.parent} is a file — choose another --out "
                   f"folder")
    assert not (tmp_path / "a_file").is_dir()
