"""Fit one head on training samples and predict test samples, as a prediction set (see ``metrics``).

Inputs: pooled ``X`` [n, P] (linear, mlp, knn heads) or a list of n bags ``[S_i, W]`` (attention-MIL). Targets come
from the endpoint's ``SubjectTable.y``. Every hyperparameter is chosen by the heads' inner CV on training data
(grouped by subject when ``groups`` are given, i.e. with the volume unit).

Low-data guard (regression): with fewer than ``MIN_REGRESSION_SUBJECTS`` training subjects, when a brain-age
correction cannot estimate its slope, or when a prediction leaves the training targets' range by more than that
range's width, the cell's fold predicts the training mean instead, and says so in a note (a 2-subject ridge fit with
its slope divided out had predicted ages 55 years off a target with std 18).
"""

import numpy as np

from braindino.errors import InputError
from braindino.probe.knn import KNNProbe

MIN_REGRESSION_SUBJECTS = 4


def make_head(task: str, spec, seed: int):
    """A fresh, unfitted estimator for ``spec`` (an EndpointSpec): attention-MIL when ``spec.pooling == "mil"``,
    else ``spec.head`` on pooled inputs, wrapped in ``heads.BrainAgeCorrection`` (its bias fitted on the training
    samples only) when ``spec.brain_age_correction``."""
    import heads

    if spec.pooling == "mil":
        return heads.AttentionMILHead(task, random_state=seed)
    if spec.head == "knn":
        return KNNProbe(task)
    head = (heads.MLPHead(task, random_state=seed) if spec.head == "mlp"
            else heads.make_linear_head(task, random_state=seed))
    return heads.BrainAgeCorrection(head, random_state=seed) if spec.brain_age_correction else head


def training_target(task: str, y: dict, index: np.ndarray):
    """The estimator's ``y`` for subjects ``index``: class codes, values, or a scikit-survival structured array."""
    if task == "classification":
        return y["code"][index]
    if task == "regression":
        return y["value"][index]
    from sksurv.util import Surv
    return Surv.from_arrays(event=y["event"][index], time=y["time"][index])


def select(inputs, index: np.ndarray):
    """Rows ``index`` of pooled inputs [n, P] or of a list of bags."""
    return inputs[index] if isinstance(inputs, np.ndarray) else [inputs[i] for i in index]


def fit_predict(task: str, estimator, inputs, y: dict, train: np.ndarray, test: np.ndarray,
                n_classes: int | None = None, groups=None) -> tuple[dict, list[str]]:
    """Fit on samples ``train``, predict samples ``test`` → (prediction set over ``test`` (metrics' layout), notes).

    Classification probabilities are returned [n_test, n_classes] in class-code order (a class absent from the
    training subset gets probability 0). Survival ``high_risk`` compares test risks with the training median risk.
    ``groups`` [len(train)]: the subject of each training sample (inner searches split by it). Notes: a regression
    fold that fell back to the training mean (see the module docstring), a Cox fit that did not converge.
    """
    if task == "regression":
        return _regression_with_guard(estimator, inputs, y, train, test, groups)
    fit_head(task, estimator, inputs, y, train, groups)
    notes = []
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    if getattr(final, "converged_", True) is False:
        notes.append("the Cox fit did not converge within its iteration limit (its risks are from the last step)")
    return predict_set(task, estimator, select(inputs, test), y, test, n_classes, select(inputs, train)), notes


def _regression_with_guard(estimator, inputs, y, train, test, groups) -> tuple[dict, list[str]]:
    values = y["value"][train]
    n_subjects = len(set(groups.tolist())) if groups is not None else len(train)
    fallback = None
    if n_subjects < MIN_REGRESSION_SUBJECTS:
        fallback = f"{n_subjects} training subject(s) (< {MIN_REGRESSION_SUBJECTS})"
    else:
        try:
            fit_head("regression", estimator, inputs, y, train, groups)
        except InputError as error:                            # brain-age slope not estimable
            fallback = f"brain-age correction failed ({error.cause})"
    if fallback is None:
        pred = predict_set("regression", estimator, select(inputs, test), y, test)
        low, high = values.min(), values.max()
        width = max(high - low, 1e-12)
        wild = (pred["y_pred"] < low - width) | (pred["y_pred"] > high + width) | ~np.isfinite(pred["y_pred"])
        if not wild.any():
            return pred, []
        fallback = (f"{int(wild.sum())} prediction(s) beyond the training targets' range [{low:.4g}, {high:.4g}] "
                    f"by more than its width")
    pred = {"y_true": y["value"][test], "y_pred": np.full(len(test), float(values.mean()))}
    return pred, [f"regression head replaced by the training mean: {fallback}"]


def fit_head(task: str, estimator, inputs, y: dict, train: np.ndarray, groups=None):
    """Fit ``estimator`` on samples ``train`` of ``inputs`` (``groups`` [len(train)]: their subjects, routed to the
    head's inner searches); returns it."""
    from heads import BrainAgeCorrection
    from heads.grouping import fit_grouped

    try:
        return fit_grouped(estimator, select(inputs, train), training_target(task, y, train), groups)
    except ValueError as error:
        if isinstance(estimator, BrainAgeCorrection):      # e.g. predicted age does not rise with true age
            raise InputError("--brain-age-correction", str(error).splitlines()[0], "train on more subjects "
                             "(larger --fractions) or leave out the brain-age correction") from None
        raise


def predict_set(task: str, estimator, test_inputs, y: dict, test: np.ndarray, n_classes: int | None = None,
                train_inputs=None) -> dict:
    """A fitted head's prediction set for ``test_inputs`` (the inputs of samples ``test``, in that order; they may
    differ from what the head was fitted on, e.g. perturbed volumes). Survival needs ``train_inputs`` (the median
    training risk splits ``high_risk``)."""
    if task == "classification":
        prob = np.zeros((len(test), n_classes))
        prob[:, np.asarray(estimator.classes_, dtype=int)] = estimator.predict_proba(test_inputs)
        return {"y_true": y["code"][test], "prob": prob}
    if task == "regression":
        return {"y_true": y["value"][test], "y_pred": np.asarray(estimator.predict(test_inputs), dtype=float)}
    risk = np.asarray(estimator.predict(test_inputs), dtype=float)
    train_median = float(np.median(estimator.predict(train_inputs)))
    return {"time": y["time"][test], "event": y["event"][test], "risk": risk, "high_risk": risk > train_median}


def head_parameters(estimator) -> int:
    """Trainable numbers of a fitted head: an end-to-end network the numbers it trained (``trained_parameters_``);
    torch heads count their network's parameters; linear heads their coefficients and intercepts; the kNN probe
    has none (it stores the training vectors); a brain-age correction adds its slope and intercept to its
    regressor's; an unfitted estimator 0."""
    if hasattr(estimator, "trained_parameters_"):
        return int(estimator.trained_parameters_)
    if hasattr(estimator, "regressor_"):
        return head_parameters(estimator.regressor_) + 2
    network = getattr(estimator, "network_", None)
    if network is not None:
        return int(sum(p.numel() for p in network.parameters()))
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    total = 0
    for name in ("coef_", "intercept_"):
        value = getattr(final, name, None)
        if value is not None:
            total += int(np.size(value))
    return total
