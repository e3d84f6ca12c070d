"""Cohort extraction: features format, cache, errors, and the same preprocessing as `braindino prepare`."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import head_like_volume, write_tiny_model

import braindino
from braindino.cli import main
from braindino.errors import InputError
from braindino.extract import embed_cohort, open_features
from braindino.store import SliceStore


@pytest.fixture(scope="module")
def tiny_model(tiny_store, tmp_path_factory):
    """A depth-1 ViT-Ti model folder (patch 8, 32 px, LayerScale 1) with the tiny store's preprocessing."""
    return write_tiny_model(tmp_path_factory.mktemp("extract_model") / "model", SliceStore(tiny_store).preprocessing)


@pytest.fixture()
def cohort(tmp_path):
    """Three real NIfTI volumes (one 4D, read as volume 1) and one corrupt file, with labels."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(3):
        path = tmp_path / f"sub-{i}.nii.gz"
        data = head_like_volume(rng, lesion=i == 1)
        if i == 2:
            data = np.stack([head_like_volume(rng), data], axis=-1)
        nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.2, 2.0, 1.0])), path)
        rows.append({"path": path.name, "subject": f"s{i}", "volume_index": 1 if i == 2 else None, "age": 30 + i})
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not a gzip stream" * 20)
    rows.append({"path": "broken.nii.gz", "subject": "s9", "volume_index": None, "age": 99})
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).astype({"volume_index": "Int64"}).to_csv(manifest, index=False)
    return manifest


def test_extract_writes_features_reports_bad_volumes_and_caches(tiny_model, cohort, tmp_path, capsys):
    out = tmp_path / "features"
    args = ["extract", "--model", str(tiny_model), "--manifest", str(cohort), "--out", str(out), "--workers", "2",
            "--batch-size", "7", "--patch-tokens", "--device", "cpu"]
    assert main(args) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.nii.gz" in errors[0]
    assert "3 volumes embedded (3 computed" in captured.out and "1 failed" in captured.out

    feats = open_features(out)
    assert list(feats.index["subject"]) == ["s0", "s1", "s2"] and list(feats.index["age"]) == [30, 31, 32]
    assert list(feats.errors["subject"]) == ["s9"]
    encoder = braindino.load_encoder(tiny_model, device="cpu")
    assert feats.model == json.loads(json.dumps(encoder.model_info()))
    for i, row in feats.index.iterrows():
        loaded = feats.load(i)
        index = None if pd.isna(row["volume_index"]) else int(row["volume_index"])
        direct = encoder.embed_volume(row["path"], volume_index=index, patch_tokens=True)
        assert row["n_slices"] == len(direct.z) and row["model_fingerprint"] == encoder.fingerprint
        np.testing.assert_array_equal(loaded["z"], direct.z)
        assert loaded["cls"].dtype == np.float32 and loaded["patch"].dtype == np.float16
        assert loaded["patch"].shape == (len(direct.z), 16, 192)
        np.testing.assert_allclose(loaded["cls"], direct.cls, atol=1e-5, rtol=0)
        np.testing.assert_allclose(loaded["mean_patch"], direct.mean_patch, atol=1e-5, rtol=0)
        np.testing.assert_allclose(loaded["patch"], direct.patch, atol=2e-3, rtol=1e-3)
        assert loaded["hemispheres"].dtype == np.float32 and loaded["hemispheres"].shape == (len(direct.z), 2, 192)
        np.testing.assert_allclose(loaded["hemispheres"], direct.hemispheres, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(loaded["geometry"]["affine"], direct.geometry["affine"])
        assert loaded["geometry"]["native_shape"] == direct.geometry["native_shape"] == (40, 40, 20)
        assert loaded["geometry"]["grid"] == (4, 4) and loaded["geometry"]["slice_size"] == 32

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "volumes").iterdir()}
    (tmp_path / "broken.nii.gz").unlink()
    manifest = pd.read_csv(cohort)
    manifest[manifest["subject"] != "s9"].to_csv(cohort, index=False)
    assert main(args) == 0
    assert "3 volumes cached, nothing to compute" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "volumes").iterdir()} == stamps
    assert open_features(out).errors.empty

    rng = np.random.default_rng(11)
    nib.save(nib.Nifti1Image(head_like_volume(rng, shape=(36, 40, 18)), np.eye(4)), tmp_path / "sub-0.nii.gz")
    assert main(args) == 0
    assert "(1 computed" in capsys.readouterr().out
    changed = open_features(out)
    assert changed.load(0)["geometry"]["native_shape"] == (36, 40, 18)
    assert changed.index["feature_file"].iat[1] == feats.index["feature_file"].iat[1]


def test_a_folder_of_another_model_is_refused(tiny_model, cohort, tmp_path, capsys):
    out = tmp_path / "features"
    base = ["extract", "--manifest", str(cohort), "--out", str(out), "--workers", "0", "--device", "cpu"]
    assert main([*base, "--model", str(tiny_model)]) == 1
    capsys.readouterr()
    assert main([*base, "--model", "pixels:4"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "another model" in error and "\n" not in error
    assert open_features(out).model["name"] == str(tiny_model)


def test_embed_volume_slices_are_the_store_slices_bit_for_bit(tiny_model, tiny_store):
    store = SliceStore(tiny_store)
    encoder = braindino.load_encoder(tiny_model, device="cpu")
    assert encoder.preprocessing.size == store.height
    for row in (0, 3):
        path = store.volumes["path"].iat[row]
        stored = np.stack([store[i] for i in store.volume_slices(row)])
        image = nib.load(path)
        for source in (path, image, (np.asarray(image.dataobj), image.affine)):
            embedding = encoder.embed_volume(source)
            assert embedding.slices.dtype == stored.dtype == np.float16
            np.testing.assert_array_equal(embedding.slices, stored)
            np.testing.assert_array_equal(embedding.z, store.slice_z[list(store.volume_slices(row))])
        np.testing.assert_allclose(embedding.volume, embedding.cls.mean(0), rtol=1e-6)
        assert embedding.patch is None and embedding.cls.shape == (len(stored), 192)


def test_embed_cohort_default_cache_and_batching(tiny_model, cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINDINO_CACHE", str(tmp_path / "cache"))
    manifest = pd.read_csv(cohort)
    manifest[manifest["subject"] != "s9"].to_csv(cohort, index=False)
    encoder = braindino.load_encoder(tiny_model, device="cpu")
    one = embed_cohort(encoder, cohort, workers=0, batch_size=1, progress=False)
    assert one.root == tmp_path / "cache" / "features" / encoder.fingerprint and len(one) == 3
    many = embed_cohort(encoder, cohort, cache_dir=tmp_path / "other", workers=0, batch_size=1000, progress=False)
    for i in range(3):
        np.testing.assert_allclose(one.load(i)["cls"], many.load(i)["cls"], atol=1e-5, rtol=0)


def test_open_features_refuses_what_is_not_a_features_folder(tmp_path):
    with pytest.raises(InputError, match="features folder not found"):
        open_features(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a features folder"):
        open_features(tmp_path / "empty")


def test_slice_stride_embeds_every_kth_slice_under_its_own_cache_key(tiny_model, cohort, tmp_path):
    manifest = pd.read_csv(cohort)
    manifest[manifest["subject"] != "s9"].to_csv(cohort, index=False)
    encoder = braindino.load_encoder(tiny_model, device="cpu")
    folder = tmp_path / "features"
    every = embed_cohort(encoder, cohort, cache_dir=folder, workers=0, progress=False)
    third = embed_cohort(encoder, cohort, cache_dir=folder, workers=0, progress=False, slice_stride=3)
    for i in range(3):
        full, strided = every.load(i), third.load(i)
        np.testing.assert_array_equal(strided["z"], full["z"][::3])
        np.testing.assert_allclose(strided["cls"], full["cls"][::3], atol=1e-5, rtol=0)
        assert every.index["feature_file"].iat[i] != third.index["feature_file"].iat[i]   # both stay cached
    assert len(list((folder / "volumes").iterdir())) == 6
