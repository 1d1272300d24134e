"""Statistics for comparing models under repeated k-fold cross-validation.

The corrected resampled t-test (Nadeau & Bengio 2003, as used by Bouckaert & Frank 2004) is
written here because no maintained library exposes it: scikit-learn shows it only as a gallery
example, and mlxtend's paired t-test omits the correction. The naive test treats the k·r fold
results as independent although their training sets overlap, and so is far too liberal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class TTestResult:
    mean_difference: float
    t: float
    df: int
    p_value: float
    ci_low: float
    ci_high: float


def corrected_resampled_ttest(
    a, b, n_train: float, n_test: float, confidence: float = 0.95
) -> TTestResult:
    """Compare per-fold scores ``a`` and ``b`` (same k·r folds, paired).

    variance of the mean difference = s² · (1/(k·r) + n_test/n_train), df = k·r − 1.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = d.size
    if n < 2:
        raise ValueError("need at least two paired folds")
    mean = float(d.mean())
    var = float(d.var(ddof=1))
    se = math.sqrt(var * (1.0 / n + n_test / n_train))
    df = n - 1
    if se == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0.0 else 0.0
        return TTestResult(mean, t, df, p, mean, mean)
    t = mean / se
    p = float(2 * stats.t.sf(abs(t), df))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return TTestResult(mean, t, df, p, mean - half, mean + half)


def corrected_ci(values, n_train: float, n_test: float, confidence: float = 0.95):
    """Confidence interval of one model's mean fold score with the same correction."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return (math.nan, math.nan)
    se = math.sqrt(v.var(ddof=1) * (1.0 / v.size + n_test / n_train))
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1)) * se
    return (float(v.mean() - half), float(v.mean() + half))


def holm(p_values) -> np.ndarray:
    """Holm step-down adjusted p-values (controls the family-wise error rate)."""
    p = np.asarray(p_values, dtype=float)
    m = p.size
    order = np.argsort(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        adjusted[idx] = running
    return adjusted
