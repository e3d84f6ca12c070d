"""The probe's volume unit: MRI sequence classification end to end (one sample per volume) with folds, subsets and
bootstrap still grouped by SUBJECT; auto unit choice; cluster bootstrap; brain-age correction; MIL attention."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import head_like_volume, write_tiny_model
from test_probe_protocols import cohort as label_cohort
from test_probe_protocols import manifest

from braindino.errors import InputError
from braindino.probe import metrics as M
from braindino.probe.endpoints import EndpointSpec, build_table, endpoints_from_yaml
from braindino.probe.evaluate import plan_endpoint
from braindino.probe.fitting import fit_predict, make_head
from braindino.probe.protocols import parse_settings
from braindino.probe.results import ProbeResults
from probe import main

N_SUBJECTS = 9
SEQUENCES = ("FLAIR", "T1", "T2")
COMMON = ["--fractions", "50,100", "--seeds", "0,1", "--folds", "3", "--bootstrap", "40", "--workers", "1",
          "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("volume_unit_model") / "model")


def sequence_contrast(head: np.ndarray, sequence: str) -> np.ndarray:
    """[X, Y, Z] the same head in one sequence's contrast (plus a fifth of its texture): T1 bright centre, T2
    bright rim, FLAIR a left-right ramp."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in head.shape], indexing="ij"))
    radius = np.sqrt((grid[:2] ** 2).sum(0))
    base = {"T1": 600 - 400 * radius, "T2": 200 + 400 * radius, "FLAIR": 350 + 250 * grid[0]}[sequence]
    return np.where(head > 0, base + 0.2 * head, 0).astype(np.float32)


@pytest.fixture(scope="module")
def sequence_cohort(tmp_path_factory):
    """9 subjects × (FLAIR, T1, T2) volumes [32, 32, 10] whose contrast is the sequence; a subject-level age."""
    root = tmp_path_factory.mktemp("sequence_cohort")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(N_SUBJECTS):
        head = head_like_volume(rng, shape=(32, 32, 10))
        for sequence in SEQUENCES:
            path = root / f"sub-{i:02d}_{sequence}.nii.gz"
            nib.save(nib.Nifti1Image(sequence_contrast(head, sequence), np.eye(4)), path)
            rows.append({"path": path.name, "subject": f"sub-{i:02d}", "sequence": sequence, "age": 40 + 3 * i})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def test_sequence_classification_end_to_end(tiny_model, sequence_cohort, tmp_path, capsys):
    out = tmp_path / "seq"
    status = main(["--model", str(tiny_model), "--manifest", str(sequence_cohort), "--task", "classification",
                   "--target", "sequence", "--no-default-baselines", "--baseline", "pixels", "--shots", "",
                   "--out", str(out), *COMMON])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    endpoint = ProbeResults.from_dict(json.loads((out / "metrics.json").read_text())).endpoints[0]
    assert endpoint.unit == "volume" and endpoint.classes == list(SEQUENCES)
    assert (endpoint.n_samples, endpoint.n_subjects) == (3 * N_SUBJECTS, N_SUBJECTS)
    assert endpoint.score("model", "100%", 0).n_test == 3 * N_SUBJECTS
    assert endpoint.aggregate("model", "100%", "balanced_accuracy").mean >= 0.9
    assert all(c.n_subjects == N_SUBJECTS for c in endpoint.comparisons)
    predictions = pd.read_csv(out / "predictions.csv")
    cell = predictions[(predictions.encoder == "model") & (predictions.setting == "100%") & (predictions.seed == 0)]
    assert sorted(cell["sample"]) == sorted(f"sub-{i:02d}/{s}" for i in range(N_SUBJECTS) for s in SEQUENCES)
    assert (cell["sample"].str.split("/").str[0] == cell["subject"]).all()
    # CV folds partition the samples and test each fold's samples only; a subject whose volumes sat in two test
    # folds would be in training and in test of both folds.
    for _, group in predictions.groupby(["encoder", "setting", "seed"]):
        assert group["sample"].is_unique and len(group) == 3 * N_SUBJECTS
        assert (group.groupby("subject")["split"].nunique() == 1).all()
        assert group["split"].nunique() == 3
    assert "27 volumes of 9 subjects" in (out / "report.md").read_text(encoding="utf-8")


