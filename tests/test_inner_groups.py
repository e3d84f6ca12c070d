"""With the volume unit (several samples per subject) every inner search keeps a subject's volumes on one side:
the logistic, ridge and Cox penalty searches, the brain-age slope's out-of-fold predictions and the kNN's
leave-one-out vote; and the probe passes the subjects into every fit."""

import numpy as np
import pytest

import heads
from braindino.probe import evaluate
from braindino.probe.endpoints import EndpointSpec
from braindino.probe.knn import KNNProbe
from braindino.probe.protocols import Fold
from heads.targets import make_survival_target


def volumes(rng, n_subjects=15, per_subject=3, d=8):
    """[V, d] features of ``per_subject`` near-identical volumes per subject, subject ids [V], a subject label."""
    base = rng.normal(size=(n_subjects, d))
    groups = np.repeat([f"s{i:02d}" for i in range(n_subjects)], per_subject)
    X = np.repeat(base, per_subject, axis=0) + 0.01 * rng.normal(size=(n_subjects * per_subject, d))
    return X, groups, np.repeat(base[:, 0], per_subject)


def assert_grouped(splits, groups):
    assert splits, "no inner splits were made"
    for train, test in splits:
        assert not set(groups[train]) & set(groups[test])


@pytest.mark.parametrize("task", ["classification", "regression", "survival"])
def test_linear_heads_split_inner_folds_by_subject(task):
    rng = np.random.default_rng(0)
    X, groups, signal = volumes(rng)
    y = {"classification": (signal > 0).astype(int), "regression": 50 + 10 * signal,
         "survival": make_survival_target(np.arange(len(signal)) % 4 != 0, np.exp(-signal) + 0.1)}[task]
    head = heads.make_linear_head(task, random_state=0)
    head.fit(X, y, **{f"{head.steps[-1][0]}__groups": groups})
    assert_grouped(head[-1].inner_splits_, groups)
    ungrouped = heads.make_linear_head(task, random_state=0).fit(X, y)[-1].inner_splits_
    if ungrouped is not None:          # without groups (the old behaviour) a subject straddles some inner split
        assert any(set(groups[a]) & set(groups[b]) for a, b in ungrouped)


def test_brain_age_slope_and_its_regressor_use_subject_folds():
    rng = np.random.default_rng(1)
    X, groups, signal = volumes(rng, n_subjects=20)
    age = 50 + 10 * signal
    corrected = heads.BrainAgeCorrection(heads.make_linear_head("regression")).fit(X, age, groups=groups)
    assert_grouped(corrected.inner_splits_, groups)
    assert_grouped(corrected.regressor_[-1].inner_splits_, groups)


def test_knn_leave_one_out_excludes_the_subjects_own_volumes():
    rng = np.random.default_rng(2)
    X, groups, signal = volumes(rng)
    knn = KNNProbe("classification", ks=(1, 5)).fit(X, (signal > 0).astype(int), groups=groups)
    similarity = knn._loo_similarity(groups)
    same = groups[:, None] == groups[None, :]
    assert np.isneginf(similarity[same]).all() and np.isfinite(similarity[~same]).all()


def test_the_probe_passes_subjects_into_every_inner_search(monkeypatch):
    rng = np.random.default_rng(3)
    X, groups, signal = volumes(rng, n_subjects=20)
    made = []

    def recording_make_head(*args, **kwargs):
        made.append(evaluate_make_head(*args, **kwargs))
        return made[-1]

    evaluate_make_head = evaluate.make_head
    monkeypatch.setattr(evaluate, "make_head", recording_make_head)
    spec = EndpointSpec("dx", "classification", target="dx", unit="volume")
    folds = [Fold("fold-0", np.arange(15, 60), np.arange(0, 15)), Fold("fold-1", np.arange(0, 45), np.arange(45, 60))]
    evaluate.run_cell("classification", spec, X, {"code": (signal > 0).astype(int)}, folds,
                      [f.train for f in folds], 2, 0, groups=groups)
    assert len(made) == 2
    for estimator, fold in zip(made, folds):
        assert_grouped(estimator[-1].inner_splits_, groups[fold.train])
