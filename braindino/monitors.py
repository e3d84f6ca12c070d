"""Collapse monitors and online kNN accuracy, logged by the trainer every few steps.

Pure functions run without autograd, returning Python floats. With M rows of teacher probabilities p [M, K] and
features f [B, D]:

* ``teacher_entropy``          mean_i H(p_i)                 low: sharp targets (healthy only if rows differ)
* ``mean_probability_entropy`` H(mean_i p_i)                 low: every row picks the same prototype (collapse)
* ``student_teacher_kl``       mean_i KL(p_i || q_i)         q = softmax(student logits / tau_s): distance to targets
* ``prototype_usage``          |{argmax_k p_i}| / K          fraction of prototypes that win at least one row
* ``feature_std``              mean_d std_b(f_b / |f_b|)[d]  ~1/sqrt(D) when spread over the sphere, 0 when collapsed
* ``effective_rank``           exp(H(s / sum(s)))            s = singular values of f (Roy & Vetterli, 2007)
* ``knn_accuracy``             weighted cosine kNN vote      (Wu et al. 2018, as in DINO's kNN evaluation)
* ``logit_spread``             mean_k std_i t[i, k]          how much teacher logits t [M, K] differ between rows
* ``top_direction_share``      s_1^2 / sum_j s_j^2           s = singular values of t with its rows centred

DINO's uniform-target fixed point (README, "Why DINO sat at log K") is ``logit_spread / tau_t < 1`` (targets barely
differ between slices once sharpened) together with ``top_direction_share > 0.9`` (what differs is one direction):
``FixedPointWatch`` warns when a run stays there.

H is the Shannon entropy in nats, with 0 log 0 = 0.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def _entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats along the last axis; [..., K] -> [...]."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def _at_least_float32(tensor: Tensor) -> Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


@torch.no_grad()
def teacher_entropy(teacher_probs: Tensor) -> float:
    """Mean per-row entropy (nats) of teacher probabilities [M, K]; between 0 and log K."""
    return _entropy(_at_least_float32(teacher_probs)).mean().item()


@torch.no_grad()
def mean_probability_entropy(teacher_probs: Tensor) -> float:
    """Entropy (nats) of the mean teacher distribution of [M, K]; log K when prototypes are used evenly."""
    return _entropy(_at_least_float32(teacher_probs).mean(dim=0)).item()


@torch.no_grad()
def student_teacher_kl(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> float:
    """Mean over rows of KL(p_t || softmax(student_logits / student_temp)); both [M, K]; nats."""
    teacher = _at_least_float32(teacher_probs)
    student_log_probs = F.log_softmax(_at_least_float32(student_logits) / student_temp, dim=-1)
    return (torch.special.xlogy(teacher, teacher) - teacher * student_log_probs).sum(dim=-1).mean().item()


@torch.no_grad()
def prototype_usage(teacher_probs: Tensor) -> float:
    """Fraction of the K prototypes that are the argmax of at least one row of [M, K]."""
    return torch.unique(teacher_probs.argmax(dim=-1)).numel() / teacher_probs.shape[-1]


@torch.no_grad()
def feature_std(features: Tensor) -> float:
    """Mean over the D dimensions of the (unbiased) batch std of L2-normalised features [B, D], B >= 2."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [B, D] with B >= 2, got {tuple(features.shape)}")
    return F.normalize(_at_least_float32(features), dim=-1).std(dim=0).mean().item()


@torch.no_grad()
def effective_rank(features: Tensor) -> float:
    """exp(entropy of the singular values of features [B, D] normalised to sum 1); between 1 and min(B, D)."""
    singular_values = torch.linalg.svdvals(_at_least_float32(features))
    return torch.exp(_entropy(singular_values / singular_values.sum())).item()


@torch.no_grad()
def knn_predictions(train_features: Tensor, train_labels: Tensor, test_features: Tensor, k: int = 20,
                    temperature: float = 0.07, chunk_size: int = 1024) -> Tensor:
    """The weighted k-nearest-neighbour vote's label [M] for each test row.

    train_features [N, D], train_labels [N] (any integer labels), test_features [M, D]. Neighbours are the k
    training rows with the highest cosine similarity s; each votes for its label with weight exp(s / temperature);
    the label with the largest total wins (ties: the smallest label). Test rows are processed ``chunk_size`` at a
    time so the [M, N] similarity matrix is never built whole.
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train features and labels must have the same number of rows")
    classes, train_class = torch.unique(train_labels, return_inverse=True)
    train_unit = F.normalize(_at_least_float32(train_features), dim=-1)
    n_neighbours = min(k, train_unit.shape[0])
    predicted = []
    for start in range(0, test_features.shape[0], chunk_size):
        test_unit = F.normalize(_at_least_float32(test_features[start:start + chunk_size]), dim=-1)
        similarity, neighbour = (test_unit @ train_unit.T).topk(n_neighbours, dim=1)
        votes = torch.zeros(test_unit.shape[0], classes.numel(), dtype=similarity.dtype, device=similarity.device)
        votes.scatter_add_(1, train_class[neighbour], torch.exp(similarity / temperature))
        predicted.append(classes[votes.argmax(dim=1)])
    return torch.cat(predicted) if predicted else train_labels[:0]


@torch.no_grad()
def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> float:
    """Fraction of test rows [M] whose ``knn_predictions`` vote gives their label ``test_labels`` [M]."""
    if test_features.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    predicted = knn_predictions(train_features, train_labels, test_features, k, temperature, chunk_size)
    return (predicted == test_labels.to(predicted.device)).float().mean().item()


@torch.no_grad()
def logit_spread(logits: Tensor) -> float:
    """Mean over the K prototypes of the (unbiased) std across the M rows of logits [M, K], M >= 2."""
    if logits.dim() != 2 or logits.shape[0] < 2:
        raise ValueError(f"logits must be [M, K] with M >= 2, got {tuple(logits.shape)}")
    return _at_least_float32(logits).std(dim=0).mean().item()


@torch.no_grad()
def top_direction_share(outputs: Tensor) -> float:
    """Share of the row-to-row variance of outputs [M, K] in their first principal direction, in [0, 1]."""
    centred = _at_least_float32(outputs) - _at_least_float32(outputs).mean(dim=0, keepdim=True)
    energy = torch.linalg.svdvals(centred).square()
    return (energy[0] / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)).item()


class FixedPointWatch:
    """Tells when a DINO run has sat in the uniform-target regime for ``patience`` steps (0: never).

    ``update(step, spread_over_temp, top_share)`` at each monitor step returns a warning line once, the first time
    the regime (``spread_over_temp < 1`` and ``top_share > 0.9``) has held from an earlier monitor step for at least
    ``patience`` steps; leaving the regime restarts the count.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.since: int | None = None
        self.warned = False

    def update(self, step: int, spread_over_temp: float, top_share: float) -> str | None:
        if spread_over_temp >= 1.0 or top_share <= 0.9:
            self.since = None
            return None
        self.since = step if self.since is None else self.since
        if self.warned or self.patience <= 0 or step - self.since < self.patience:
            return None
        self.warned = True
        return (f"warning: step {step}: DINO has sat in its uniform-target fixed point for {step - self.since} steps "
                f"(teacher logit spread / teacher temp {spread_over_temp:.2f} < 1, first direction "
                f"{top_share:.0%} of the variance): its loss stays near log K. Lower teacher.temp, hold "
                f"teacher.momentum below 1, or use contrastive_warmup (README, \"Why DINO sat at log K\")")