def test_folds_and_subsets_never_share_a_subject():
    data = label_cohort(15, sequences=("T1", "T2", "FLAIR"))
    table = build_table(data, EndpointSpec("seq", "classification", target="sequence", unit="volume"))
    assert len(table.samples) == 45 and table.n_subjects == 15 and table.spec.unit == "volume"
    plan = plan_endpoint(table, parse_settings([10, 50, 100], [2]), [0, 1], 5, True, "m")
    for seed, folds in plan.folds.items():
        for k, fold in enumerate(folds):
            assert not set(table.subjects[fold.train]) & set(table.subjects[fold.test])
            for setting in plan.settings:
                subset = plan.subsets[(setting.name, seed)][k]
                assert set(subset) <= set(fold.train)
                assert not set(table.subjects[subset]) & set(table.subjects[fold.test])
    split = data.assign(split=np.where(data["subject"].isin(["sub-00", "sub-03"]), "test", "train"))
    table = build_table(split, EndpointSpec("seq", "classification", target="sequence", unit="volume"))
    (fold,) = plan_endpoint(table, parse_settings([100], []), [0], 5, False, "m").folds[0]
    assert set(table.subjects[fold.test]) == {"sub-00", "sub-03"} and len(fold.test) == 6


def test_auto_unit_and_sample_ids():
    data = label_cohort(6)
    auto = dict(unit="auto")
    assert build_table(data, EndpointSpec("seq", "classification", target="sequence", **auto)).spec.unit == "volume"
    assert build_table(data, EndpointSpec("age", "regression", target="age", **auto)).spec.unit == "subject"
    assert build_table(data, EndpointSpec("dx", "classification", target="dx", **auto)).spec.unit == "subject"
    varies = data.assign(dose=np.where(data["sequence"] == "T1", 1.0, 2.0))
    assert build_table(varies, EndpointSpec("d", "regression", target="dose", **auto)).spec.unit == "volume"
    with pytest.raises(InputError, match="different labels.*--unit volume"):
        build_table(data, EndpointSpec("seq", "classification", target="sequence"))
    subject = build_table(data, EndpointSpec("age", "regression", target="age", **auto))
    assert list(subject.samples) == list(subject.subjects)
    rows = [{"path": f"/d/{i}.nii.gz", "subject": s, "sequence": q, "dx": d}
            for i, (s, q, d) in enumerate([("a", "T1", "x"), ("a", "T1", "y"), ("a", "T2", ""), ("b", "T1", "x")])]
    table = build_table(manifest(rows), EndpointSpec("dx", "classification", target="dx", unit="volume"))
    assert list(table.samples) == ["a/row2", "a/row3", "b/T1"] and list(table.subjects) == ["a", "a", "b"]
    assert table.dropped == {"empty label": 1} and table.split is None
    bad = manifest([dict(r, split="test" if r["path"] == "/d/1.nii.gz" else "train") for r in rows])
    with pytest.raises(InputError, match="subject a has rows in different splits"):
        build_table(bad, EndpointSpec("dx", "classification", target="dx", unit="volume"))
    with pytest.raises(InputError, match="segmentation runs per subject"):
        EndpointSpec("seg", "segmentation", mask="mask", unit="volume").check("m")


def test_cluster_bootstrap_draws_whole_subjects():
    rng = np.random.default_rng(0)
    sizes = {"s0": 1, "s1": 2, "s2": 3, "s3": 4, "s4": 2}
    groups = rng.permutation(np.concatenate([[s] * n for s, n in sizes.items()]))
    draws = M.cluster_bootstrap_indices(groups, 200, seed=3)
    assert len(draws) == 200
    for index in draws:
        counts = np.bincount(index, minlength=len(groups))
        times_drawn = [set(counts[groups == s].tolist()) for s in sizes]
        assert all(len(t) == 1 for t in times_drawn)             # every sample of a subject comes along together
        assert sum(t.pop() for t in times_drawn) == len(sizes)   # G subjects drawn (with replacement)
        assert len(index) == sum(sizes[s] * (counts[groups == s][0]) for s in sizes)
    lengths = {len(index) for index in draws}
    assert len(lengths) > 1                                      # sample counts vary with the subjects drawn
    unique = np.array([f"sub-{i}" for i in range(7)])
    np.testing.assert_array_equal(np.array(M.cluster_bootstrap_indices(unique, 50, 9)),
                                  M.bootstrap_indices(7, 50, 9))   # subject unit: the plain subject bootstrap


