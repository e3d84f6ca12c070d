"""Synthetic cohort: geometry, determinism, files and manifest, and that labels are visible in the images."""

import dataclasses

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.interpolate import CubicSpline
from scipy.stats import spearmanr

from braindino.cli import main
from braindino.synth.anatomy import (
    DISPLACEMENT_CONTROL_SHAPE,
    draw_anatomy,
    load_template,
    subject_coordinates,
    subject_tissues,
    upsample_controls,
)
from braindino.synth.cohort import (
    DIAGNOSIS_BLOCK,
    MANIFEST_COLUMNS,
    build_tissues,
    generate_cohort,
    plan_subject,
    render_subject,
)
from braindino.synth.lesions import Lumpiness, Stroke, draw_tumour, tumour_outcomes
from braindino.synth.sequences import SEQUENCES

RESOLUTION = 4.0
SUBJECTS = 10
# The MNI152 2009 grid (197 x 233 x 189 at 1 mm, origin -98, -134, -72) resampled to 4 mm voxels.
EXPECTED_AFFINE = np.array([[4.0, 0, 0, -98], [0, 4.0, 0, -134], [0, 0, 4.0, -72], [0, 0, 0, 1]])
EXPECTED_SHAPE = (50, 59, 48)


@pytest.fixture(scope="module")
def template():
    return load_template(RESOLUTION)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    manifest = generate_cohort(out, n_subjects=SUBJECTS, seed=0, resolution_mm=RESOLUTION)
    return out, manifest


