"""Collapse monitors and kNN accuracy against hand-computed values and scikit-learn."""

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from braindino.monitors import (effective_rank, feature_std, knn_accuracy, mean_probability_entropy,
                                prototype_usage, student_teacher_kl, teacher_entropy)


def test_entropies_by_hand():
    uniform = torch.full((3, 4), 0.25)
    assert teacher_entropy(uniform) == pytest.approx(math.log(4))
    assert teacher_entropy(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])) == pytest.approx(math.log(2) / 2)

    distinct_one_hot = torch.eye(4)  # sharp rows, each on its own prototype: healthy
    assert teacher_entropy(distinct_one_hot) == pytest.approx(0.0)
    assert mean_probability_entropy(distinct_one_hot) == pytest.approx(math.log(4))
    collapsed = torch.eye(4)[[2, 2, 2]]  # every row on prototype 2
    assert mean_probability_entropy(collapsed) == pytest.approx(0.0)


def test_student_teacher_kl_by_hand():
    teacher = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    # Row 0: student softmax([0, log 3]) = [1/4, 3/4] -> KL = log 4. Row 1: student equals teacher -> KL = 0.
    student_logits = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]]) * 0.1
    assert student_teacher_kl(teacher, student_logits, student_temp=0.1) == pytest.approx(math.log(4) / 2, rel=1e-5)


def test_prototype_usage_counts_argmax_winners():
    probs = torch.tensor([[0.1, 0.0, 0.9, 0.0, 0.0], [0.7, 0.1, 0.2, 0.0, 0.0], [0.0, 0.2, 0.8, 0.0, 0.0]])
    assert prototype_usage(probs) == pytest.approx(2 / 5)


def test_feature_std_is_inverse_sqrt_dim_when_spread_and_zero_when_collapsed():
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(4096, 32, generator=generator)
    assert feature_std(spread) == pytest.approx(1 / math.sqrt(32), rel=0.03)
    direction = torch.randn(1, 32, generator=generator)
    collapsed = torch.rand(50, 1, generator=generator).add(0.5) * direction  # one direction, different norms
    assert feature_std(collapsed) == pytest.approx(0.0, abs=1e-6)


def test_effective_rank():
    identity_like = torch.cat([torch.eye(8), torch.eye(8)]) * 3.0
    assert effective_rank(identity_like) == pytest.approx(8.0, rel=1e-5)
    generator = torch.Generator().manual_seed(1)
    rank_one = torch.randn(40, 1, generator=generator) @ torch.randn(1, 8, generator=generator)
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-3)
    # Singular values (3, 1): p = (3/4, 1/4).
    two_values = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert effective_rank(two_values) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_knn_weighting_by_hand():
    def at(degrees):
        return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]

    # One label-3 neighbour very close to the query, two label-7 neighbours farther away.
    train = torch.tensor([at(0), at(60), at(60.5)])
    labels = torch.tensor([3, 7, 7])
    query, query_label = torch.tensor([at(5)]), torch.tensor([3])
    # T = 0.07: exp(cos 5 / T) > 2 exp(cos 55 / T), the close neighbour wins. T = 1: the two far ones outvote it.
    assert knn_accuracy(train, labels, query, query_label, k=3, temperature=0.07) == 1.0
    assert knn_accuracy(train, labels, query, query_label, k=3, temperature=1.0) == 0.0


def test_knn_accuracy_equals_sklearn_weighted_cosine_knn():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(3, 6))

    def sample(n):
        labels = rng.integers(0, 3, size=n)
        return centres[labels] + 0.9 * rng.normal(size=(n, 6)), labels

    train_x, train_y = sample(120)
    test_x, test_y = sample(70)
    k, temperature = 10, 0.1
    classifier = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                                      weights=lambda distance: np.exp((1.0 - distance) / temperature))
    expected = classifier.fit(train_x, train_y).score(test_x, test_y)
    assert 0.4 < expected < 1.0  # neither trivial nor hopeless
    accuracy = knn_accuracy(torch.tensor(train_x), torch.tensor(train_y), torch.tensor(test_x),
                            torch.tensor(test_y), k=k, temperature=temperature, chunk_size=16)
    assert accuracy == pytest.approx(expected)


def test_subject_bootstrap_interval_resamples_whole_subjects():
    from braindino.train.online_knn import subject_bootstrap_interval

    correct = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    subjects = np.array(["a", "a", "b", "b", "c", "c"])
    low, high = subject_bootstrap_interval(correct, subjects, resamples=400, seed=3)
    draws = np.random.default_rng(3).integers(0, 3, size=(400, 3))
    per_subject_hits, per_subject_volumes = np.array([2.0, 0.0, 1.0]), np.array([2, 2, 2])
    shares = per_subject_hits[draws].sum(1) / per_subject_volumes[draws].sum(1)
    assert (low, high) == tuple(np.percentile(shares, [2.5, 97.5]))
    assert subject_bootstrap_interval(np.ones(4), np.array(["a", "b", "c", "d"])) == (1.0, 1.0)
