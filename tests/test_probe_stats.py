"""The corrected resampled t-test, Holm's adjustment and the Clopper–Pearson interval against their definitions."""

import numpy as np
import pytest
from scipy import stats

from braindino.probe.stats import clopper_pearson, corrected_resampled_t, holm


def test_corrected_resampled_t_inflates_the_variance_by_one_over_j_plus_test_over_train():
    d = np.array([0.05, -0.02, 0.08, 0.01, 0.03, 0.00, 0.06, -0.01, 0.04, 0.02])
    mean, low, high, p, J = corrected_resampled_t(d, 0.25)
    scale = np.sqrt((1 / 10 + 0.25) * d.var(ddof=1))
    assert (mean, J) == (pytest.approx(d.mean(), rel=1e-15), 10)
    assert p == pytest.approx(2 * stats.t.sf(d.mean() / scale, 9), rel=1e-12)
    assert high - mean == pytest.approx(stats.t.ppf(0.975, 9) * scale, rel=1e-12)
    naive = stats.ttest_1samp(d, 0).pvalue                  # the uncorrected test is far more confident
    assert naive < 0.05 < p
    assert corrected_resampled_t([0.1, np.nan, 0.3], 0.25)[4] == 2
    assert corrected_resampled_t([0.0, 0.0, 0.0], 0.25)[1:4] == (0.0, 0.0, 1.0)
    assert np.isnan(corrected_resampled_t([0.2], 0.25)[3])


def test_holm_step_down():
    got = holm([0.01, 0.04, 0.03, np.nan, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 with m = 4: 0.02, 0.03, 0.06, 0.06 (monotone)
    np.testing.assert_allclose(np.array(got)[[4, 0, 2, 1]], [0.02, 0.03, 0.06, 0.06], rtol=1e-12)
    assert np.isnan(got[3]) and holm([0.6, 0.7]) == [1.0, 1.0] and holm([]) == []


def test_clopper_pearson_equals_scipy_exact_interval():
    for k, n in ((8, 8), (5, 8), (0, 12), (17, 20)):
        expected = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
        assert clopper_pearson(k, n) == pytest.approx((expected.low, expected.high), rel=1e-9, abs=1e-12)
    assert clopper_pearson(8, 8)[0] == pytest.approx(0.631, abs=1e-3)
