"""Probe protocols split by subject; fractions and shots draw from training only; endpoint labels are validated."""

import numpy as np
import pandas as pd
import pytest

from braindino.errors import InputError
from braindino.probe.endpoints import EndpointSpec, build_table, endpoints_from_yaml
from braindino.probe.evaluate import plan_endpoint
from braindino.probe.knn import KNNProbe
from braindino.probe.protocols import Setting, make_folds, parse_settings, strata, subsample


def manifest(rows, path="/data/manifest.csv"):
    table = pd.DataFrame(rows)
    for column in ("sequence", "split"):
        if column not in table:
            table[column] = ""
    table["volume_index"] = pd.array([pd.NA] * len(table), dtype="Int64")
    table.attrs["manifest_path"] = path
    return table


def cohort(n=20, sequences=("T1", "FLAIR"), split=False, label="dx"):
    rows = []
    for i in range(n):
        for s in sequences:
            rows.append({"path": f"/d/{i}_{s}.nii.gz", "subject": f"sub-{i:02d}", "sequence": s,
                         "split": ("test" if i % 4 == 0 else "train") if split else "",
                         label: "AD" if i % 2 else "CN", "age": 50 + i, "time": 1 + i, "event": i % 3 != 0})
    return manifest(rows)


def test_cv_folds_partition_subjects_and_keep_sequences_together():
    table = build_table(cohort(23), EndpointSpec("dx", "classification", target="dx"))
    assert len(table.subjects) == 23 and all(set(r) == {"T1", "FLAIR"} for r in table.rows)
    assert table.split is None
    folds = make_folds(table.subjects, None, strata("classification", table.y), 5, seed=0)
    tests = np.concatenate([f.test for f in folds])
    assert sorted(tests.tolist()) == list(range(23))                # every subject tested exactly once
    for fold in folds:
        assert not set(fold.train) & set(fold.test)
        assert len(set(fold.train) | set(fold.test)) == 23
    rows_of = [set(table.rows[i].values()) for i in range(23)]
    for fold in folds:                                              # no manifest row of a test subject in training
        train_rows = set().union(*(rows_of[i] for i in fold.train))
        assert not train_rows & set().union(*(rows_of[i] for i in fold.test))
    assert [f.test.tolist() for f in folds] != [f.test.tolist() for f in make_folds(table.subjects, None,
                                                strata("classification", table.y), 5, seed=1)]


def test_split_column_protocol():
    table = build_table(cohort(20, split=True), EndpointSpec("dx", "classification", target="dx"))
    (fold,) = make_folds(table.subjects, table.split, None, 5, 0)
    assert fold.name == "test" and set(table.split[fold.test]) == {"test"} and len(fold.test) == 5


def test_fractions_and_shots_come_from_training_only():
    stratum = np.array([0, 1] * 50)
    train = np.arange(0, 80)
    for percent in (1, 10, 50):
        chosen = subsample(train, stratum, Setting("fraction", percent), 0, True)
        assert set(chosen) <= set(train) and set(stratum[chosen]) == {0, 1}
        assert len(chosen) == max(2, round(percent / 100 * 80))
    assert len(subsample(train, stratum, Setting("fraction", 100), 0, True)) == 80
    shots = subsample(train, stratum, Setting("shot", 5), 3, True)
    assert np.bincount(stratum[shots]).tolist() == [5, 5] and set(shots) <= set(train)
    assert not np.array_equal(shots, subsample(train, stratum, Setting("shot", 5), 4, True))


def test_training_subsets_are_nested_across_sizes():
    """One permutation per (seed, fold, stratum): every smaller fraction or shot count is a prefix of a larger."""
    data = cohort(40)
    table = build_table(data, EndpointSpec("dx", "classification", target="dx"))
    settings = parse_settings([10, 25, 50, 100], [1, 3, 5])
    plan = plan_endpoint(table, settings, [0, 1], 5, True, "m")
    for seed in (0, 1):
        for k in range(5):
            subsets = [set(plan.subsets[(s.name, seed)][k].tolist()) for s in settings]
            for chain in (subsets[:4], subsets[4:]):                 # fractions ascending; shots ascending
                for smaller, larger in zip(chain, chain[1:]):
                    assert smaller < larger


def test_regression_strata_are_quartiles():
    s = strata("regression", {"value": np.arange(100.0)})
    assert np.bincount(s).tolist() == [25, 25, 25, 25]


