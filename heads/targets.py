"""Task names, survival targets and per-task scores shared by every head.

Targets by task (``V`` volumes): ``classification`` — ``[V]`` class labels (any hashable type);
``regression`` — ``[V]`` floats; ``survival`` — a scikit-survival structured array ``[V]`` with one bool field
(event) and one float field (time), e.g. from :func:`make_survival_target` or ``Surv.from_arrays(event, time)``.
"""

import numpy as np
from sklearn.metrics import accuracy_score, r2_score
from sksurv.exceptions import NoComparablePairException
from sksurv.metrics import concordance_index_censored
from sksurv.util import Surv

TASKS = ("classification", "regression", "survival")


def check_task(task: str) -> str:
    """Return ``task`` if it is one of :data:`TASKS`, else raise ValueError."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def survival_arrays(y) -> tuple[np.ndarray, np.ndarray]:
    """Split a structured survival target ``[V]`` into ``(time [V] float64, event [V] bool)``.

    The event field is the first bool field and the time field the first numeric non-bool field, so both
    ``Surv.from_arrays`` output and arrays with other field names work.
    """
    names = getattr(getattr(y, "dtype", None), "names", None)
    if not names:
        raise ValueError("survival targets must be a structured array with an event (bool) and a time field; "
                         "build one with sksurv.util.Surv.from_arrays(event, time)")
    event_fields = [name for name in names if y.dtype[name] == np.bool_]
    time_fields = [name for name in names if y.dtype[name] != np.bool_ and np.issubdtype(y.dtype[name], np.number)]
    if not event_fields or not time_fields:
        raise ValueError(f"survival target fields {names} lack a bool event field or a numeric time field")
    return (np.ascontiguousarray(y[time_fields[0]], dtype=np.float64),
            np.ascontiguousarray(y[event_fields[0]], dtype=bool))


def concordance(y, risk) -> float:
    """Harrell's C-index of ``risk`` ``[V]`` (higher = earlier event) against survival target ``y`` ``[V]``.

    Returns 0.5 (no information) when the data hold no event or no comparable pair (e.g. a small inner fold).
    """
    time, event = survival_arrays(y)
    if not event.any():
        return 0.5
    try:
        return float(concordance_index_censored(event, time, np.asarray(risk, dtype=np.float64))[0])
    except NoComparablePairException:
        return 0.5


def survival_scorer(estimator, X, y) -> float:
    """scikit-learn scorer: the C-index of ``estimator.predict(X)`` on ``y`` (used in inner cross-validation)."""
    return concordance(y, estimator.predict(X))


def task_score(task: str, y, prediction) -> float:
    """Default score: accuracy (classification), R² (regression), C-index (survival)."""
    if task == "classification":
        return float(accuracy_score(y, prediction))
    if task == "regression":
        return float(r2_score(y, prediction))
    return concordance(y, prediction)


def make_survival_target(event, time) -> np.ndarray:
    """Structured survival target ``[V]`` (fields ``event`` bool, ``time`` float) from two ``[V]`` arrays."""
    return Surv.from_arrays(event=np.asarray(event, dtype=bool), time=np.asarray(time, dtype=np.float64))
