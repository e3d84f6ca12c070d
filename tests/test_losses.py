"""Losses and teacher targets against hand-derived values, numpy re-derivations and a 2-process gloo run."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from braindino.losses import (DINOLoss, IBOTPatchLoss, KoLeoLoss, SimCLRLoss, TeacherCentering, masked_token_weights,
                              sinkhorn_knopp)


def _np_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _np_log_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


# ----------------------------------------------------------------------------------------------------- DINO


def test_dino_loss_matches_the_four_cross_view_pairs_by_hand():
    rng = np.random.default_rng(0)
    student_global = rng.normal(size=(2, 2, 3))
    student_local = rng.normal(size=(1, 2, 3))
    teacher = _np_softmax(rng.normal(size=(2, 2, 3)))
    temp = 0.5

    def cross_entropy(student_logits, teacher_probs):  # [B, K], [B, K] -> mean over the batch
        return np.mean(-(teacher_probs * _np_log_softmax(student_logits / temp)).sum(-1))

    # Student crops g0, g1, l0 against teacher crops t0, t1; (g0, t0) and (g1, t1) are the same view.
    expected = np.mean([
        cross_entropy(student_global[0], teacher[1]),
        cross_entropy(student_global[1], teacher[0]),
        cross_entropy(student_local[0], teacher[0]),
        cross_entropy(student_local[0], teacher[1]),
    ])
    loss = DINOLoss(student_temp=temp)(torch.tensor(student_global), torch.tensor(student_local),
                                        torch.tensor(teacher))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_with_uniform_student_is_log_k():
    teacher = torch.softmax(torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    loss = DINOLoss()(torch.zeros(2, 4, 3), torch.zeros(5, 4, 3), teacher)
    assert loss.item() == pytest.approx(math.log(3), rel=1e-6)


def test_dino_loss_ignores_the_same_view_pair():
    generator = torch.Generator().manual_seed(2)
    student_global = torch.randn(2, 3, 4, generator=generator, requires_grad=True)
    teacher = torch.softmax(torch.randn(2, 3, 4, generator=generator), dim=-1)

    def gradient_of_student_crop_0(teacher_probs):
        student_global.grad = None
        DINOLoss()(student_global, None, teacher_probs).backward()
        return student_global.grad[0].clone()

    other_teacher_0 = teacher.clone()
    other_teacher_0[0] = torch.softmax(torch.randn(3, 4, generator=generator), dim=-1)
    other_teacher_1 = teacher.clone()
    other_teacher_1[1] = other_teacher_0[0]
    reference = gradient_of_student_crop_0(teacher)
    # Student global crop 0 only meets teacher crop 1; teacher crop 0 is the same view and is excluded.
    torch.testing.assert_close(gradient_of_student_crop_0(other_teacher_0), reference)
    assert not torch.allclose(gradient_of_student_crop_0(other_teacher_1), reference)


def test_dino_loss_rejects_a_single_global_crop_without_locals():
    with pytest.raises(ValueError, match="different views"):
        DINOLoss()(torch.zeros(1, 2, 3), None, torch.full((1, 2, 3), 1 / 3))


# ---------------------------------------------------------------------------------------- teacher centering


def test_centering_update_is_the_closed_form_ema_of_the_mean_row():
    generator = torch.Generator().manual_seed(3)
    centering = TeacherCentering(dim=5, momentum=0.8)
    initial = torch.randn(1, 5, generator=generator)
    centering.center.copy_(initial)
    logits = torch.randn(2, 6, 5, generator=generator)  # [G, B, K]: every one of the 12 rows counts
    centering.update(logits)
    expected = 0.8 * initial + 0.2 * logits.reshape(12, 5).mean(dim=0, keepdim=True)
    torch.testing.assert_close(centering.center, expected)
    assert "center" in centering.state_dict()


def test_centering_probabilities_subtract_the_centre_before_sharpening():
    generator = torch.Generator().manual_seed(4)
    centering = TeacherCentering(dim=4)
    logits = torch.randn(6, 4, generator=generator)
    bias = torch.tensor([[5.0, -1.0, 0.0, 2.0]])
    centering.center.copy_(bias)
    probs = centering.probabilities(logits + bias, temperature=0.04)
    expected = _np_softmax(logits.numpy() / 0.04)
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-5, atol=1e-6)
    # Without the centre the bias on prototype 0 wins every row.
    assert (torch.softmax((logits + bias) / 0.04, dim=-1).argmax(-1) == 0).all()
    assert not (probs.argmax(-1) == 0).all()


# ------------------------------------------------------------------------------------------ Sinkhorn-Knopp


def _np_sinkhorn(logits, temperature, n_iterations):
    """The textbook alternating normalisation, in float64, without log-space tricks."""
    q = np.exp(logits / temperature).T  # [K, M]
    n_prototypes, n_samples = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= n_prototypes
        q /= q.sum(axis=0, keepdims=True)
        q /= n_samples
    return (q * n_samples).T


def test_sinkhorn_equals_numpy_rederivation():
    logits = np.random.default_rng(5).normal(size=(10, 4))
    result = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float32), temperature=0.5, n_iterations=3)
    np.testing.assert_allclose(result.numpy(), _np_sinkhorn(logits, 0.5, 3), rtol=1e-5, atol=1e-6)


def test_sinkhorn_marginals():
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(6)) * 2
    target_column_sum = torch.full((4,), 12 / 4)
    imbalances = []
    for n_iterations in (1, 3, 10, 300):
        assignment = sinkhorn_knopp(logits, temperature=0.5, n_iterations=n_iterations)
        torch.testing.assert_close(assignment.sum(dim=1), torch.ones(12))
        imbalances.append((assignment.sum(dim=0) - target_column_sum).abs().max().item())
    # Rows are exact after every iteration; columns converge to M / K as iterations are added.
    assert imbalances == sorted(imbalances, reverse=True)
    assert imbalances[0] > 1.0 and imbalances[-1] < 1e-4


def test_sinkhorn_is_finite_where_plain_exp_overflows():
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(7)) * 50
    assert not torch.isfinite(torch.exp(logits / 0.01)).all()
    assignment = sinkhorn_knopp(logits, temperature=0.01)
    assert torch.isfinite(assignment).all()
    torch.testing.assert_close(assignment.sum(dim=1), torch.ones(8))


# ---------------------------------------------------------------------------------------------------- iBOT


def test_ibot_weighs_each_masked_image_equally():
    masks = torch.zeros(3, 12, dtype=torch.bool)
    masks[0, 5] = True  # image 0: 1 masked token
    masks[1, 1:11] = True  # image 1: 10 masked tokens
    # image 2: none, so it does not count
    student_temp = 0.5
    teacher = torch.zeros(11, 4)
    teacher[:, 0] = 1.0
    student = torch.zeros(11, 4)  # image 0's token: uniform student, CE = log 4
    student[1:, 0] = student_temp * math.log(3)  # image 1's tokens: p_student[0] = 3 / (3 + 3) -> CE = log 2
    indices, weights = masked_token_weights(masks.numpy())
    assert indices.tolist() == [5] + [12 + i for i in range(1, 11)]      # row-major positions in [B, N]
    loss = IBOTPatchLoss(student_temp=student_temp)(student, teacher, torch.from_numpy(weights))
    assert loss.item() == pytest.approx((math.log(4) + math.log(2)) / 2, rel=1e-6)


def test_ibot_without_masked_tokens_is_zero_and_differentiable():
    student = torch.zeros(0, 4, requires_grad=True)
    indices, weights = masked_token_weights(np.zeros((2, 6), dtype=bool))
    assert indices.shape == weights.shape == (0,)
    loss = IBOTPatchLoss()(student, torch.zeros(0, 4), torch.from_numpy(weights))
    loss.backward()
    assert loss.item() == 0.0 and student.grad is not None


def test_ibot_rejects_rows_that_do_not_match_the_mask():
    masks = np.zeros((2, 4), dtype=bool)
    masks[0, :2] = True
    with pytest.raises(ValueError, match="M = 2"):
        IBOTPatchLoss()(torch.zeros(3, 4), torch.zeros(3, 4), torch.from_numpy(masked_token_weights(masks)[1]))


# --------------------------------------------------------------------------------------------------- KoLeo


def test_koleo_three_points_by_hand():
    angle = math.radians(30)
    # Unnormalised on purpose: the loss normalises first.
    features = torch.tensor([[3.0, 0.0], [0.0, 0.5], [2 * math.cos(angle), 2 * math.sin(angle)]])
    # Nearest neighbours: 0 <-> 2 (30 degrees apart, chord 2 sin 15), 1 -> 2 (60 degrees, chord 2 sin 30 = 1).
    chord_15 = 2 * math.sin(math.radians(15))
    expected = -(2 * math.log(chord_15 + 1e-8) + math.log(1.0 + 1e-8)) / 3
    assert KoLeoLoss()(features).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_is_finite_with_duplicate_and_near_duplicate_rows():
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(2, 16, generator=generator)
    duplicates = base[[0, 0, 1, 1]].requires_grad_(True)
    loss = KoLeoLoss()(duplicates)
    loss.backward()
    # Every row's nearest neighbour is its copy at distance 0.
    assert loss.item() == pytest.approx(-math.log(1e-8), rel=1e-6)
    assert torch.isfinite(duplicates.grad).all()

    near_duplicates = torch.cat([base, base[:1] + 1e-4 * torch.randn(1, 16, generator=generator)])
    near_duplicates.requires_grad_(True)
    loss = KoLeoLoss()(near_duplicates)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(near_duplicates.grad).all()
    assert near_duplicates.grad.abs().max() > 0


def test_koleo_computes_in_float32_from_bf16_input_under_autocast():
    features = torch.randn(6, 8, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(features)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, KoLeoLoss()(features.float()))


# -------------------------------------------------------------------------------------------------- SimCLR


def _np_nt_xent(z1, z2, temperature):
    embeddings = np.concatenate([z1, z2]).astype(np.float64)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    n = len(embeddings)
    half = n // 2
    losses = []
    for i in range(n):
        positive = (i + half) % n
        similarities = [embeddings[i] @ embeddings[j] / temperature for j in range(n) if j != i]
        positive_similarity = embeddings[i] @ embeddings[positive] / temperature
        losses.append(-(positive_similarity - np.log(np.sum(np.exp(similarities)))))
    return np.mean(losses)


def test_simclr_equals_numpy_nt_xent():
    rng = np.random.default_rng(10)
    z1, z2 = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    loss = SimCLRLoss(temperature=0.3)(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32))
    assert loss.item() == pytest.approx(_np_nt_xent(z1, z2, 0.3), rel=1e-5)


# --------------------------------------------------------------------------------------- distributed (gloo)

_WORLD = 2
_ROW_SPLIT = (3, 5)  # rows of the teacher logits held by rank 0 and rank 1: unequal on purpose
_SIMCLR_BATCH = 3


def _distributed_inputs():
    generator = torch.Generator().manual_seed(11)
    return {
        "initial_center": torch.randn(1, 6, generator=generator),
        "teacher_logits": torch.randn(sum(_ROW_SPLIT), 6, generator=generator) * 3,
        "z1": torch.randn(_WORLD * _SIMCLR_BATCH, 4, generator=generator),
        "z2": torch.randn(_WORLD * _SIMCLR_BATCH, 4, generator=generator),
    }


def _distributed_worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=_WORLD)
    try:
        inputs = _distributed_inputs()
        start = sum(_ROW_SPLIT[:rank])
        rows = inputs["teacher_logits"][start:start + _ROW_SPLIT[rank]]
        centering = TeacherCentering(dim=6, momentum=0.7)
        centering.center.copy_(inputs["initial_center"])
        centering.update(rows)
        assignment = sinkhorn_knopp(rows, temperature=0.2, n_iterations=3)

        images = slice(rank * _SIMCLR_BATCH, (rank + 1) * _SIMCLR_BATCH)
        z1 = inputs["z1"][images].clone().requires_grad_(True)
        z2 = inputs["z2"][images].clone().requires_grad_(True)
        loss = SimCLRLoss(temperature=0.2)(z1, z2)
        loss.backward()
        torch.save({"center": centering.center, "assignment": assignment, "loss": loss.detach(),
                    "z1_grad": z1.grad, "z2_grad": z2.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=_WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(_WORLD)]
    inputs = _distributed_inputs()

    centering = TeacherCentering(dim=6, momentum=0.7)
    centering.center.copy_(inputs["initial_center"])
    centering.update(inputs["teacher_logits"])
    for result in ranks:
        torch.testing.assert_close(result["center"], centering.center)

    assignment = sinkhorn_knopp(inputs["teacher_logits"], temperature=0.2, n_iterations=3)
    torch.testing.assert_close(torch.cat([result["assignment"] for result in ranks]), assignment)

    z1 = inputs["z1"].clone().requires_grad_(True)
    z2 = inputs["z2"].clone().requires_grad_(True)
    loss = SimCLRLoss(temperature=0.2)(z1, z2)
    loss.backward()
    # Each rank averages over its own anchors: the mean over ranks is the global loss, and the rank's gradient is
    # world x the global gradient, so DDP's average over ranks gives exactly the global-batch gradient.
    torch.testing.assert_close(torch.stack([result["loss"] for result in ranks]).mean(), loss.detach())
    torch.testing.assert_close(torch.cat([result["z1_grad"] for result in ranks]), _WORLD * z1.grad)
    torch.testing.assert_close(torch.cat([result["z2_grad"] for result in ranks]), _WORLD * z2.grad)
