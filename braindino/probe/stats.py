"""Tests and intervals that hold under cross-validation, multiplicity control and small-sample intervals.

- ``corrected_resampled_t``: Nadeau & Bengio's (2003) corrected resampled t-test, in the repeated-k-fold form of
  Bouckaert & Frank (2004): J = seeds × folds per-fold differences of a metric; their variance is inflated by
  ``1/J + n_test/n_train`` because the training sets of different folds overlap (a plain t-test on the J values
  would ignore that correlation and reject far too often). It accounts for the variability of refitting the heads,
  not only of the test subjects.
- ``holm``: Holm's step-down adjustment of a family of p-values (controls the family-wise error rate).
- ``clopper_pearson``: the exact binomial interval, for accuracy-type metrics on small test sets (where a
  percentile bootstrap collapses to zero width, e.g. [1.00, 1.00] on 8 perfectly classified subjects).
"""

import numpy as np
from scipy import stats


def corrected_resampled_t(differences, test_train_ratio: float, confidence: float = 0.95
                          ) -> tuple[float, float, float, float, int]:
    """(mean, low, high, p_value, J) of per-fold differences ``differences`` [J] (NaN entries left out).

    Variance of the mean: ``(1/J + test_train_ratio) × s²`` with ``s²`` the sample variance (ddof 1) of the J
    differences; t with J − 1 degrees of freedom, two-sided. With fewer than 2 finite differences everything is
    NaN; with zero variance the interval is the point and p is 1 when the mean is 0, else 0.
    """
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    J = len(d)
    if J < 2:
        return (float(d.mean()) if J else float("nan")), float("nan"), float("nan"), float("nan"), J
    mean = float(d.mean())
    scale = float(np.sqrt((1.0 / J + test_train_ratio) * d.var(ddof=1)))
    if scale == 0:
        return mean, mean, mean, (1.0 if mean == 0 else 0.0), J
    t = mean / scale
    p = float(2 * stats.t.sf(abs(t), df=J - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, df=J - 1)) * scale
    return mean, mean - half, mean + half, min(1.0, p), J


def holm(p_values) -> list[float]:
    """Holm-adjusted p-values [m] in the input order; NaN (untestable) entries stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(len(p), np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def clopper_pearson(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of a proportion ``successes / n``; ``successes`` may be fractional (e.g. balanced
    accuracy × n), using the beta quantiles of the exact interval."""
    alpha = 1 - confidence
    k = float(successes)
    low = 0.0 if k <= 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k >= n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high
