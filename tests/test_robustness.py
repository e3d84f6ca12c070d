"""Robustness: the perturbations' physics and determinism, and `braindino robustness` end to end."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from braindino.robustness.perturbations import PERTURBATIONS, parse_grid, perturb_array
from braindino.robustness.physics import thick_slices
from conftest import head_like_volume, lesion_cohort, write_tiny_model


@pytest.fixture(scope="module")
def volume():
    return head_like_volume(np.random.default_rng(3), shape=(32, 32, 12), lesion=True)


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_identity_severity_leaves_the_volume_unchanged(volume, name):
    out = perturb_array(volume, name, PERTURBATIONS[name].identity, seed=0, key="v")
    np.testing.assert_allclose(out, volume, rtol=1e-5, atol=1e-3 * volume.max())


@pytest.mark.parametrize("name", ["gamma", "bias_field", "gibbs", "gaussian_noise", "rician_noise", "ghosting",
                                  "thick_slices"])
def test_every_perturbation_changes_the_volume_and_is_deterministic_per_seed(volume, name):
    severity = max(PERTURBATIONS[name].severities, key=lambda s: abs(s - PERTURBATIONS[name].identity))
    first = perturb_array(volume, name, severity, seed=7, key="v")
    again = perturb_array(volume, name, severity, seed=7, key="v")
    assert np.array_equal(first, again)
    assert np.abs(first - volume).mean() > 1e-3 * volume.mean()
    if name in ("bias_field", "gaussian_noise", "rician_noise"):      # the random part follows the seed
        assert not np.allclose(first, perturb_array(volume, name, severity, seed=8, key="v"))


def test_bias_field_is_smooth_multiplicative_and_the_same_for_two_images(volume):
    other = head_like_volume(np.random.default_rng(4), shape=(32, 32, 12))
    inside = (volume > 0) & (other > 0)
    field_a = perturb_array(volume, "bias_field", 0.45, 0, "same")[inside] / volume[inside]
    field_b = perturb_array(other, "bias_field", 0.45, 0, "same")[inside] / other[inside]
    np.testing.assert_allclose(field_a, field_b, rtol=1e-4)          # multiplicative: independent of the image
    field = np.ones_like(volume)
    field[inside] = field_a
    plane = field[:, :, 6]
    mask = inside[:, :, 6]
    steps = np.abs(np.diff(plane, axis=0))[mask[1:] & mask[:-1]]
    assert (field_a > 0).all() and np.ptp(field_a) > 0.1 and steps.max() < 0.1       # smooth: small voxel steps


def test_gamma_is_a_power_of_the_normalised_intensity(volume):
    scale = np.percentile(volume[volume > 0], 99.5)
    out = perturb_array(volume, "gamma", 1.9, 0, "v")
    np.testing.assert_allclose(out, (volume / scale) ** 1.9 * scale, rtol=1e-4, atol=1e-3)


def test_thick_slices_average_blocks_and_keep_a_constant():
    stack = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()
    thick = thick_slices(stack, 2)[:, 0, 0, 0]
    # blocks (0,1) (2,3) .. averaged to 0.5, 2.5, ..; linear between block centres, edges held
    np.testing.assert_allclose(thick.numpy(), [0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.5])
    assert torch.allclose(thick_slices(torch.ones(7, 1, 3, 3), 3), torch.ones(7, 1, 3, 3))


def test_grid_always_holds_the_clean_severity_and_rejects_unknown_names():
    from braindino.errors import InputError

    assert parse_grid(["gibbs"], ["gibbs=0.2,0.4"]) == {"gibbs": (0.0, 0.2, 0.4)}
    with pytest.raises(InputError):
        parse_grid(["blur"], [])


def test_robustness_command_end_to_end(tmp_path):
    rows = [row | {"split": "test" if int(row["subject"][4:]) >= 8 else "train", "diagnosis": row["dx"]}
            for row in lesion_cohort(tmp_path) if row["sequence"] == "T1"]   # 12 subjects, one volume each
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    model = write_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "braindino.cli", "robustness", "--model", str(model),
                             "--manifest", str(tmp_path / "manifest.csv"), "--task", "classification",
                             "--target", "diagnosis", "--perturbations", "gamma,gibbs", "--grid", "gamma=0.5",
                             "--grid", "gibbs=0.45", "--bootstrap", "20", "--workers", "0", "--out", str(out)],
                            capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(out / "robustness.csv")
    assert set(table["encoder"]) == {"model", "random_like", "pixels"}
    assert sorted(set(zip(table["perturbation"], table["severity"]))) == [("gamma", 0.5), ("gamma", 1.0),
                                                                        ("gibbs", 0.0), ("gibbs", 0.45)]
    clean = table[table["severity"].isin([0.0, 1.0])]
    assert (clean["drop"] == 0).all() and (clean["value"] == clean["clean"]).all()
    assert (table["n_samples"] == 4).all() and (table["low"] <= table["high"]).all()
    perturbed = table[~table["severity"].isin([0.0, 1.0])]
    np.testing.assert_allclose(perturbed["drop"], perturbed["clean"] - perturbed["value"])   # higher is better
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["metric"] == "balanced_accuracy" and len(metrics["results"]) == len(table)
    assert set(metrics["worst"]) <= {"model", "random_like", "pixels"}
    for name in ("gamma", "gibbs"):
        assert (out / "figures" / f"robustness_{name}.png").stat().st_size > 1000
    lines = [line for line in result.stdout.splitlines() if line.startswith("robustness: ") and "worst drop" in line]
    assert [line.split(":")[1].strip() for line in lines] == ["model", "random_like", "pixels"]
    assert "robustness.md" in result.stdout and (out / "robustness.md").is_file()
    # a second run that takes the first run's clean features (as the demo passes a probe run's) embeds nothing clean
    # again: every volume's feature file stays as it was (index and model description are rewritten, unchanged),
    # and the scores are the same

    def clean_files():
        return {p: p.stat().st_mtime_ns if p.suffix not in (".csv", ".json") else p.read_bytes()
                for p in (out / "features").rglob("*") if p.is_file()}

    before = clean_files()
    again = subprocess.run([sys.executable, "-m", "braindino.cli", "robustness", "--model", str(model),
                            "--manifest", str(tmp_path / "manifest.csv"), "--task", "classification",
                            "--target", "diagnosis", "--perturbations", "gamma", "--grid", "gamma=0.5",
                            "--bootstrap", "20", "--workers", "0", "--features-root", str(out / "features"),
                            "--out", str(tmp_path / "again")], capture_output=True, text=True, encoding="utf-8",
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (tmp_path / "again" / "features").exists()
    assert clean_files() == before
    second = pd.read_csv(tmp_path / "again" / "robustness.csv")
    pd.testing.assert_frame_equal(second.reset_index(drop=True),
                                  table[table["perturbation"] == "gamma"].reset_index(drop=True))
