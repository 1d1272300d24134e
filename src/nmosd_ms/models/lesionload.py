"""Classical lesion-load baselines (scikit-learn) on the features computed by ``prepare``."""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from ..data.features import FEATURES

#: Volumes are log-transformed (log1p) before scaling: lesion volumes are lognormal.
LOG_FEATURES = ("total_ml", "mean_lesion_ml", "max_lesion_ml", "n_lesions")


def _log_volumes(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float64, copy=True)
    for i, name in enumerate(FEATURES):
        if name in LOG_FEATURES:
            x[:, i] = np.log1p(x[:, i])
    return x


def build_lesionload(name: str, seed: int = 0) -> Pipeline:
    log = FunctionTransformer(_log_volumes)
    if name == "lesionload-logreg":
        return make_pipeline(log, StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    if name == "lesionload-forest":
        return make_pipeline(
            log, RandomForestClassifier(n_estimators=500, min_samples_leaf=2, random_state=seed)
        )
    raise ValueError(name)
