"""A fitted probe head as a differentiable function of one volume's slice features, and its gradient ``G``.

``G`` ``[S, 2D]`` is what :func:`braindino.saliency.maps.gradient_map` needs: for a pooled head (linear or MLP on
mean / max / meanmax pooling), ``dy/dF_s`` through the pooling; for attention-MIL, whose output is exactly
``y = sum_s a_s y_s`` (a linear classifier over ``z = sum_s a_s h_s``, weights summing to 1), ``a_s dy_s/dF_s``:
each slice's own output gradient weighted by the head's attention on it. ``y`` is the centred logit of the chosen
class (``logit_c - mean_k logit_k``; classification), the (standardised) prediction (regression) or the risk score
(survival).
"""

from __future__ import annotations

import numpy as np
import torch

from braindino.errors import InputError

SUPPORTED_POOLINGS = ("mean", "max", "meanmax", "mil")


def _pool(bag: torch.Tensor, method: str) -> torch.Tensor:
    """``[S, F]`` → ``[P]``, as :class:`heads.SlicePooling`."""
    if method == "mean":
        return bag.mean(dim=0)
    if method == "max":
        return bag.max(dim=0).values
    return torch.cat([bag.mean(dim=0), bag.max(dim=0).values])


def _centred(logits: torch.Tensor, index: int) -> torch.Tensor:
    return logits[..., index] - logits.mean(dim=-1)


def _class_index(estimator, class_code: int | None) -> int:
    classes = [int(c) for c in np.asarray(estimator.classes_)]
    return classes.index(int(class_code))


def _linear_output(estimator, pooled: torch.Tensor, task: str, class_code) -> torch.Tensor:
    """A fitted ``make_linear_head`` pipeline (StandardScaler + logistic / ridge / Cox) on ``pooled`` ``[P]``."""
    scaler, model = estimator.steps[0][1], estimator.steps[-1][1]          # coef_ in the standardised features
    standardised = (pooled - torch.as_tensor(scaler.mean_, dtype=torch.float32)) / torch.as_tensor(
        scaler.scale_, dtype=torch.float32)
    coef = torch.as_tensor(np.atleast_2d(model.coef_), dtype=torch.float32)                 # [K, P]
    intercept = torch.as_tensor(np.atleast_1d(getattr(model, "intercept_", 0.0)), dtype=torch.float32)
    scores = coef @ standardised + intercept                                                # [K]
    if task != "classification":
        return scores[0]
    logits = torch.cat([torch.zeros(1), scores]) if len(scores) == 1 else scores            # binary: [0, z]
    return _centred(logits, _class_index(model, class_code))


def _torch_output(estimator, outputs: torch.Tensor, task: str, class_code) -> torch.Tensor:
    if task == "classification":
        return _centred(outputs, _class_index(estimator, class_code))
    return outputs[..., 0]


def feature_gradients(estimator, pooling: str, task: str, bag: np.ndarray, class_code: int | None
                      ) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(``G`` ``[S, 2D]``, MIL slice weights ``[S]`` or None, the head's output ``y``) for one volume's ``bag``."""
    import heads

    if pooling not in SUPPORTED_POOLINGS:
        raise InputError("--pooling", f"saliency follows heads on {', '.join(SUPPORTED_POOLINGS)} pooling, "
                                      f"not {pooling!r}", "pick one of those")
    features = torch.as_tensor(bag, dtype=torch.float32).requires_grad_(True)
    with torch.enable_grad():
        if isinstance(estimator, heads.AttentionMILHead):
            standardised = (features - torch.as_tensor(estimator.feature_mean_)) / torch.as_tensor(
                estimator.feature_scale_)
            mask = torch.ones(1, len(bag), dtype=torch.bool)
            hidden, attention = estimator.network_.embed_and_attend(standardised[None], mask)
            per_slice = _torch_output(estimator, estimator.network_.classifier(hidden)[0], task, class_code)  # [S]
            weights = attention[0].detach()
            output = (weights * per_slice).sum()
            (gradient,) = torch.autograd.grad(output, features)
            return gradient.numpy(), weights.double().numpy(), float(output.detach())
        pooled = _pool(features, pooling)
        if isinstance(estimator, heads.MLPHead):
            standardised = (pooled - torch.as_tensor(estimator.feature_mean_)) / torch.as_tensor(
                estimator.feature_scale_)
            output = _torch_output(estimator, estimator.network_(standardised[None])[0], task, class_code)
        elif hasattr(estimator, "steps"):
            output = _linear_output(estimator, pooled, task, class_code)
        else:
            raise InputError("--head", f"saliency cannot differentiate a {type(estimator).__name__} head",
                             "use --head linear or mlp, or --pooling mil")
        (gradient,) = torch.autograd.grad(output, features)
    return gradient.numpy(), None, float(output.detach())
