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
def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> float:
    """Fraction of test rows whose weighted k-nearest-neighbour vote gives their label.

    train_features [N, D], train_labels [N] (any integer labels), test_features [M, D], test_labels [M].
    Neighbours are the k training rows with the highest cosine similarity s; each votes for its label with weight
    exp(s / temperature); the label with the largest total wins (ties: the smallest label). Test rows are processed
    ``chunk_size`` at a time so the [M, N] similarity matrix is never built whole.
    """
    if train_features.shape[0] != train_labels.shape[0] or test_features.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    classes, train_class = torch.unique(train_labels, return_inverse=True)
    train_unit = F.normalize(_at_least_float32(train_features), dim=-1)
    n_neighbours = min(k, train_unit.shape[0])
    correct = 0
    for start in range(0, test_features.shape[0], chunk_size):
        test_unit = F.normalize(_at_least_float32(test_features[start:start + chunk_size]), dim=-1)
        similarity, neighbour = (test_unit @ train_unit.T).topk(n_neighbours, dim=1)
        votes = torch.zeros(test_unit.shape[0], classes.numel(), dtype=similarity.dtype, device=similarity.device)
        votes.scatter_add_(1, train_class[neighbour], torch.exp(similarity / temperature))
        predicted = classes[votes.argmax(dim=1)]
        correct += (predicted == test_labels[start:start + chunk_size].to(predicted.device)).sum().item()
    return correct / test_features.shape[0]
