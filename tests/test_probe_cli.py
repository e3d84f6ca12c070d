"""`python probe.py` end to end on a tiny NIfTI cohort with a depth-1 ViT at 32 px: files, baselines on the same
splits, multi-endpoint YAML, segmentation masks in the native grid, one-line errors."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import lesion_cohort, write_tiny_model

from braindino.probe.results import ProbeResults
from probe import main

N_SUBJECTS = 12
AFFINE = np.array([[0, -1.5, 0, 10], [1.2, 0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])   # not RAS: exercises reorientation


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("probe_model") / "model")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 subjects × (T1, FLAIR) volumes [32, 32, 10] (half with a bright lesion + its mask), labels dx, age,
    time, event, mask."""
    root = tmp_path_factory.mktemp("probe_cohort")
    rows = lesion_cohort(root, N_SUBJECTS, AFFINE, masks=True)
    rows[2]["age"] = None                       # an empty label: that subject still has it on its other row
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


COMMON = ["--fractions", "50,100", "--seeds", "0,1", "--folds", "3", "--bootstrap", "40", "--workers", "1",
          "--device", "cpu"]


def test_classification_run_writes_metrics_predictions_report(tiny_model, cohort, tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["--model", str(tiny_model), "--manifest", str(cohort), "--task", "classification",
                   "--target", "dx", "--shots", "2", "--out", str(out), *COMMON])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    results = ProbeResults.from_dict(json.loads((out / "metrics.json").read_text(encoding="utf-8")))
    assert [e.name for e in results.encoders] == ["model", "random_like", "pixels"]
    endpoint = results.endpoints[0]
    assert endpoint.protocol == "cv" and endpoint.settings == ["50%", "100%", "2-shot"]
    assert len(endpoint.scores) == 3 * 3 * 2 and endpoint.n_subjects == N_SUBJECTS
    for score in endpoint.scores:
        value = score.metrics["balanced_accuracy"]
        assert value.low <= value.value <= value.high
        assert 0 < score.fraction_trained < 1 if score.encoder != "pixels" else score.fraction_trained == 1.0
    assert {(c.setting, c.baseline) for c in endpoint.comparisons} == {
        (s, b) for s in endpoint.settings for b in ("random_like", "pixels")}
    predictions = pd.read_csv(out / "predictions.csv")
    cell = predictions[(predictions.encoder == "model") & (predictions.setting == "100%") & (predictions.seed == 0)]
    assert sorted(cell.subject) == [f"sub-{i:02d}" for i in range(N_SUBJECTS)]       # CV: each subject once
    for (setting, seed), group in predictions.groupby(["setting", "seed"]):           # same splits for all encoders
        folds = {enc: dict(zip(g.subject, g.split)) for enc, g in group.groupby("encoder")}
        assert folds["model"] == folds["random_like"] == folds["pixels"]
    np.testing.assert_allclose(cell[["prob_healthy", "prob_lesion"]].sum(axis=1), 1.0, rtol=1e-6)
    assert (out / "report.md").is_file()
    assert "error:" not in captured.err and "dx · model @ 100%: balanced_accuracy" in captured.out
    assert len(list((out / "features").iterdir())) == 3

    features = out / "features" / "model"                   # --features reuse: same numbers, no re-extraction
    again = tmp_path / "again"
    assert main(["--model", str(tiny_model), "--features", str(features), "--no-default-baselines", "--manifest",
                 str(cohort), "--task", "classification", "--target", "dx", "--shots", "", "--out", str(again),
                 *COMMON]) == 0
    rerun = ProbeResults.from_dict(json.loads((again / "metrics.json").read_text(encoding="utf-8"))).endpoints[0]
    assert rerun.score("model", "100%", 1).metrics == endpoint.score("model", "100%", 1).metrics
    assert not (again / "features").exists()


def test_endpoints_yaml_regression_survival_mil_knn(tiny_model, cohort, tmp_path, capsys):
    spec = tmp_path / "endpoints.yaml"
    spec.write_text("- {name: age, task: regression, target: age, head: knn}\n"
                    "- {name: os, task: survival, time: time, event: event, sequences: FLAIR}\n"
                    "- {name: dx_mil, task: classification, target: dx, pooling: mil, fusion: mean}\n")
    out = tmp_path / "multi"
    assert main(["--model", str(tiny_model), "--manifest", str(cohort), "--endpoints", str(spec),
                 "--no-default-baselines", "--baseline", "pixels", "--out", str(out), *COMMON]) == 0
    results = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    names = {e["name"]: e for e in results["endpoints"]}
    assert set(names) == {"age", "os", "dx_mil"}
    assert names["os"]["sequences"] == ["FLAIR"] and names["dx_mil"]["head"] == "attention-mil"
    assert names["age"]["headline"] == "mae" and names["age"]["higher_is_better"]["mae"] is False
    assert names["age"]["dropped"] == {}
    predictions = pd.read_csv(out / "predictions.csv")
    os_rows = predictions[predictions.endpoint == "os"]
    assert set(os_rows.risk_group) <= {"high", "low"} and os_rows.risk.notna().all()


