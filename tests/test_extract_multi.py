"""Extraction with several encoders at once: one read per distinct preprocessing, each folder as a run of its own."""

import os
from dataclasses import asdict

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import head_like_volume, write_tiny_model

import braindino
import braindino.extract.cohort as cohort_module
from braindino.errors import InputError
from braindino.extract.cohort import extract_cohort, extract_cohorts
from braindino.ingest import PreprocessConfig


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """[model, random_like(model) (seed 1: seed 0 rebuilds the tiny model's own weights), pixels:4 like model,
    other]: the first three share the model's 32-px preprocessing; ``other`` holds the model's weights with other
    clip percentiles (so only its slices differ)."""
    folder = tmp_path_factory.mktemp("multi_models")
    model = braindino.load_encoder(write_tiny_model(folder / "model"), device="cpu")
    other_preprocessing = asdict(PreprocessConfig(size=32, clip_percentiles=(2.0, 98.0)))
    other = braindino.load_encoder(write_tiny_model(folder / "other", other_preprocessing), device="cpu")
    pixels = braindino.load_encoder("pixels:4", device="cpu", like=model)
    return [model, model.random_like(seed=1), pixels, other]


@pytest.fixture()
def cohort(tmp_path):
    """Two small NIfTI volumes and one corrupt file → manifest path."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(2):
        path = tmp_path / f"sub-{i}.nii.gz"
        nib.save(nib.Nifti1Image(head_like_volume(rng, shape=(36, 36, 12), lesion=i == 1), np.eye(4)), path)
        rows.append({"path": path.name, "subject": f"s{i}", "age": 40 + i})
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 not a gzip stream" * 10)
    rows.append({"path": "broken.nii.gz", "subject": "s9", "age": 99})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


def folder_bytes(root) -> dict:
    """{relative path: bytes} of every file of a features folder."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def reads(monkeypatch):
    """Count ``prepare_volume`` calls per preprocessing (extraction with workers=0 reads in this process)."""
    counts = {}
    real = cohort_module.prepare_volume

    def counting(source, volume_index, preprocessing):
        counts[preprocessing.clip_percentiles] = counts.get(preprocessing.clip_percentiles, 0) + 1
        return real(source, volume_index, preprocessing)

    monkeypatch.setattr(cohort_module, "prepare_volume", counting)
    return counts


def test_each_folder_is_bit_identical_to_a_run_of_its_own(encoders, cohort, tmp_path, capsys):
    alone = [tmp_path / f"alone{i}" for i in range(len(encoders))]
    for encoder, out in zip(encoders, alone):
        extract_cohort(encoder, cohort, out, batch_size=5, workers=0, progress=False, slice_stride=2)
    capsys.readouterr()
    together = [tmp_path / f"together{i}" for i in range(len(encoders))]
    results = extract_cohorts(list(zip(encoders, together)), cohort, batch_size=5, workers=1, slice_stride=2)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.nii.gz" in errors[0]          # one line per bad volume, not per encoder
    for encoder, one, many, (features, report) in zip(encoders, alone, together, results):
        assert folder_bytes(many) == folder_bytes(one)
        assert features.model["fingerprint"] == encoder.fingerprint and len(features) == 2
        assert (report.computed, report.cached, len(report.errors)) == (2, 0, 1)
        assert list(features.errors["subject"]) == ["s9"]
    assert len({frozenset(folder_bytes(root)) for root in together}) == len(encoders)   # own cache keys each


def test_one_read_per_preprocessing_and_cache_hits_skip_read_and_embedding(encoders, cohort, tmp_path, reads,
                                                                           monkeypatch):
    model, random_like, pixels, other = encoders
    extract_cohort(model, cohort, tmp_path / "model", workers=0, progress=False)
    assert reads == {(0.5, 99.5): 3}
    reads.clear()
    embedded = []
    for encoder in encoders:
        real = encoder.embed_slices
        monkeypatch.setattr(encoder, "embed_slices",
                            lambda x, patch_tokens=False, real=real, name=encoder.name: (embedded.append(name),
                                                                                         real(x, patch_tokens))[1])
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "model" / "volumes").iterdir()}
    folders = [tmp_path / name for name in ("model", "random", "pixels", "other")]
    results = extract_cohorts(list(zip(encoders, folders)), cohort, batch_size=64, workers=0, progress=False)
    assert reads == {(0.5, 99.5): 3, (2.0, 98.0): 3}                  # 2 volumes + the broken one, per group
    assert model.name not in embedded and {random_like.name, pixels.name, other.name} <= set(embedded)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "model" / "volumes").iterdir()} == stamps
    assert [(r.computed, r.cached) for _, r in results] == [(0, 2), (2, 0), (2, 0), (2, 0)]
    reads.clear()
    embedded.clear()
    (tmp_path / "broken.nii.gz").unlink()
    manifest = pd.read_csv(cohort)
    manifest[manifest["subject"] != "s9"].to_csv(cohort, index=False)
    results = extract_cohorts(list(zip(encoders, folders)), cohort, workers=0, progress=False)
    assert reads == {} and embedded == []
    assert [(r.computed, r.cached, r.errors) for _, r in results] == [(0, 2, [])] * 4


def test_a_folder_given_twice_or_of_another_model_is_refused_before_writing(encoders, cohort, tmp_path):
    model, random_like = encoders[:2]
    with pytest.raises(InputError, match="two encoders"):
        extract_cohorts([(model, tmp_path / "a"), (random_like, tmp_path / "a")], cohort, workers=0, progress=False)
    assert not (tmp_path / "a").exists()
    extract_cohort(model, cohort, tmp_path / "m", workers=0, progress=False)
    with pytest.raises(InputError, match="another model"):
        extract_cohorts([(random_like, tmp_path / "r"), (random_like, tmp_path / "m")], cohort, workers=0,
                        progress=False)
    assert not (tmp_path / "r").exists()


def test_probe_extracts_model_and_baselines_with_one_read_per_volume(encoders, cohort, tmp_path, reads):
    from braindino.manifest import read_manifest
    from braindino.probe.encoders import extract_features, load_encoders

    entries = load_encoders(encoders[0].name, device="cpu")
    assert [e.name for e in entries] == ["model", "random_like", "pixels"]
    used = read_manifest(cohort)
    assert extract_features(entries, used, tmp_path / "run" / "features", workers=0) == 3   # broken, per encoder
    assert reads == {(0.5, 99.5): 3}
    for entry in entries:
        assert len(entry.rows) == 2 and entry.features.root == tmp_path / "run" / "features" / entry.slug


def test_auto_reader_workers_leave_a_cpu_encoder_its_cores(monkeypatch):
    from types import SimpleNamespace

    from braindino.extract.cohort import auto_reader_workers
    cpu, gpu = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    threads = torch.get_num_threads()
    try:
        for torch_threads, expected in [(8, 0), (6, 2), (2, 4), (1, 4)]:
            torch.set_num_threads(torch_threads)
            assert auto_reader_workers([cpu]) == expected
        torch.set_num_threads(8)
        assert auto_reader_workers([cpu, gpu]) == 4 and auto_reader_workers([gpu]) == 4
    finally:
        torch.set_num_threads(threads)