def load(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def still_anatomy(template, **changes):
    """Anatomy with no rotation, scaling, translation or displacement."""
    anatomy = draw_anatomy(np.random.default_rng(0), 40.0, "F", alzheimer_like=False)
    still = {"scale": 1.0, "rotation_deg": (0.0, 0.0, 0.0), "translation_mm": (0.0, 0.0, 0.0),
             "displacement_mm": np.zeros((3, *DISPLACEMENT_CONTROL_SHAPE), np.float32)}
    return dataclasses.replace(anatomy, **{**still, **changes})


def test_template_grid_is_the_mni_grid_downsampled(template):
    assert template.shape == EXPECTED_SHAPE
    np.testing.assert_allclose(template.affine, EXPECTED_AFFINE)
    assert 0.0 <= template.gm.min() and (template.gm + template.wm).max() <= 1.0 + 1e-6
    assert len(template.periventricular_sites) > 0 and len(template.deep_white_sites) > 0


def test_upsampling_matches_separable_cubic_splines():
    controls = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    shape = (9, 11, 13)
    reference = controls.astype(np.float64)
    for axis, n in enumerate(shape):
        spline = CubicSpline(np.linspace(0, n - 1, controls.shape[axis]), reference, axis=axis)
        reference = spline(np.arange(n))
    np.testing.assert_allclose(upsample_controls(controls, shape), reference, atol=1e-5)


def test_still_subject_maps_each_voxel_to_itself_and_translation_shifts_it(template):
    identity = np.stack(np.meshgrid(*[np.arange(n) for n in template.shape], indexing="ij"))
    np.testing.assert_allclose(subject_coordinates(template, still_anatomy(template)), identity, atol=1e-4)
    shifted = subject_coordinates(template, still_anatomy(template, translation_mm=(8.0, 0.0, 0.0)))
    np.testing.assert_allclose(shifted[0], identity[0] - 2.0, atol=1e-4)       # 8 mm = 2 voxels of 4 mm
    np.testing.assert_allclose(shifted[1:], identity[1:], atol=1e-4)


def test_still_subject_tissues_reproduce_the_template_and_sum_to_at_most_one(template):
    anatomy = still_anatomy(template, cortical_thinning_mm=0.0, ventricle_growth_mm=0.0)
    tissues = subject_tissues(template, anatomy, subject_coordinates(template, anatomy))
    deep = template.skull_distance_mm < -template.spacing_mm         # away from the skull's partial voxels
    np.testing.assert_allclose(tissues.fractions["gm"][deep], template.gm[deep], atol=1e-5)
    total = sum(tissues.fractions.values())
    assert total.max() <= 1.0 + 1e-5 and total.min() >= 0.0
    assert tissues.fractions["bone"].sum() > 0 and tissues.fractions["fat"].sum() > 0
    assert tissues.fractions["bone"][template.gm > 0.5].max() == 0.0          # no skull inside the brain


def test_same_seed_gives_identical_images_and_another_seed_does_not(template, cohort):
    out, _ = cohort
    plan = plan_subject(0, 3, template)
    images, _ = render_subject(template, plan, seed=0)
    again, _ = render_subject(template, plan_subject(0, 3, template), seed=0)
    other, _ = render_subject(template, plan_subject(1, 3, template), seed=1)
    for sequence in SEQUENCES:
        assert np.array_equal(images[sequence], again[sequence])
        assert np.array_equal(images[sequence], load(out / f"sub-0004/sub-0004_{sequence}.nii.gz"))
        assert not np.array_equal(images[sequence], other[sequence])


def test_worker_count_does_not_change_the_files(tmp_path, cohort):
    out, manifest = cohort
    parallel = generate_cohort(tmp_path, n_subjects=4, seed=0, resolution_mm=RESOLUTION, workers=2)
    pd.testing.assert_frame_equal(parallel, manifest.iloc[:len(parallel)].reset_index(drop=True))
    for path in parallel["path"]:
        assert (tmp_path / path).read_bytes() == (out / path).read_bytes()


def test_files_are_ras_int16_on_the_template_grid(cohort):
    out, manifest = cohort
    for path in manifest["path"]:
        image = nib.load(out / path)
        assert image.shape == EXPECTED_SHAPE and image.get_data_dtype() == np.int16
        np.testing.assert_allclose(image.affine, EXPECTED_AFFINE)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")


def test_manifest_rows_and_labels(cohort):
    out, _ = cohort
    on_disk = pd.read_csv(out / "manifest.csv")
    assert list(on_disk.columns) == MANIFEST_COLUMNS and len(on_disk) == SUBJECTS * len(SEQUENCES)
    assert set(on_disk["split"]) <= {"train", "val", "test"}
    subjects = on_disk.drop_duplicates("subject").set_index("subject")
    assert sorted(subjects["diagnosis"]) == sorted(DIAGNOSIS_BLOCK)         # one full block: exact proportions
    assert subjects["age"].between(20, 90).all() and subjects.loc[subjects.diagnosis == "AD", "age"].ge(60).all()
    tumour, stroke = subjects["diagnosis"] == "tumour", subjects["diagnosis"] == "stroke"
    for column in ("mutation", "time", "event", "mask"):
        assert subjects.loc[tumour, column].notna().all() and subjects.loc[~tumour, column].isna().all()
    assert subjects.loc[stroke, "months_since_stroke"].notna().all()
    assert subjects.loc[~stroke, "months_since_stroke"].isna().all()
    assert set(subjects.loc[tumour, "event"]) <= {0, 1} and (subjects.loc[tumour, "time"] > 0).all()
    for _, rows in on_disk.groupby("subject"):
        assert list(rows["sequence"]) == list(SEQUENCES) and rows["split"].nunique() == 1


def test_tumour_masks_are_inside_the_brain_and_match_the_images(template, cohort):
    out, manifest = cohort
    found = set()
    for _, row in manifest.dropna(subset=["mask"]).drop_duplicates("subject").iterrows():
        labels = load(out / row["mask"])
        tissues, expected = build_tissues(template, plan_subject(0, int(row["subject"][4:]) - 1, template))
        assert np.array_equal(labels, expected)
        assert set(np.unique(labels)) <= {0, 1, 2, 3} and (labels > 0).any()
        assert tissues.intracranial[labels > 0].min() >= 0.5
        found |= set(np.unique(labels))
    assert found == {0, 1, 2, 3}


def test_tumour_compartments_have_their_contrast(template):
    plan = next(p for p in (plan_subject(0, i, template) for i in range(SUBJECTS)) if p.tumour is not None)
    tumour = dataclasses.replace(plan.tumour, radii_mm=np.full(3, 16.0), necrosis_fraction=0.3, enhancement=0.9,
                                 oedema_extent=2.0)
    images, labels = render_subject(template, dataclasses.replace(plan, tumour=tumour), seed=0)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    t1, t1c, flair = (images[s].astype(float) for s in ("T1w", "T1c", "FLAIR"))
    necrosis, oedema, enhancing = labels == 1, labels == 2, labels == 3
    tissues, _ = build_tissues(template, plan)
    white = (tissues.fractions["wm"] > 0.9) & (labels == 0)
    assert t1c[enhancing].mean() > 1.5 * t1c[necrosis].mean()
    assert t1c[enhancing].mean() / np.median(t1c[white]) > 1.2 * t1[enhancing].mean() / np.median(t1[white])
    assert flair[oedema].mean() > 1.3 * np.median(flair[white])


def test_tumour_properties_drive_mutation_and_survival(template):
    rng = np.random.default_rng(0)
    tumours = [draw_tumour(rng, template) for _ in range(600)]
    outcomes = np.array([tumour_outcomes(rng, t, 50.0) for t in tumours])
    necrotic = np.array([t.necrosis_fraction > 0.15 for t in tumours])
    mutation, time, event = outcomes.T
    assert mutation[~necrotic].mean() > mutation[necrotic].mean() + 0.15
    assert np.median(time[mutation == 1]) > np.median(time[mutation == 0])
    assert set(event) == {0.0, 1.0} and time.max() <= 60.0


def stroke_images(template, months: float):
    plan = next(p for p in (plan_subject(0, i, template) for i in range(SUBJECTS)) if p.diagnosis == "CN")
    stroke = Stroke("MCA", 1.0, np.array([14.0, 2.0, -2.0]), np.array([0.94, 0.0, 0.33]), 32.0, 10.0, 85.0,
                    months, Lumpiness.draw(np.random.default_rng(0), 0.3))
    plan = dataclasses.replace(plan, stroke=stroke, diagnosis="stroke")
    images, _ = render_subject(template, plan, seed=0, sequences=("T1w", "FLAIR"))
    tissues, _ = build_tissues(template, plan)
    return images, tissues, tissues.fractions["infarct"] + tissues.fractions["gliosis"]


def test_acute_stroke_is_flair_bright_and_t1_dark_and_chronic_cavitates(template):
    images, tissues, lesion = stroke_images(template, months=0.3)
    inside = lesion > 0.8                              # right hemisphere
    mirror = np.flip(inside, axis=0)                   # the same place on the left (the template is symmetric)
    assert inside.sum() > 50
    flair, t1 = images["FLAIR"].astype(float), images["T1w"].astype(float)
    assert flair[inside].mean() > 1.4 * flair[mirror].mean()
    assert t1[inside].mean() < 0.8 * t1[mirror].mean()
    chronic, chronic_tissues, _ = stroke_images(template, months=48.0)
    assert chronic_tissues.fractions["csf"][inside].mean() > tissues.fractions["csf"][inside].mean() + 0.2
    assert chronic["FLAIR"][inside].mean() < 0.9 * flair[inside].mean()


def test_atrophy_grows_csf_with_age_for_the_same_anatomy(template):
    near_ventricles = template.ventricle_distance_mm <= 6.0
    total, ventricular = [], []
    for age in (25.0, 85.0):
        aged = draw_anatomy(np.random.default_rng(7), age, "M", alzheimer_like=False)
        anatomy = still_anatomy(template, cortical_thinning_mm=aged.cortical_thinning_mm,
                                ventricle_growth_mm=aged.ventricle_growth_mm)
        csf = subject_tissues(template, anatomy, subject_coordinates(template, anatomy)).fractions["csf"]
        total.append(csf.sum())
        ventricular.append(csf[near_ventricles].sum())
    assert total[1] > 1.1 * total[0] and ventricular[1] > 1.4 * ventricular[0]


def test_age_is_visible_as_dark_csf_on_t1_across_subjects(template):
    ages, dark = [], []
    for index in range(20):
        plan = plan_subject(5, index, template)
        if plan.diagnosis in ("CN", "AD"):
            t1 = render_subject(template, plan, seed=5, sequences=("T1w",))[0]["T1w"]
            tissues, _ = build_tissues(template, plan)
            intracranial = tissues.intracranial > 0.5
            white = np.median(t1[tissues.fractions["wm"] > 0.9])
            ages.append(plan.anatomy.age)
            dark.append((t1[intracranial] < 0.45 * white).mean())
    assert len(ages) >= 8 and spearmanr(ages, dark).statistic > 0.6


def test_contrast_order_per_sequence(template, cohort):
    out, _ = cohort
    plan = plan_subject(0, 1, template)
    assert plan.diagnosis == "CN"
    tissues, _ = build_tissues(template, plan)
    pure = {name: tissues.fractions[name] > 0.9 for name in ("csf", "gm", "wm")}
    mean = {s: {t: load(out / f"sub-0002/sub-0002_{s}.nii.gz")[m].mean() for t, m in pure.items()} for s in SEQUENCES}
    assert mean["T1w"]["wm"] > mean["T1w"]["gm"] > mean["T1w"]["csf"]
    assert mean["T2w"]["csf"] > mean["T2w"]["gm"] > mean["T2w"]["wm"]
    assert mean["FLAIR"]["gm"] > mean["FLAIR"]["wm"] > mean["FLAIR"]["csf"]


def test_skull_stripped_background_is_zero(tmp_path, template):
    generate_cohort(tmp_path, n_subjects=1, seed=0, resolution_mm=RESOLUTION, sequences=("T2w",),
                    skull_stripped=True)
    image = load(tmp_path / "sub-0001/sub-0001_T2w.nii.gz")
    tissues, _ = build_tissues(template, plan_subject(0, 0, template))
    assert image[tissues.intracranial < 0.5].max() == 0 and image[tissues.intracranial >= 0.5].min() > 0


def test_cli_writes_the_asked_sequences_and_reports(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--subjects", "2", "--seed", "3", "--resolution", "4",
                 "--sequences", "T1w,FLAIR"]) == 0
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    assert list(manifest["sequence"]) == ["T1w", "FLAIR"] * 2
    assert all((tmp_path / p).is_file() for p in manifest["path"])
    assert "2 subjects" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path), "--resolution", "0.5"])
    taken = tmp_path / "file.txt"
    taken.write_text("x")
    assert main(["synth", "--out", str(taken), "--subjects", "1", "--resolution", "4"]) == 2
    assert str(taken) in capsys.readouterr().err
