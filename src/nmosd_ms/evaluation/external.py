"""Performance on a labelled external cohort, with uncertainty: the numbers ``nmosd-ms evaluate``
reports (no I/O here).

Confidence intervals are percentile bootstrap intervals from :func:`scipy.stats.bootstrap`,
resampling subjects *within each class* (the NMOSD and the MS subjects are given to it as two
samples, which it resamples independently), so every resample keeps the cohort's class counts and
sensitivity and specificity stay defined. The same resamples serve every model, so differences
between the network and a baseline are paired. The point estimate shown is always the metric on
the full cohort; the interval is the resamples' percentiles (not centred on it by construction).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import optimize, stats
from sklearn.metrics import roc_curve

from ..constants import POSITIVE

#: The metrics with bootstrap intervals (NMOSD is the positive class).
EXTERNAL_METRICS = ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "auc", "brier")
#: The metrics compared between the network and each baseline (paired differences).
COMPARED = ("accuracy", "balanced_accuracy", "auc")
BOOTSTRAP_METHOD = "percentile"


def _metric_block(p_pos, p_neg, threshold: float) -> np.ndarray:
    """EXTERNAL_METRICS along the last axis of ``p_pos`` (NMOSD) and ``p_neg`` (MS) probabilities
    (any leading batch shape); a class that is absent makes its metrics NaN."""
    n_pos, n_neg = p_pos.shape[-1], p_neg.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        tp = (p_pos >= threshold).sum(-1)
        tn = (p_neg < threshold).sum(-1)
        sens = tp / n_pos if n_pos else np.full(tp.shape, np.nan)
        spec = tn / n_neg if n_neg else np.full(tn.shape, np.nan)
        acc = (tp + tn) / (n_pos + n_neg)
        bal = (sens + spec) / 2
        if n_pos and n_neg:
            diff = p_pos[..., :, None] - p_neg[..., None, :]
            auc = ((diff > 0).sum((-1, -2)) + 0.5 * (diff == 0).sum((-1, -2))) / (n_pos * n_neg)
        else:
            auc = np.full(acc.shape, np.nan)
        brier = (((1 - p_pos) ** 2).sum(-1) + (p_neg**2).sum(-1)) / (n_pos + n_neg)
    return np.stack([acc, sens, spec, bal, auc, brier]).astype(np.float64)


def bootstrap_metrics(
    y: np.ndarray,
    probs: dict[str, np.ndarray],
    thresholds: dict[str, float],
    reference: str,
    n_resamples: int = 9999,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every model's metrics with stratified bootstrap intervals, and each other model's paired
    difference from ``reference`` (the network) on :data:`COMPARED`.

    Parameters
    ----------
    y : array of 0/1
        True labels, 1 = NMOSD.
    probs : dict
        Model name -> P(NMOSD) per subject (same order as ``y``).
    thresholds : dict
        Model name -> the threshold its label is called at.
    reference : str
        The model the others are compared with (``difference = reference - other``).
    n_resamples, confidence, seed
        Of :func:`scipy.stats.bootstrap` (percentile method, seeded generator).

    Returns ``(metrics, comparison)``: columns ``model, metric, value, ci_low, ci_high`` and
    ``baseline, metric, difference, ci_low, ci_high``.
    """
    y = np.asarray(y, dtype=int)
    names = list(probs)
    p = np.stack([np.asarray(probs[n], dtype=np.float64) for n in names])  # (models, subjects)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    groups = [g for g in (pos, neg) if g.size]
    others = [n for n in names if n != reference]
    n_metrics = len(EXTERNAL_METRICS)

    def blocks(*idx):
        ip = idx[0] if pos.size else np.empty(idx[0].shape[:-1] + (0,), dtype=int)
        ineg = idx[-1] if neg.size else np.empty(idx[0].shape[:-1] + (0,), dtype=int)
        return [
            _metric_block(p[m][ip], p[m][ineg], thresholds[names[m]]) for m in range(len(names))
        ]

    def statistic(*idx, axis=-1):
        b = blocks(*idx)
        ref = b[names.index(reference)]
        cmp = [ref[EXTERNAL_METRICS.index(k)] - b[names.index(o)][EXTERNAL_METRICS.index(k)]
               for o in others for k in COMPARED]  # fmt: skip
        return np.concatenate([np.concatenate(b), np.stack(cmp)]) if cmp else np.concatenate(b)

    point = statistic(*groups)
    enough = all(g.size >= 2 for g in groups)
    if enough:
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            # metrics of an absent class are NaN by design: not a degenerate-data problem
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            res = stats.bootstrap(
                groups,
                statistic,
                n_resamples=n_resamples,
                confidence_level=confidence,
                method=BOOTSTRAP_METHOD,
                vectorized=True,
                batch=max(1, 2_000_000 // max(1, pos.size * max(neg.size, 1) * len(names))),
                random_state=np.random.default_rng(seed),
            )
        low, high = res.confidence_interval.low, res.confidence_interval.high
    else:  # a class with one subject: no resampling within it can vary
        low = high = np.full(point.shape, np.nan)
    rows = []
    for m, name in enumerate(names):
        for k, metric in enumerate(EXTERNAL_METRICS):
            i = m * n_metrics + k
            rows.append(_row(name, metric, point[i], low[i], high[i]))
    metrics = pd.DataFrame(rows).rename(columns={"name": "model"})
    base = len(names) * n_metrics
    rows = []
    for j, (o, metric) in enumerate((o, k) for o in others for k in COMPARED):
        rows.append(_row(o, metric, point[base + j], low[base + j], high[base + j]))
    comparison = pd.DataFrame(rows, columns=["name", "metric", "value", "ci_low", "ci_high"])
    comparison = comparison.rename(columns={"name": "baseline", "value": "difference"})
    return metrics, comparison


def _row(name, metric, value, low, high) -> dict:
    value = float(value)
    if not math.isfinite(value):
        low = high = math.nan
    return {"name": name, "metric": metric, "value": value, "ci_low": low, "ci_high": high}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def calibration(y: np.ndarray, p: np.ndarray) -> dict:
    """Brier score; calibration slope (logistic regression of the outcome on logit(p)) and
    calibration-in-the-large intercept (the same with the slope fixed at 1: logit(p) as an
    offset), as in Van Calster et al. 2019. NaN where one class is absent, and the slope is
    infinite (NaN, ``separated``) when logit(p) separates the classes perfectly."""
    y = np.asarray(y, dtype=np.float64)
    z = _logit(p)
    brier = float(np.mean((np.asarray(p, dtype=np.float64) - y) ** 2))
    out = {"brier": brier, "slope": math.nan, "intercept": math.nan, "separated": False}
    if y.min() == y.max():
        return out

    # Written here because the calibration intercept needs an offset term, which
    # scikit-learn's LogisticRegression lacks; both fits are one- or two-parameter convex
    # likelihoods that scipy minimises directly.
    def nll(a, b):
        eta = a + b * z
        return float(np.sum(np.logaddexp(0, eta) - y * eta))

    out["intercept"] = float(optimize.minimize_scalar(lambda a: nll(a, 1.0)).x)
    if z[y == 0].max() < z[y == 1].min() or z[y == 1].max() < z[y == 0].min():
        out["separated"] = True
        return out
    fit = optimize.minimize(lambda ab: nll(ab[0], ab[1]), x0=np.array([0.0, 1.0]))
    out["slope"] = float(fit.x[1])
    return out


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int | None = None) -> pd.DataFrame:
    """The reliability diagram's points: subjects binned by predicted P(NMOSD) into quantile bins
    (equal counts; small cohorts make equal-width bins nearly empty), with each bin's mean
    prediction, observed NMOSD share and size. scikit-learn's ``calibration_curve`` gives the
    first two only; the counts are needed to read the diagram, hence these lines."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    n_bins = n_bins or int(np.clip(len(p) // 8, 2, 10))
    edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)))
    which = np.clip(np.searchsorted(edges[1:-1], p, side="right"), 0, max(len(edges) - 2, 0))
    rows = []
    for b in np.unique(which):
        sel = which == b
        rows.append(
            {
                "bin": int(b),
                "n": int(sel.sum()),
                "mean_predicted": float(p[sel].mean()),
                "observed_nmosd": float(y[sel].mean()),
            }
        )
    return pd.DataFrame(rows)


def roc_points(y: np.ndarray, p: np.ndarray) -> pd.DataFrame:
    """The ROC curve (scikit-learn), empty when one class is absent."""
    y = np.asarray(y, dtype=int)
    if y.min() == y.max():
        return pd.DataFrame(columns=["fpr", "tpr", "threshold"])
    fpr, tpr, thr = roc_curve(y, p)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr})


def confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, int]:
    """Counts at ``threshold``: true/false NMOSD and MS calls (NMOSD positive)."""
    y = np.asarray(y, dtype=int)
    call = np.asarray(p) >= threshold
    return {
        f"true {POSITIVE}, called {POSITIVE}": int(((y == 1) & call).sum()),
        f"true {POSITIVE}, called MS": int(((y == 1) & ~call).sum()),
        f"true MS, called {POSITIVE}": int(((y == 0) & call).sum()),
        "true MS, called MS": int(((y == 0) & ~call).sum()),
    }


__all__ = [
    "BOOTSTRAP_METHOD",
    "COMPARED",
    "EXTERNAL_METRICS",
    "bootstrap_metrics",
    "calibration",
    "confusion",
    "reliability",
    "roc_points",
]