def test_segmentation_writes_native_grid_masks(tiny_model, cohort, tmp_path):
    out = tmp_path / "seg"
    assert main(["--model", str(tiny_model), "--manifest", str(cohort), "--task", "segmentation", "--mask", "mask",
                 "--sequences", "FLAIR", "--no-default-baselines", "--out", str(out), "--fractions", "100",
                 "--seeds", "0", "--folds", "3", "--bootstrap", "20", "--workers", "1", "--device", "cpu"]) == 0
    results = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    endpoint = results["endpoints"][0]
    assert endpoint["metrics"] == ["dice_mean", "dice_1"]
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == N_SUBJECTS and predictions["mask"].notna().all()
    written = nib.load(out / predictions["mask"].iloc[0])
    assert written.shape == (32, 32, 10) and np.allclose(written.affine, AFFINE)


def test_bad_inputs_are_one_error_line(tiny_model, cohort, tmp_path, capsys):
    def error(*extra):
        status = main(["--model", str(tiny_model), "--manifest", str(cohort), "--out", str(tmp_path / "bad"),
                       *COMMON, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and err[0].startswith("error: ")
        return err[0]

    assert "no column 'nope'" in error("--task", "classification", "--target", "nope")
    assert "not a number" in error("--task", "regression", "--target", "dx")
    assert "5-shot needs 5 subjects" in error("--task", "classification", "--target", "dx", "--shots", "5")
    other = tmp_path / "other_features"
    other.mkdir()
    (other / "model.json").write_text(json.dumps({"name": "x", "fingerprint": "0" * 16, "preprocessing": {},
                                                  "input_size": 32, "embed_dim": 1, "patch_size": 8, "grid": [4, 4]}))
    (other / "index.csv").write_text("path,subject,feature_file,model_fingerprint,content_hash,n_slices\n")
    assert "features were made by" in error("--task", "classification", "--target", "dx", "--features", str(other))
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_protocol_cv_ignores_the_split_column_and_split_needs_one(tiny_model, cohort, tmp_path, capsys):
    table = pd.read_csv(cohort)
    table["split"] = ["test" if int(s[-2:]) < 4 else "train" for s in table["subject"]]
    with_split = cohort.parent / "with_split.csv"
    table.to_csv(with_split, index=False)
    args = ["--model", str(tiny_model), "--no-default-baselines", "--task", "classification", "--target", "dx",
            "--shots", "", "--fractions", "100", "--seeds", "0", "--folds", "3", "--bootstrap", "20",
            "--workers", "1", "--device", "cpu"]
    assert main([*args, "--manifest", str(with_split), "--out", str(tmp_path / "auto")]) == 0
    auto = ProbeResults.from_dict(json.loads((tmp_path / "auto" / "metrics.json").read_text(encoding="utf-8")))
    assert auto.endpoints[0].protocol == "split" and auto.endpoints[0].scores[0].n_test == 4
    assert main([*args, "--manifest", str(with_split), "--protocol", "cv", "--out", str(tmp_path / "cv")]) == 0
    cv = ProbeResults.from_dict(json.loads((tmp_path / "cv" / "metrics.json").read_text(encoding="utf-8")))
    assert cv.endpoints[0].protocol == "cv" and cv.endpoints[0].scores[0].n_test == N_SUBJECTS
    capsys.readouterr()
    assert main([*args, "--manifest", str(cohort), "--protocol", "split", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--protocol split" in err[0]


def test_skip_infeasible_runs_the_feasible_endpoints_and_names_the_others(tiny_model, cohort, tmp_path, capsys):
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("- {name: dx, task: classification, target: dx}\n"
                         "- {name: nothing, task: regression, target: age, sequences: [T1]}\n", encoding="utf-8")
    table = pd.read_csv(cohort)
    table.loc[table["subject"] != "sub-00", "age"] = None          # one labelled subject: no CV possible
    sparse = cohort.parent / "sparse_age.csv"
    table.to_csv(sparse, index=False)
    args = ["--model", str(tiny_model), "--no-default-baselines", "--manifest", str(sparse), "--endpoints",
            str(endpoints), "--shots", "", "--fractions", "100", "--seeds", "0", "--folds", "3", "--bootstrap", "20",
            "--workers", "1", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "strict")]) == 2              # without the flag: one error, no work
    assert not (tmp_path / "strict" / "metrics.json").exists()
    capsys.readouterr()
    assert main([*args, "--skip-infeasible", "--out", str(tmp_path / "lenient")]) == 0
    err = capsys.readouterr().err
    assert "endpoint 'nothing' skipped" in err
    results = ProbeResults.from_dict(json.loads((tmp_path / "lenient" / "metrics.json").read_text(encoding="utf-8")))
    assert [e.name for e in results.endpoints] == ["dx"]