def test_cis_and_paired_test_resample_subjects():
    """Each subject's prediction repeated 3 times (3 volumes): the subject bootstrap of the volumes must give the
    subject-level numbers exactly (balanced accuracy is unchanged by replicating every subject); a volume
    bootstrap would give narrower intervals."""
    from types import SimpleNamespace

    from braindino.probe.evaluate import BOOTSTRAP_SEED, compare, score_cell

    rng = np.random.default_rng(0)
    n, k = 30, 3
    subject_preds = [{"y_true": np.arange(n) % 2, "prob": rng.dirichlet([1, 1], n)} for _ in range(2)]
    volume_preds = [{key: np.repeat(value, k, axis=0) for key, value in pred.items()} for pred in subject_preds]
    groups = np.repeat([f"s{i:02d}" for i in range(n)], k)
    got = score_cell("classification", volume_preds[0], groups, 200, 0.95)
    assert got == M.score_with_ci("classification", subject_preds[0], M.bootstrap_indices(n, 200, BOOTSTRAP_SEED))
    result = SimpleNamespace(settings=["100%"], headline="balanced_accuracy", protocol="split")
    by_cell = {("m", "100%", 0): volume_preds[0], ("b", "100%", 0): volume_preds[1]}
    (comparison,) = compare("classification", result, [{"name": "m"}, {"name": "b"}], [0], by_cell, groups, 200,
                            0.95, 1, BOOTSTRAP_SEED + 1)
    expected = M.paired_bootstrap("classification", "balanced_accuracy", subject_preds[:1], subject_preds[1:],
                                  M.bootstrap_indices(n, 200, BOOTSTRAP_SEED + 1))
    assert (comparison.difference, comparison.low, comparison.high, comparison.p_value) == expected
    assert comparison.n_subjects == n


def test_brain_age_correction_wraps_head_and_fits_on_training_only(tmp_path):
    import heads

    path = tmp_path / "endpoints.yaml"
    path.write_text("- {name: age, task: regression, target: age, brain_age_correction: true}\n")
    (spec,) = endpoints_from_yaml(path, dict(head="linear", brain_age_correction=False))
    assert spec.brain_age_correction is True
    estimator = make_head("regression", spec, seed=0)
    assert isinstance(estimator, heads.BrainAgeCorrection)
    rng = np.random.default_rng(0)
    age = rng.uniform(20, 80, 60)
    X = np.c_[age + rng.normal(0, 8, 60), rng.normal(size=(60, 3))]
    train, test = np.arange(40), np.arange(40, 60)
    pred, notes = fit_predict("regression", estimator, X, {"value": age}, train, test)
    assert notes == []
    reference = heads.BrainAgeCorrection(heads.make_linear_head("regression", random_state=0)).fit(X[train], age[train])
    np.testing.assert_allclose(pred["y_pred"], reference.predict(X[test]), rtol=1e-12)
    with pytest.raises(InputError, match="brain-age correction wraps"):
        EndpointSpec("dx", "classification", target="dx", brain_age_correction=True).check("m")


def test_mil_attention_saved_for_model_at_100_percent(tiny_model, sequence_cohort, tmp_path):
    out = tmp_path / "mil"
    assert main(["--model", str(tiny_model), "--manifest", str(sequence_cohort), "--task", "classification",
                 "--target", "sequence", "--pooling", "mil", "--no-default-baselines", "--shots", "",
                 "--out", str(out), "--fractions", "100", "--seeds", "0", "--folds", "3", "--bootstrap", "20",
                 "--workers", "1", "--device", "cpu"]) == 0
    attention = pd.read_csv(out / "attention" / "sequence.csv")
    assert list(attention.columns) == ["sample", "subject", "sequence", "z", "weight"]
    assert attention["sample"].nunique() == 3 * N_SUBJECTS
    np.testing.assert_allclose(attention.groupby("sample")["weight"].sum(), 1.0, rtol=1e-5)
    assert (attention["sample"] == attention["subject"] + "/" + attention["sequence"]).all()
    assert attention.groupby("sample")["z"].apply(lambda z: z.is_unique).all()
