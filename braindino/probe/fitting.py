"""Fit one head on training subjects and predict test subjects, as a prediction set (see ``metrics``).

Inputs: pooled ``X`` [n, P] (linear, mlp, knn heads) or a list of n bags ``[S_i, W]`` (attention-MIL). Targets come
from the endpoint's ``SubjectTable.y``. Every hyperparameter is chosen by the heads' inner CV on training data.
"""

import numpy as np

from braindino.probe.knn import KNNProbe


def make_head(task: str, head: str, pooling: str, seed: int):
    """A fresh, unfitted estimator: attention-MIL when ``pooling == "mil"``, else the ``head`` on pooled inputs."""
    import heads

    if pooling == "mil":
        return heads.AttentionMILHead(task, random_state=seed)
    if head == "knn":
        return KNNProbe(task)
    if head == "mlp":
        return heads.MLPHead(task, random_state=seed)
    return heads.make_linear_head(task, random_state=seed)


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
                n_classes: int | None = None) -> dict:
    """Fit on subjects ``train``, predict subjects ``test`` → prediction set over ``test`` (metrics' layout).

    Classification probabilities are returned [n_test, n_classes] in class-code order (a class absent from the
    training subset gets probability 0). Survival ``high_risk`` compares test risks with the training median risk.
    """
    estimator.fit(select(inputs, train), training_target(task, y, train))
    test_inputs = select(inputs, test)
    if task == "classification":
        prob = np.zeros((len(test), n_classes))
        prob[:, np.asarray(estimator.classes_, dtype=int)] = estimator.predict_proba(test_inputs)
        return {"y_true": y["code"][test], "prob": prob}
    if task == "regression":
        return {"y_true": y["value"][test], "y_pred": np.asarray(estimator.predict(test_inputs), dtype=float)}
    risk = np.asarray(estimator.predict(test_inputs), dtype=float)
    train_median = float(np.median(estimator.predict(select(inputs, train))))
    return {"time": y["time"][test], "event": y["event"][test], "risk": risk, "high_risk": risk > train_median}


def head_parameters(estimator) -> int:
    """Trainable numbers of a fitted head: torch heads count their network's parameters; linear heads their
    coefficients and intercepts; the kNN probe has none (it stores the training vectors)."""
    network = getattr(estimator, "network_", None)
    if network is not None:
        return int(sum(p.numel() for p in network.parameters()))
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    final = getattr(final, "estimator_", final)
    total = 0
    for name in ("coef_", "intercept_"):
        value = getattr(final, name, None)
        if value is not None:
            total += int(np.size(value))
    return total
