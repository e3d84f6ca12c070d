"""Torch heads: Cox partial likelihood, MLP, gated attention-MIL and the segmentation decoder."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import r2_score
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_censored

from heads import (AttentionMILHead, MLPHead, SegmentationDecoder, SlicePooling, cox_partial_likelihood_loss,
                   dice_score, make_linear_head, make_survival_target)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run fastest single-threaded, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def breslow_loss_by_hand(risk, time, event) -> float:
    """-(1/n_events) sum over events i of [risk_i - log sum_{j: time_j >= time_i} exp(risk_j)], by loops."""
    total = 0.0
    for i in np.flatnonzero(event):
        total += risk[i] - math.log(sum(math.exp(risk[j]) for j in range(len(risk)) if time[j] >= time[i]))
    return -total / event.sum()


def test_cox_loss_on_hand_derived_cases():
    ones = torch.ones(3, dtype=torch.bool)
    distinct = cox_partial_likelihood_loss(torch.zeros(3), torch.tensor([3.0, 1.0, 2.0]), ones)
    assert distinct.item() == pytest.approx((math.log(3) + math.log(2) + math.log(1)) / 3, abs=1e-6)
    # Breslow: both tied events see both volumes in their risk set (Efron would give (log 2 + log 1) / 2)
    tied = cox_partial_likelihood_loss(torch.zeros(2), torch.tensor([1.0, 1.0]), ones[:2])
    assert tied.item() == pytest.approx(math.log(2), abs=1e-6)
    # the censored volume (time 1) counts in no risk set after time 1 and contributes no term
    censored = cox_partial_likelihood_loss(torch.tensor([0.0, 2.0, 1.0]), torch.tensor([2.0, 1.0, 3.0]),
                                           torch.tensor([True, False, True]))
    assert censored.item() == pytest.approx(-((0 - math.log(1 + math.e)) + (1 - 1)) / 2, abs=1e-6)
    no_event = cox_partial_likelihood_loss(torch.ones(3, requires_grad=True), torch.arange(3.0), ~ones)
    assert no_event.item() == 0.0 and no_event.requires_grad


def test_cox_loss_matches_loops_with_ties_in_any_order():
    rng = np.random.default_rng(0)
    risk, time = rng.normal(size=40), rng.integers(1, 8, size=40).astype(float)
    event = rng.random(40) < 0.6
    loss = cox_partial_likelihood_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event))
    assert loss.item() == pytest.approx(breslow_loss_by_hand(risk, time, event), rel=1e-10)


def test_cox_loss_is_stationary_at_the_sksurv_breslow_estimate():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 3))
    event_time = rng.exponential(np.exp(-(X @ np.array([1.0, -0.5, 0.0]))))
    time = np.ceil(np.minimum(event_time, rng.exponential(2.0, size=80)) * 4)   # coarse: many tied times
    event = event_time <= rng.exponential(2.0, size=80)
    beta_hat = CoxPHSurvivalAnalysis(alpha=0.0, ties="breslow").fit(X, make_survival_target(event, time)).coef_

    def loss_at(beta):
        return cox_partial_likelihood_loss(torch.tensor(X) @ beta, torch.tensor(time), torch.tensor(event))

    beta = torch.tensor(beta_hat, requires_grad=True)
    loss_at(beta).backward()
    assert beta.grad.abs().max().item() < 1e-6
    for step in (np.eye(3) * 0.05):
        assert loss_at(torch.tensor(beta_hat + step)).item() > loss_at(torch.tensor(beta_hat)).item()


def test_cox_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one length"):
        cox_partial_likelihood_loss(torch.zeros(3), torch.zeros(2), torch.ones(3, dtype=torch.bool))


def nonlinear_data(rng, n=240, d=12):
    """``X`` [n, d] float32 and a score depending on a product of features (no linear model can fit it)."""
    X = rng.normal(size=(n, d)).astype(np.float32)
    return X, X[:, 0] * X[:, 1] + 0.5 * X[:, 2]


def test_mlp_learns_an_interaction_that_a_linear_head_cannot():
    rng = np.random.default_rng(2)
    X, score = nonlinear_data(rng)
    y = np.where(X[:, 0] * X[:, 1] > 0, "same", "opposite")
    mlp = MLPHead("classification").fit(X[:160], y[:160])
    linear = make_linear_head("classification").fit(X[:160], y[:160])
    assert mlp.score(X[160:], y[160:]) > 0.8 > linear.score(X[160:], y[160:]) + 0.15
    probabilities = mlp.predict_proba(X[160:])
    assert probabilities.shape == (80, 2) and list(mlp.classes_) == ["opposite", "same"]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(mlp.classes_[probabilities.argmax(axis=1)], mlp.predict(X[160:]))


def test_mlp_regression_predicts_in_target_units():
    rng = np.random.default_rng(3)
    X, score = nonlinear_data(rng)
    y = 1000.0 + 100.0 * score
    mlp = MLPHead("regression").fit(X[:160], y[:160])
    predicted = mlp.predict(X[160:])
    assert mlp.score(X[160:], y[160:]) == pytest.approx(r2_score(y[160:], predicted))
    assert mlp.score(X[160:], y[160:]) > 0.6
    assert abs(predicted.mean() - y[160:].mean()) < 30.0


def test_mlp_survival_ranks_risk_beyond_a_linear_cox_model():
    rng = np.random.default_rng(4)
    X, score = nonlinear_data(rng, d=8)
    event_time, censor_time = rng.exponential(np.exp(-2 * score)), rng.exponential(3.0, size=len(score))
    y = make_survival_target(event_time <= censor_time, np.minimum(event_time, censor_time))
    mlp = MLPHead("survival").fit(X[:160], y[:160])
    risk = mlp.predict(X[160:])
    assert mlp.score(X[160:], y[160:]) == concordance_index_censored(y["event"][160:], y["time"][160:], risk)[0]
    linear = make_linear_head("survival").fit(X[:160], y[:160])
    assert mlp.score(X[160:], y[160:]) > max(0.7, linear.score(X[160:], y[160:]) + 0.1)


def test_mlp_is_deterministic_given_random_state_and_leaves_the_global_rng_alone():
    rng = np.random.default_rng(5)
    X, score = nonlinear_data(rng, n=60)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = MLPHead("regression", epochs=20, random_state=7).fit(X, score).predict(X)
    assert torch.rand(1).item() == before.item()
    np.testing.assert_array_equal(first, MLPHead("regression", epochs=20, random_state=7).fit(X, score).predict(X))
    assert not np.array_equal(first, MLPHead("regression", epochs=20, random_state=8).fit(X, score).predict(X))


def test_torch_heads_refuse_bad_targets_and_inputs():
    X = np.zeros((6, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="two classes"):
        MLPHead("classification", epochs=1).fit(X, np.ones(6))
    with pytest.raises(ValueError, match="structured array"):
        MLPHead("survival", epochs=1).fit(X, np.ones(6))
    with pytest.raises(ValueError, match="task must be"):
        MLPHead("ranking", epochs=1).fit(X, np.ones(6))
    head = MLPHead("regression", epochs=1).fit(X, np.arange(6.0))
    with pytest.raises(ValueError, match="fitted on 3"):
        head.predict(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="predict_proba is for classification"):
        head.predict_proba(X)


def one_signal_slice_bags(rng, n, slices=32, width=16, strength=4.0):
    """Bags [S, width] of noise (S varies); odd-numbered bags are positive: one random slice is shifted by
    ``strength`` on two features. Returns bags, labels [n], signal slice index [n]."""
    bags, labels, signal_slice = [], [], []
    for index in range(n):
        bag = rng.normal(size=(int(rng.integers(slices - 8, slices + 1)), width)).astype(np.float32)
        where = int(rng.integers(len(bag)))
        if index % 2:
            bag[where, :2] += strength
        bags.append(bag)
        labels.append(index % 2)
        signal_slice.append(where)
    return bags, np.array(labels), np.array(signal_slice)


def test_attention_mil_finds_the_one_signal_slice_that_mean_pooling_washes_out():
    rng = np.random.default_rng(6)
    train_bags, train_y, _ = one_signal_slice_bags(rng, 80)
    test_bags, test_y, test_signal = one_signal_slice_bags(rng, 200)
    mil = AttentionMILHead("classification", epochs=200).fit(train_bags, train_y)
    pooling = SlicePooling("mean").fit(train_bags)
    mean_linear = make_linear_head("classification").fit(pooling.transform(train_bags), train_y)

    mil_accuracy = mil.score(test_bags, test_y)
    assert mil_accuracy > 0.9
    assert mil_accuracy > mean_linear.score(pooling.transform(test_bags), test_y) + 0.15
    weights = mil.attention(test_bags)
    assert [len(w) for w in weights] == [len(b) for b in test_bags]
    np.testing.assert_allclose([w.sum() for w in weights], 1.0, atol=1e-6)
    positive = np.flatnonzero(test_y == 1)
    peaks = [np.argmax(weights[i]) == test_signal[i] for i in positive]
    assert np.mean(peaks) > 0.9
    assert np.median([weights[i][test_signal[i]] for i in positive]) > 0.5


def test_attention_mil_ignores_padding_and_bag_order():
    rng = np.random.default_rng(7)
    bags, y, _ = one_signal_slice_bags(rng, 20, slices=10)
    mil = AttentionMILHead("regression", epochs=30).fit(bags, y.astype(float))
    alone = np.array([mil.predict([bag])[0] for bag in bags[:5]])
    np.testing.assert_allclose(mil.predict(bags[:5]), alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mil.predict(bags[:5][::-1]), alone[::-1], rtol=1e-5, atol=1e-6)


def test_attention_mil_survival_and_determinism():
    rng = np.random.default_rng(8)
    bags, y, _ = one_signal_slice_bags(rng, 120, slices=12)
    event_time = rng.exponential(np.exp(-2.0 * y))
    target = make_survival_target(np.ones(120, bool), event_time)
    mil = AttentionMILHead("survival", epochs=150).fit(bags[:80], target[:80])
    assert mil.score(bags[80:], target[80:]) > 0.65
    again = AttentionMILHead("survival", epochs=150).fit(bags[:80], target[:80])
    np.testing.assert_array_equal(mil.predict(bags[80:]), again.predict(bags[80:]))


def patch_level_segmentation(rng, n, grid=(4, 6), size=32, width=8):
    """Tokens [n, N, width] whose feature 0 is +2 on foreground patches and -2 elsewhere (plus noise), and masks
    [n, size, size]: the patch indicator upsampled bilinearly and thresholded at 1/2 (smooth blobs)."""
    foreground = rng.random((n, *grid)) < 0.3
    tokens = rng.normal(size=(n, grid[0] * grid[1], width)).astype(np.float32)
    tokens[..., 0] = np.where(foreground.reshape(n, -1), 2.0, -2.0) + 0.3 * tokens[..., 0]
    upsampled = F.interpolate(torch.from_numpy(foreground[:, None].astype(np.float32)), size=(size, size),
                              mode="bilinear", align_corners=False)[:, 0]
    return tokens, (upsampled > 0.5).numpy().astype(np.int64)


def test_segmentation_decoder_recovers_patch_level_foreground():
    rng = np.random.default_rng(9)
    train_tokens, train_masks = patch_level_segmentation(rng, 64)
    test_tokens, test_masks = patch_level_segmentation(rng, 48)
    decoder = SegmentationDecoder(2, (4, 6), 32, epochs=40).fit(train_tokens.astype(np.float16), train_masks)
    probabilities = decoder.predict_proba(test_tokens)
    assert probabilities.shape == (48, 2, 32, 32) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    predicted = decoder.predict(test_tokens)
    assert predicted.shape == (48, 32, 32) and predicted.dtype == np.int64
    assert decoder.score(test_tokens, test_masks) == dice_score(predicted, test_masks, 2) > 0.9
    shuffled = test_tokens[:, rng.permutation(24)]
    assert decoder.score(shuffled, test_masks) < 0.6


def test_dice_score_by_hand_and_decoder_input_checks():
    truth = np.array([[[0, 1, 1, 2]]])
    assert dice_score(np.array([[[0, 1, 0, 2]]]), truth, 3) == pytest.approx((2 / 3 + 1.0) / 2)
    assert dice_score(np.zeros((1, 1, 4), int), np.zeros((1, 1, 4), int), 2) == 1.0
    decoder = SegmentationDecoder(2, (2, 2), 8, epochs=1)
    with pytest.raises(ValueError, match=r"\[n, 4, D\]"):
        decoder.fit(np.zeros((3, 5, 4)), np.zeros((3, 8, 8), int))
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        decoder.fit(np.zeros((3, 4, 4)), np.full((3, 8, 8), 2))
