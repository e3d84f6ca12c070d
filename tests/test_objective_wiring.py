"""DINOObjective and update_teacher on tiny hand-made inputs, against a plain numpy re-derivation: which student crop
meets which teacher crop, the crop-major layout, the teacher centres, KoLeo per global crop, the loss weights."""

import numpy as np
import pytest
import torch
from torch import nn

from braindino.augment.masking import MaskBatch
from braindino.train.config import load_config
from braindino.train.dino import DINOObjective, update_teacher

G, L, B, K, D, N = 2, 2, 3, 4, 5, 4     # global crops, local crops, images, prototypes, feature dim, patches
STUDENT_TEMP, TEACHER_TEMP, CENTRE_MOMENTUM = 0.5, 0.25, 0.8
WEIGHTS = {"dino": 0.7, "ibot": 0.3, "koleo": 0.2}


def objective(teacher_target="centering") -> DINOObjective:
    config = load_config(None, [f"dino.n_prototypes={K}", f"ibot.n_prototypes={K}", f"dino.student_temp={STUDENT_TEMP}",
                                f"dino.center_momentum={CENTRE_MOMENTUM}", f"dino.teacher_target={teacher_target}",
                                *(f"{term}.loss_weight={weight}" for term, weight in WEIGHTS.items())])
    return DINOObjective(config)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def cross_entropy(teacher_probs, student_logits):
    """[B, K], [B, K] → mean over the images of -sum_k p_t log p_s."""
    return float(np.mean(-(teacher_probs * log_softmax(student_logits / STUDENT_TEMP)).sum(-1)))


def koleo(features):
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    distances = []
    for i in range(len(unit)):
        others = [j for j in range(len(unit)) if j != i]
        nearest = max(others, key=lambda j: unit[i] @ unit[j])
        distances.append(np.linalg.norm(unit[i] - unit[nearest]))
    return float(-np.mean(np.log(np.array(distances) + 1e-8)))


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((G * B, N), dtype=bool)
    masks[0, [1, 3]] = True          # crop 0 of image 0: 2 masked patches
    masks[4, [0, 1, 2]] = True       # crop 1 of image 1: 3
    masks[5, 2] = True               # crop 1 of image 2: 1
    m = int(masks.sum())
    arrays = {"cls": rng.normal(size=(G * B, D)), "dino_global": rng.normal(size=(G * B, K)) * 2,
              "dino_local": rng.normal(size=(L * B, K)) * 2, "ibot": rng.normal(size=(m, K)) * 2,
              "teacher_dino": rng.normal(size=(G * B, K)) * 2, "teacher_ibot": rng.normal(size=(m, K)) * 2}
    return masks, arrays


def run(target, masks, arrays):
    tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in arrays.items()}
    student_out = {"cls": tensors["cls"], "dino_global": tensors["dino_global"], "dino_local": tensors["dino_local"],
                   "ibot": tensors["ibot"]}
    teacher_out = {"dino": tensors["teacher_dino"], "ibot": tensors["teacher_ibot"]}
    return target(student_out, teacher_out, MaskBatch.from_masks(masks), TEACHER_TEMP, G)


def expected_terms(masks, a, dino_centre, ibot_centre):
    """By hand. Rows are crop-major: row c*B + b is crop c of image b."""
    teacher = softmax((a["teacher_dino"] - dino_centre) / TEACHER_TEMP).reshape(G, B, K)
    student = [a["dino_global"][c * B:(c + 1) * B] for c in range(G)] + \
              [a["dino_local"][c * B:(c + 1) * B] for c in range(L)]
    # global crop 0 meets teacher crop 1 only, global crop 1 teacher crop 0; every local crop meets both
    pairs = [(0, 1), (1, 0)] + [(G + local, t) for local in range(L) for t in range(G)]
    dino = np.mean([cross_entropy(teacher[t], student[s]) for s, t in pairs])

    ibot_teacher = softmax((a["teacher_ibot"] - ibot_centre) / TEACHER_TEMP)
    token_ce = -(ibot_teacher * log_softmax(a["ibot"] / STUDENT_TEMP)).sum(-1)
    image_of_token = np.nonzero(masks)[0]                     # row-major order of the masked tokens
    per_image = [token_ce[image_of_token == i].mean() for i in np.unique(image_of_token)]
    ibot = float(np.mean(per_image))                          # each masked crop counts once

    koleo_term = np.mean([koleo(a["cls"][c * B:(c + 1) * B]) for c in range(G)])   # neighbours within one crop
    return {"dino": dino, "ibot": ibot, "koleo": koleo_term}, teacher.reshape(G * B, K)