def test_label_validation_errors():
    data = cohort(10)
    with pytest.raises(InputError, match="no column 'nope'"):
        build_table(data, EndpointSpec("x", "classification", target="nope"))
    bad = data.astype({"age": object})
    bad.loc[3, "age"] = "old"
    with pytest.raises(InputError, match="not a number in row"):
        build_table(bad, EndpointSpec("age", "regression", target="age"))
    bad = data.copy()
    bad.loc[0, "time"] = 0
    with pytest.raises(InputError, match="time .* > 0"):
        build_table(bad, EndpointSpec("os", "survival", time="time", event="event"))
    bad = data.copy()
    bad["event"] = bad["event"].astype(object)
    bad.loc[0, "event"] = "2"
    with pytest.raises(InputError, match="not 0 or 1"):
        build_table(bad, EndpointSpec("os", "survival", time="time", event="event"))
    with pytest.raises(InputError, match="no rows of sequence T2"):
        build_table(data, EndpointSpec("dx", "classification", target="dx", sequences=["T2"]))


def test_empty_labels_are_dropped_and_counted():
    data = cohort(10)
    data.loc[data["subject"] == "sub-03", "dx"] = np.nan
    data.loc[0, "dx"] = ""
    table = build_table(data, EndpointSpec("dx", "classification", target="dx"))
    assert len(table.subjects) == 9 and table.dropped == {"empty label": 2}   # sub-00 keeps its FLAIR label
    assert table.unlabelled_subjects == ("sub-03",)


@pytest.mark.parametrize("token", ["n/a", "NA", " n/a ", "None", "nan", "NULL"])
def test_missing_value_tokens_count_as_empty_labels(tmp_path, token, capsys):
    from braindino.manifest import read_manifest
    from braindino.probe.run import _print_unlabelled

    data = cohort(10).drop(columns="volume_index").astype({"age": object})
    data.loc[data["subject"].isin(["sub-03", "sub-07"]), "dx"] = token
    data.loc[data["subject"] == "sub-05", "age"] = token
    path = tmp_path / "manifest.csv"
    data.to_csv(path, index=False)
    table = build_table(read_manifest(path), EndpointSpec("dx", "classification", target="dx"))
    assert len(table.subjects) == 8 and table.dropped == {"empty label": 4}
    assert table.unlabelled_subjects == ("sub-03", "sub-07")
    age = build_table(read_manifest(path), EndpointSpec("age", "regression", target="age"))
    assert len(age.subjects) == 9 and age.unlabelled_subjects == ("sub-05",)
    _print_unlabelled(table)
    assert capsys.readouterr().err.strip() == ("probe: endpoint 'dx': 4 rows without a label (empty, n/a, NA, ...) "
                                               "dropped, of 2 subjects: sub-03, sub-07")


def test_protocol_errors_before_any_work():
    data = cohort(12)
    one_class = data.assign(dx="AD")
    table = build_table(one_class, EndpointSpec("dx", "classification", target="dx"))
    with pytest.raises(InputError, match="one class"):
        plan_endpoint(table, parse_settings([100], []), [0], 5, False, "m")
    table = build_table(data, EndpointSpec("dx", "classification", target="dx"))
    with pytest.raises(InputError, match="5-shot needs 5 subjects of class"):
        plan_endpoint(table, parse_settings([100], [5]), [0], 5, True, "m")
    plan = plan_endpoint(table, parse_settings([100], [1, 5]), [0], 5, False, "m")   # default shots: skipped
    assert [s.name for s in plan.settings] == ["100%", "1-shot"] and "5-shot skipped" in plan.notes[0]
    with pytest.raises(InputError, match="subjects for 20-fold"):
        plan_endpoint(table, parse_settings([100], []), [0], 20, False, "m")


def test_endpoints_yaml(tmp_path):
    path = tmp_path / "endpoints.yaml"
    path.write_text("- {name: age, task: regression, target: age}\n"
                    "- {task: classification, target: dx, sequences: 'T1,FLAIR', pooling: max, head: knn}\n")
    specs = endpoints_from_yaml(path, dict(fusion="concat", pooling="mean", head="linear"))
    assert [s.name for s in specs] == ["age", "dx"] and specs[1].sequences == ["T1", "FLAIR"]
    assert specs[1].pooling == "max" and specs[0].head == "linear"
    path.write_text("- {task: survival, time: time, event: event, head: knn}\n")
    with pytest.raises(InputError, match="kNN"):
        endpoints_from_yaml(path, {})


def test_knn_probe_matches_dino_weighting():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 8))
    y = rng.integers(0, 2, 30)
    probe = KNNProbe("classification", ks=(5,)).fit(X, y)
    q = rng.normal(size=(4, 8))
    xn, qn = X / np.linalg.norm(X, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    sim = qn @ xn.T
    expected = []
    for row in sim:
        top = np.argsort(-row)[:5]
        votes = np.bincount(y[top], weights=np.exp(row[top] / 0.07), minlength=2)
        expected.append(votes / votes.sum())
    np.testing.assert_allclose(probe.predict_proba(q), expected, rtol=1e-10)
    assert KNNProbe("classification", ks=(10, 20)).fit(X[:6], y[:6]).k_ == 5     # capped at n_train - 1
    values = X[:, 0] * 3
    reg = KNNProbe("regression").fit(X, values)
    assert reg.predict(X[:3]).shape == (3,)
