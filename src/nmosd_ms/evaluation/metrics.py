"""Classification metrics with NMOSD as the positive class (label 1).

sensitivity = NMOSD recall, specificity = MS recall; AUC is NaN when a set holds one class.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

from ..constants import THRESHOLD

METRICS = ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "auc")


def binary_metrics(y_true, prob_nmosd, threshold: float = THRESHOLD) -> dict[str, float]:
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob_nmosd, dtype=float)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    auc = roc_auc_score(y, p) if len(np.unique(y)) == 2 else math.nan
    return {
        "accuracy": float((tp + tn) / len(y)) if len(y) else math.nan,
        "sensitivity": float(sens),
        "specificity": float(spec),
        "balanced_accuracy": float(np.nanmean([sens, spec])),
        "auc": float(auc),
    }