def test_dino_objective_by_hand_in_centering_mode():
    target = objective("centering")
    masks, first = inputs(0)
    _, second = inputs(1)
    dino_centre, ibot_centre = np.zeros((1, K)), np.zeros((1, K))
    for arrays in (first, second):                            # the second call uses the centres the first left
        total, terms, extra = run(target, masks, arrays)
        expected, teacher_probs = expected_terms(masks, arrays, dino_centre, ibot_centre)
        assert sorted(terms) == ["dino", "ibot", "koleo"]
        for name, value in expected.items():
            assert float(terms[name]) == pytest.approx(value, rel=1e-5), name
        assert float(total) == pytest.approx(sum(WEIGHTS[n] * v for n, v in expected.items()), rel=1e-5)
        np.testing.assert_allclose(extra["teacher_probs"].numpy(), teacher_probs, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(extra["student_logits"].numpy(), arrays["dino_global"].astype(np.float32))
        # centres: EMA of the mean teacher logit row, updated after the probabilities were taken
        dino_centre = CENTRE_MOMENTUM * dino_centre + (1 - CENTRE_MOMENTUM) * arrays["teacher_dino"].mean(0)
        ibot_centre = CENTRE_MOMENTUM * ibot_centre + (1 - CENTRE_MOMENTUM) * arrays["teacher_ibot"].mean(0)
        state = target.state_dict()
        np.testing.assert_allclose(state["dino_centering.center"].numpy(), dino_centre, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["ibot_centering.center"].numpy(), ibot_centre, rtol=1e-5, atol=1e-6)


def numpy_sinkhorn(logits, temperature, iterations=3):
    q = np.exp(logits / temperature).T                        # [K, M]
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * q.shape[0]
        q /= q.sum(axis=0, keepdims=True) * q.shape[1]
    return (q * q.shape[1]).T


def test_dino_objective_sinkhorn_balances_all_global_crops_together():
    """Sinkhorn-Knopp runs once over the G*B teacher rows of both global crops (not per crop), centres untouched."""
    target = objective("sinkhorn")
    masks, arrays = inputs(2)
    _, terms, extra = run(target, masks, arrays)
    teacher = numpy_sinkhorn(arrays["teacher_dino"], TEACHER_TEMP)
    np.testing.assert_allclose(extra["teacher_probs"].numpy(), teacher, rtol=1e-4, atol=1e-6)
    teacher = teacher.reshape(G, B, K)
    student = [arrays["dino_global"][c * B:(c + 1) * B] for c in range(G)] + \
              [arrays["dino_local"][c * B:(c + 1) * B] for c in range(L)]
    pairs = [(0, 1), (1, 0)] + [(G + local, t) for local in range(L) for t in range(G)]
    assert float(terms["dino"]) == pytest.approx(np.mean([cross_entropy(teacher[t], student[s]) for s, t in pairs]),
                                                 rel=1e-4)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in target.state_dict().values())


def test_zero_weights_drop_their_terms():
    config = load_config(None, [f"dino.n_prototypes={K}", f"ibot.n_prototypes={K}", "ibot.loss_weight=0",
                                "koleo.loss_weight=0", "dino.loss_weight=0.5", "dino.teacher_target=centering"])
    masks, arrays = inputs(3)
    total, terms, _ = run(DINOObjective(config), masks, arrays)
    assert sorted(terms) == ["dino"] and float(total) == pytest.approx(0.5 * float(terms["dino"]), rel=1e-6)


class Tiny(nn.Module):
    def __init__(self, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.linear = nn.Linear(3, 2)
        self.head = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("momentum", [0.9, torch.tensor(0.75), torch.tensor(1.0)])
def test_update_teacher_is_the_ema_of_the_student(momentum):
    student, teacher = Tiny(0), Tiny(1)
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_teacher(student, teacher, momentum)
    m = float(momentum)
    for name, value in teacher.state_dict().items():
        expected = m * teacher_before[name] + (1 - m) * student_before[name]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(student.state_dict()[name], student_before[name])       # the student is not touched
    if m == 1.0:        # a skipped step: the teacher stays bit-identical
        assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
