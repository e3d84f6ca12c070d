"""Laterality: a probe on an exported braindino model's features finds the side of a small one-sided lesion.

24 subjects, each a NIfTI head with one small bright lesion at negative (patient Left) or positive (patient Right)
world X; half the files are stored LPS (first two axes flipped), so the side must survive reorientation to RAS.
``--pooling hemispheres`` (per-hemisphere patch means, left - right ‖ average, mean and max over slices) must find
the side; ``--pooling mean`` (whole-slice tokens) is the contrast, reported in the test's output.
"""

import json
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import head_like_volume, write_tiny_model

import braindino
from braindino.encoder.backbones import hemisphere_means
from braindino.probe.results import ProbeResults
from probe import main

N_SUBJECTS = 24
SHAPE = (32, 32, 12)
LESION = 1000.0
COMMON = ["--task", "classification", "--target", "side", "--fractions", "100", "--seeds", "0", "--folds", "3",
          "--shots", "", "--bootstrap", "20", "--workers", "1", "--device", "cpu", "--no-default-baselines"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A depth-1 ViT at 32 px (patch 8: a 4 × 4 grid) exported as a braindino model folder."""
    return write_tiny_model(tmp_path_factory.mktemp("laterality_model") / "model")


def lesioned_head(rng: np.random.Generator, side: int) -> np.ndarray:
    """``[X, Y, Z]`` RAS array: a head with one small bright ellipsoid lesion centred at ``side`` (-1 Left,
    +1 Right) × 0.4..0.5 of the half-width in X, spanning about 3 of the 12 axial slices."""
    data = head_like_volume(rng, shape=SHAPE)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    centre = np.array([side * rng.uniform(0.4, 0.5), rng.uniform(-0.3, 0.3), rng.uniform(-0.4, 0.4)])
    radii = np.array([0.18, 0.18, 0.25])
    data[(((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1] = LESION
    return data


def affines() -> tuple[np.ndarray, np.ndarray]:
    """(RAS, LPS) ``[4, 4]`` for a ``SHAPE`` array centred on the world origin; an RAS array ``a`` stored as
    ``a[::-1, ::-1]`` with the LPS affine puts every voxel at the same world point."""
    centre = (np.array(SHAPE) - 1) / 2
    ras = np.eye(4)
    ras[:3, 3] = -centre                                   # voxel i sits at world i - centre (mm)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [centre[0], centre[1], -centre[2]]        # voxel i' sits at world -(i' - centre) in X and Y
    return ras, lps


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """manifest.csv of 24 subjects (12 left, 12 right lesions; every other pair of files stored LPS)."""
    root = tmp_path_factory.mktemp("laterality_cohort")
    rng = np.random.default_rng(0)
    ras, lps = affines()
    rows = []
    for i in range(N_SUBJECTS):
        side = "left" if i % 2 == 0 else "right"
        data = lesioned_head(rng, -1 if side == "left" else 1)
        stored_lps = i % 4 >= 2
        array, affine = (data[::-1, ::-1].copy(), lps) if stored_lps else (data, ras)
        path = root / f"sub-{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), path)
        voxels = np.argwhere(np.asarray(nib.load(path).dataobj) == LESION).mean(0)
        world_x = (affine @ np.append(voxels, 1.0))[0]
        assert (world_x < 0) == (side == "left") and nib.aff2axcodes(affine) == (("L", "P", "S") if stored_lps
                                                                                 else ("R", "A", "S"))
        rows.append({"path": path.name, "subject": f"sub-{i:02d}", "side": side, "lps": stored_lps})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def balanced_accuracy(model, manifest, out, pooling: str, capsys):
    status = main(["--model", str(model), "--manifest", str(manifest), "--out", str(out), "--pooling", pooling,
                   *COMMON])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    results = ProbeResults.from_dict(json.loads((out / "metrics.json").read_text(encoding="utf-8")))
    (score,) = results.endpoints[0].scores
    assert score.n_test == N_SUBJECTS and results.endpoints[0].pooling == pooling
    return score.metrics["balanced_accuracy"]


def test_hemisphere_means_split_the_grid_rows():
    patch = torch.arange(5 * 2 * 3, dtype=torch.float32).reshape(1, 10, 3)     # 5 rows × 2 columns, width 3
    rows = patch.reshape(5, 2, 3).mean(1)
    expected = torch.stack([(rows[0] + rows[1] + rows[2] / 2) / 2.5, (rows[2] / 2 + rows[3] + rows[4]) / 2.5])
    torch.testing.assert_close(hemisphere_means(patch, 5)[0], expected)
    even = hemisphere_means(patch[:, :8], 4)[0]
    torch.testing.assert_close(even, torch.stack([patch[0, :4].mean(0), patch[0, 4:8].mean(0)]))


def test_a_left_lesion_lands_in_the_left_half_whatever_the_file_orientation(tiny_model):
    """Exact orientation contract: ``hemispheres[:, 0]`` is the patient's Left, in RAS and LPS files alike."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    head = np.where(((grid / 0.85) ** 2).sum(0) < 1, 300.0, 0.0)                    # mirror-symmetric in X
    head[(((grid - np.array([-0.45, 0.1, 0.0])[:, None, None, None]) / 0.2) ** 2).sum(0) < 1] = LESION  # Left
    ras, lps = affines()
    model = braindino.load_encoder(tiny_model, device="cpu")
    pixels = braindino.load_encoder("pixels:4", device="cpu", like=model)
    for encoder in (model, pixels):
        as_ras = encoder.embed_volume((head, ras)).hemispheres
        as_lps = encoder.embed_volume((head[::-1, ::-1].copy(), lps)).hemispheres
        np.testing.assert_array_equal(as_ras, as_lps)
        assert as_ras.shape[1] == 2 and as_ras.shape[2] == (192 if encoder is model else 64)
    left_minus_right = (as_ras[:, 0] - as_ras[:, 1]).mean(1)                      # pixels: mean intensity [S]
    assert left_minus_right.min() > -1e-6 and left_minus_right.max() > 0.02
    mirrored = pixels.embed_volume((head[::-1].copy(), ras)).hemispheres           # the lesion on the Right
    np.testing.assert_allclose(mirrored[:, 1].mean(1), as_ras[:, 0].mean(1), atol=1e-6)
    np.testing.assert_allclose(mirrored[:, 0].mean(1), as_ras[:, 1].mean(1), atol=1e-6)


def test_hemisphere_pooling_finds_the_lesion_side(tiny_model, cohort, tmp_path, capsys):
    hemispheres = balanced_accuracy(tiny_model, cohort, tmp_path / "hemispheres", "hemispheres", capsys)
    mean = balanced_accuracy(tiny_model, cohort, tmp_path / "mean", "mean", capsys)
    print(f"laterality balanced accuracy: hemispheres {hemispheres.value:.3f} [{hemispheres.low:.3f}, "
          f"{hemispheres.high:.3f}]; mean {mean.value:.3f} [{mean.low:.3f}, {mean.high:.3f}]")
    assert hemispheres.low <= hemispheres.value <= hemispheres.high
    assert hemispheres.value >= 0.9


def test_features_without_hemispheres_are_one_clear_error_until_extracted_again(tiny_model, cohort, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    out = tmp_path / "run"
    assert main(["--model", str(tiny_model), "--manifest", str(cohort), "--out", str(out), *COMMON]) == 0
    features = out / "features" / "model"
    for path in (features / "volumes").iterdir():              # as written by a braindino before hemispheres
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        tensors = load_file(path)
        assert tensors["hemispheres"].shape == (len(tensors["z"]), 2, 192)
        del tensors["hemispheres"]
        save_file(tensors, path, metadata=header["__metadata__"])
    capsys.readouterr()
    status = main(["--model", str(tiny_model), "--manifest", str(cohort), "--out", str(tmp_path / "again"),
                   "--features", str(features), "--pooling", "hemispheres", *COMMON])
    errors = re.findall(r"error: [^\r\n]*", capsys.readouterr().err)       # the progress bar may precede it
    assert status == 2 and len(errors) == 1 and "re-extract with this braindino" in errors[0], errors
    assert main(["--model", str(tiny_model), "--manifest", str(cohort), "--out", str(out), "--pooling",
                 "hemispheres", *COMMON]) == 0                      # extracting again replaces the stale files
    assert all("hemispheres" in load_file(path) for path in (features / "volumes").iterdir())
